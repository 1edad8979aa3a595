"""User reward functions, named `module:function` in the config (or passed as an importable function).

    compute_rewards(texts, samples, reward_fn="my_rewards:ocr_score")

Two calling conventions, told apart by the first parameter's name:

  per completion (default)   fn(completion: str, sample: Sample) -> float | dict | None
  batch                      fn(completions: list[str], **columns) -> list[float | dict | None]
      when the first parameter is `completions` (TRL's reward-function convention) or `responses`,
      or the function has the attribute `batched = True`. The completions go first (positionally);
      keyword columns, each a list aligned with them, are passed when the function names them or
      takes **kwargs: samples (the Sample
      objects), prompts, answer (also as ground_truth and solution), task, pass_rate, and every key
      of the rows' `extra` (None where a row lacks it). A TRL function such as
      `def accuracy(completions, solution, **kw)` works unchanged on rows that carry the column.

`completion` is the decoded response text (special tokens stripped, nothing extracted). The Sample's
`extra` holds the row's extra columns (options, image sizes, any metadata). Images are NOT sent
(pickling every image to a worker per rollout costs more than most rewards): `sample.images` is
empty; put what the reward needs about them into the row's extra.

The return value is the accuracy term, in [0, 1] by convention (the trainer does not clip it); a dict
may instead give {"accuracy": .., "format": .., "reward": ..} (any subset; "overall" and "score" are
read as "reward" and "accuracy"): a "format" replaces staged's format check for that row, a
"reward" replaces the combined reward. None (TRL's "does not apply") scores 0.

Time limit: the function runs in a worker process (staged.rewards.sandbox), so it needs to be
importable by name there (a module on the import path, not a lambda or a function defined in
__main__); a per-completion call gets `timeout` seconds, a batch call `timeout` x its size. A call
that raises, times out or returns something unusable scores 0 for its rows and is counted
(verifier_errors / verifier_timeouts), never raised.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Callable

from .sandbox import Job, get_pool

BATCH_FIRST_PARAMS = ("completions", "responses")
_LOADED: dict = {}  # spec -> UserReward, so that a training step does not re-inspect the function


@dataclass(frozen=True)
class UserReward:
    spec: str  # "module:function"
    fn: Callable
    batched: bool
    params: frozenset[str] | None  # keyword names it takes; None: it takes **kwargs
    first: str  # the name of the first parameter (a batch call passes the completions there)


def _import_spec(spec: str):
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' (e.g. 'my_rewards:score')")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {mod_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {spec!r}: {attr!r} is not callable")
    return obj


def load_reward_function(spec: str | Callable | UserReward) -> UserReward:
    """Resolve and check a user reward function (here, in this process: errors surface at start-up)."""
    if isinstance(spec, UserReward):
        return spec
    if callable(spec):
        fn = spec
        name = f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', '')}"
        try:
            same = _import_spec(name) is fn
        except ValueError:
            same = False
        if not same or "<" in name or name.startswith("__main__:"):
            raise ValueError(f"reward function {name!r} must be importable as 'module:function' from another "
                             "process (it runs in a worker with a time limit): define it at the top level of a "
                             "module on the import path and pass that name")
        spec = name
    elif isinstance(spec, str):
        spec = spec.strip()
        if spec in _LOADED:
            return _LOADED[spec]
        fn = _import_spec(spec)
    else:
        raise TypeError(f"reward function must be 'module:function' or a function, got {type(spec).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    params = list(sig.parameters.values()) if sig else []
    first = params[0].name if params else ""
    batched = getattr(fn, "batched", None)
    if batched is None:
        batched = first in BATCH_FIRST_PARAMS
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in params):
        names = None
    else:
        names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    if not batched and sig is not None:
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
            raise ValueError(f"reward function {spec!r}: a per-completion reward takes (completion, sample); "
                             f"got {sig}. A batch reward's first parameter is named 'completions'.")
    ur = UserReward(spec, fn, bool(batched), names, first)
    _LOADED[spec] = ur
    return ur


def _light(sample):
    """The sample as the worker gets it: no images."""
    if dataclasses.is_dataclass(sample) and getattr(sample, "images", None):
        return dataclasses.replace(sample, images=[])
    return sample


def _columns(ur: UserReward, samples: list) -> dict:
    light = [_light(s) for s in samples]
    cols = {"samples": light,
            "prompts": [getattr(s, "prompt", None) for s in samples],
            "answer": [getattr(s, "answer", None) for s in samples],
            "task": [getattr(s, "task", None) for s in samples],
            "pass_rate": [getattr(s, "pass_rate", None) for s in samples]}
    cols["ground_truth"] = cols["solution"] = cols["answer"]
    keys: dict[str, None] = {}
    for s in samples:
        for k in (getattr(s, "extra", None) or {}):
            keys.setdefault(str(k))
    for k in keys:
        if k not in cols:
            cols[k] = [(getattr(s, "extra", None) or {}).get(k) for s in samples]
    if ur.params is not None:
        cols = {k: v for k, v in cols.items() if k in ur.params}
    cols.pop(ur.first, None)  # the completions go first, positionally
    return cols


def jobs_for(ur: UserReward, completions: list[str], samples: list, timeout: float) -> list[tuple[list[int], Job]]:
    """[(rows it scores, job)]: one job per completion, or one for the whole batch."""
    path = [p for p in sys.path if p]  # the worker may predate a sys.path entry the module needs
    if ur.batched:
        cols = _columns(ur, samples)
        job = Job("call", (ur.spec, path, (list(completions),), cols), timeout=timeout * max(1, len(completions)))
        return [(list(range(len(completions))), job)]
    return [([i], Job("call", (ur.spec, path, (c, _light(s)), {}), timeout=timeout))
            for i, (c, s) in enumerate(zip(completions, samples))]


def user_pool():
    return get_pool("user_rewards")  # no memory limit: a user's reward may import torch


def parse_value(v) -> tuple[float, float | None, float | None]:
    """(accuracy, format or None, reward or None) from what a reward function returned; ValueError when
    it is unusable (not a number / dict / None, or not finite)."""
    if v is None:
        return 0.0, None, None
    if isinstance(v, dict):
        acc = v.get("accuracy", v.get("score"))
        fmt = v.get("format")
        rew = v.get("reward", v.get("overall"))
        if acc is None and rew is None:
            raise ValueError(f"reward dict has neither 'accuracy' nor 'reward': keys {sorted(v)[:8]}")
        acc = _finite(acc if acc is not None else rew, "accuracy")
        return acc, (None if fmt is None else _finite(fmt, "format")), (None if rew is None else _finite(rew, "reward"))
    if isinstance(v, str):
        raise ValueError(f"reward function returned a string: {v[:40]!r}")
    return _finite(v, "reward"), None, None


def _finite(x, what: str) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number: {type(x).__name__}") from None
    if not math.isfinite(f):
        raise ValueError(f"{what} is not finite: {f}")
    return f
