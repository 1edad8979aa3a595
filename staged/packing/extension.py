"""Finding a function of the optional C++ extension ``staged._C``, or the reason it is absent.

Every host-side data-path module (planner, span tables) has a pure-Python twin with identical
output; this is where each learns, once at import, whether its C++ version can be used.
``STAGED_NO_EXT=1`` forces the twins.
"""
from __future__ import annotations

import os
from typing import Callable


def load_native(name: str) -> tuple[Callable | None, str]:
    """``staged._C.<name>``, or None and why not."""
    if os.environ.get("STAGED_NO_EXT") == "1":
        return None, "STAGED_NO_EXT=1 is set"
    try:
        from staged import _C
    except ImportError as exc:
        return None, (f"staged._C is not built ({exc}); build it with "
                      "`pip install -e . --no-build-isolation --no-deps`")
    fn = getattr(_C, name, None)
    if fn is None:
        return None, f"staged._C has no {name} (a stale build?); rebuild it"
    return fn, ""
