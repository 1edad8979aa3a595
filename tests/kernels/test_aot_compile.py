"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with no GPU, without spills.

Runs ``python -m staged.kernels.aot --json`` in a subprocess without TRITON_INTERPRET (the
interpreter's jit functions cannot be lowered). The per-kernel register/spill/shared-memory
table is printed in pytest's terminal summary.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"


def _jit_kernels() -> set[str]:
    """Names of the @triton.jit entry points under kernels/: jit functions that no other jit
    function calls (device helpers are compiled into their callers)."""
    jit_defs: dict[str, ast.FunctionDef] = {}
    for path in KERNEL_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    target = dec.func if isinstance(dec, ast.Call) else dec
                    if ast.unparse(target) in ("triton.jit", "jit"):
                        jit_defs[node.name] = node
    called = {c.func.id for fn in jit_defs.values() for c in ast.walk(fn)
              if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    return set(jit_defs) - called


@pytest.fixture(scope="module")
def aot_result():
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "staged.kernels.aot", "--json"], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON from the AOT compiler (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_every_kernel_compiles_for_sm80_and_sm90(aot_result, request):
    request.config._staged_aot_report = aot_result["compiled"]  # printed by conftest
    assert not aot_result["failed"], "\n".join(f"{f['kernel']} sm_{f['cc']}: {f['error']}"
                                             for f in aot_result["failed"])
    archs = {}
    for row in aot_result["compiled"]:
        archs.setdefault(row["kernel"], set()).add(row["cc"])
    missing = {k: sorted({80, 90} - v) for k, v in archs.items() if {80, 90} - v}
    assert not missing, f"kernels not compiled for every arch: {missing}"


def test_no_kernel_spills(aot_result):
    spilled = [r for r in aot_result["compiled"] if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills: " + ", ".join(
        f"{r['kernel']} sm_{r['cc']} ({r['spill_stores']} B stores / {r['spill_loads']} B loads)"
        for r in spilled)
    assert all(r["registers"] > 0 for r in aot_result["compiled"]), "ptxas reported no registers"


def test_every_jit_function_is_registered(aot_result):
    registered = {r["kernel"].split("[")[0] for r in aot_result["compiled"]}
    registered |= {f["kernel"].split("[")[0] for f in aot_result["failed"]}
    unregistered = _jit_kernels() - registered
    assert not unregistered, f"@triton.jit functions without register_aot(): {sorted(unregistered)}"
