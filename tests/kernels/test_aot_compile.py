"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with no GPU, without spills,
with the JIT's divisibility-16 attributes, for every configuration its launcher can pick; bf16
dots of the fused log-prob lower to wgmma on sm_90 and mma.sync on sm_80; its TMA forward
(sm_90) loads through cp.async.bulk.tensor, and nothing else does.

Runs ``python -m staged.kernels.aot --json`` in a subprocess without TRITON_INTERPRET (the
interpreter's jit functions cannot be lowered). The per-kernel register/spill/shared-memory
table is printed in pytest's terminal summary. ~60 s on 2 cores.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
SM90_ONLY = {"_linear_logprob_fwd_tma_kernel"}


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
    for row in aot_result["compiled"]:   # per kernel, over its configurations (some per arch)
        archs.setdefault(row["kernel"].split("[")[0], set()).add(row["cc"])
    # Hopper-only by design: TMA descriptors; the launcher picks them on sm_90+ only
    want = {k: {90} if k in SM90_ONLY else {80, 90} for k in archs}
    missing = {k: sorted(want[k] - v) for k, v in archs.items() if want[k] - v}
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


def test_bf16_dots_lower_to_tensor_cores(aot_result):
    """The fused log-prob's bf16 GEMM tiles use wgmma on sm_90 and mma.sync on sm_80."""
    rows = [r for r in aot_result["compiled"] if r["kernel"].startswith("_linear_logprob")
            and ",bf16," in r["kernel"]]
    assert rows
    want = {90: "wgmma", 80: "mma.sync"}
    wrong = [f"{r['kernel']} sm_{r['cc']}: {r['dots']}" for r in rows if r["dots"] != want[r["cc"]]]
    assert not wrong, wrong


def test_every_launch_config_is_registered():
    """Each (arch, dtype, alignment) configuration the log-prob launcher can pick has an AOT
    entry with the same tiles, warps and stages, for that arch, with divisibility attributes."""
    import staged.kernels.aot as aot
    import staged.kernels.linear_logprob as LL

    specs = aot.registered()
    for (arch, bits, aligned), cfg in LL._LOGIT_CONFIGS.items():
        full = LL._gpu_config(arch, bits, aligned)
        mine = [s for s in specs if arch in s.archs and s.name.startswith("_linear_logprob")
                and f"sm{arch},{'bf16' if bits == '16' else 'fp32'},"
                    f"{'aligned' if aligned else 'unaligned'}" in s.name]
        kinds = {s.name.split("[")[0] for s in mine}
        assert kinds == {"_linear_logprob_fwd_kernel", "_linear_logprob_bwd_kernel",
                         "_linear_logprob_dh_kernel"}, (arch, bits, aligned, kinds)
        for s in mine:
            assert "h_ptr" in s.divisible or "dz_ptr" in s.divisible, s.name
            if s.name.startswith("_linear_logprob_dh"):
                assert (s.constexprs["BLOCK_M"], s.num_warps, s.num_stages) == (
                    full["DH_BLOCK_M"], full["DH_num_warps"], full["DH_num_stages"]), s.name
            else:
                assert (s.constexprs["BLOCK_N"], s.constexprs["BLOCK_V"], s.constexprs["BLOCK_H"],
                        s.num_warps, s.num_stages) == (cfg["BLOCK_N"], cfg["BLOCK_V"],
                                                       cfg["BLOCK_H"], cfg["num_warps"],
                                                       cfg["num_stages"]), s.name
            assert ("stride_wv" in s.divisible) == aligned, s.name


def test_tma_forward_uses_tma_and_wgmma(aot_result):
    """The TMA forward's loads are TMA bulk tensor copies and its dots wgmma (sm_90), with and
    without bias, with logits rounded to bf16 or not, and for 16-byte (not 32-byte) row strides;
    no other kernel uses TMA."""
    rows = [r for r in aot_result["compiled"] if r["kernel"].startswith("_linear_logprob_fwd_tma")]
    assert len(rows) == 5, [r["kernel"] for r in rows]
    assert all(r["cc"] == 90 and r["dots"] == "wgmma" and r["tma"] for r in rows), rows
    others = [r["kernel"] for r in aot_result["compiled"] if r["tma"] and r not in rows]
    assert not others, others


def test_tma_launch_config_is_registered():
    """The TMA forward's AOT entries carry the launcher's tiles, warps and stages, sm_90 only."""
    import staged.kernels.aot as aot
    import staged.kernels.linear_logprob as LL

    specs = [s for s in aot.registered() if s.name.startswith("_linear_logprob_fwd_tma")]
    cfg = LL._TMA_CONFIG
    assert specs
    for s in specs:
        assert s.archs == (90,), s.name
        assert (s.constexprs["BLOCK_N"], s.constexprs["BLOCK_V"], s.constexprs["BLOCK_H"],
                s.num_warps, s.num_stages) == (cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_H"],
                                               cfg["num_warps"], cfg["num_stages"]), s.name
        assert "h_ptr" in s.divisible and "w_ptr" in s.divisible, s.name
