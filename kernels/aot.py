"""Ahead-of-time compilation of every Triton kernel for real GPU targets, with no GPU.

Each kernel module registers its ``@triton.jit`` functions through :func:`register_aot`: one
entry per launch configuration its launcher can pick (tiles, warps, stages, constexpr flags),
for the archs that configuration is picked on. ``python -m staged.kernels.aot`` compiles each
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``), runs Triton's own
``ptxas -v`` over the PTX and reports registers, spills, shared memory and how the dots were
lowered (``wgmma`` on sm_90, ``mma.sync`` on sm_80, ``fma`` for fp32 "ieee" dots, ``-`` without
dots) and whether its loads use TMA (``cp.async.bulk.tensor`` in the PTX: the ``tma``
column). A kernel that does not compile, or spills, or whose bf16 dots miss the tensor cores,
fails ``tests/kernels/test_aot_compile.py``.

The compile sees what the JIT sees at a real launch: the JIT specialises every pointer argument
whose address, and every integer whose value, is a multiple of 16 (``tt.divisibility = 16``),
and that decides vectorised / async loads and so registers and spills. Each registration names
the arguments that are divisible at its real launches (``divisible=``); without them the gate
would check a different kernel than the one that runs (176 vs 152 registers, issue 14).

Must run in a process without ``TRITON_INTERPRET=1``: under the interpreter ``triton.jit``
returns an interpreted function that cannot be lowered, which is why the test shells out.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

# Modules that hold Triton kernels. A new kernel file adds its name here, which is what
# makes "every kernel is AOT-compiled" checkable: the test also scans kernels/ for @triton.jit.
KERNEL_MODULES = [
    "staged.kernels.grpo_loss",
    "staged.kernels.linear_logprob",
    "staged.kernels.packing",
    "staged.kernels.paged_decode",
]


@dataclass(frozen=True)
class AotSpec:
    name: str
    fn: Any
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple = (80, 90)
    divisible: tuple = ()


_REGISTRY: dict[str, AotSpec] = {}


def register_aot(fn, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
                 num_stages: int = 3, name: str | None = None, archs=(80, 90),
                 divisible=None) -> None:
    """Register ``fn`` for AOT compilation. ``signature`` maps every argument name to a Triton
    type string (``"*fp32"``, ``"i32"``, ``"fp32"``, or ``"constexpr"``); ``constexprs`` gives
    the constexpr values of the launch. ``archs``: the compute capabilities on which the
    launcher picks this configuration. ``divisible``: argument names the JIT would mark
    divisible by 16 at a real launch; default: every pointer (fresh allocations are 256-byte
    aligned)."""
    constexprs = dict(constexprs or {})
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    if divisible is None:
        divisible = [k for k, v in signature.items() if v.startswith("*")]
    unknown = [k for k in divisible if k not in signature]
    if unknown:
        raise ValueError(f"register_aot({name or fn}): divisible names {unknown} are not arguments")
    key = name or getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__")
    _REGISTRY[key] = AotSpec(key, fn, sig, constexprs, num_warps, num_stages, tuple(archs),
                             tuple(divisible))


def registered() -> list[AotSpec]:
    # Under `python -m staged.kernels.aot` this file runs as __main__, while kernel modules
    # register into the imported staged.kernels.aot: always read that module's registry.
    registry = importlib.import_module("staged.kernels.aot")._REGISTRY
    for mod in KERNEL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # a real import error inside an existing module
                raise
    return sorted(registry.values(), key=lambda s: s.name)


def _ptxas_path(cc: int) -> str:
    # Triton >= 3.9 pairs newer archs with a newer ptxas (the PTX it emits for sm_90 has a
    # .version the older bundled ptxas rejects), so ask Triton which one it uses for this cc.
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cc).path
    except Exception:  # noqa: BLE001 - older Triton layouts
        pass
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - older Triton layouts
        import triton.backends.nvidia as nv

        cand = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        if os.path.exists(cand):
            return cand
        found = shutil.which("ptxas")
        if not found:
            raise RuntimeError("no ptxas found (Triton ships one under backends/nvidia/bin)")
        return found


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_spec(spec: AotSpec, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # The attribute format the JIT itself builds (backend.parse_attr("D"), triton >= 3.3).
    attrs = {(spec.fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in spec.divisible}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = os.path.join(tmp, "k.ptx")
        with open(ptx_file, "w") as f:
            f.write(ptx)
        arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
        out = subprocess.run([_ptxas_path(cc), "-v", f"--gpu-name={arch}", ptx_file,
                              "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    if "wgmma.mma_async" in ptx:
        dots = "wgmma"
    elif "mma.sync" in ptx:
        dots = "mma.sync"
    elif _has_dot(compiled):
        dots = "fma"
    else:
        dots = "-"
    # TMA: tensor-descriptor loads lowered to the bulk tensor copy (sm_90); sm_80 has none
    tma = "cp.async.bulk.tensor" in ptx
    regs = _RE_REGS.search(log)
    spills = _RE_SPILL.search(log)
    return {
        "kernel": spec.name,
        "cc": cc,
        "registers": int(regs.group(1)) if regs else -1,
        "spill_stores": int(spills.group(1)) if spills else -1,
        "spill_loads": int(spills.group(2)) if spills else -1,
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "dots": dots,
        "tma": tma,
        "triton": triton.__version__,
    }


def _has_dot(compiled) -> bool:
    ttir = compiled.asm.get("ttir", "")
    return "tt.dot" in ttir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--only", nargs="*", help="kernel names to compile")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    rows, failures = [], []
    for spec in registered():
        if args.only and spec.name not in args.only:
            continue
        for cc in args.arch:
            if cc not in spec.archs:
                continue
            try:
                rows.append(compile_spec(spec, cc))
            except Exception as exc:  # noqa: BLE001 - reported, then the exit code says it
                failures.append({"kernel": spec.name, "cc": cc, "error": f"{type(exc).__name__}: {exc}"})
    if args.json:
        print(json.dumps({"compiled": rows, "failed": failures}))
    else:
        import triton

        print(f"triton {triton.__version__}")
        print(f"{'kernel':72s} {'cc':>3s} {'regs':>5s} {'spill st/ld':>12s} {'smem B':>7s} "
              f"{'w/s':>4s} {'dots':>8s} {'tma':>4s}")
        for r in rows:
            print(f"{r['kernel']:72s} {r['cc']:>3d} {r['registers']:>5d} "
                  f"{r['spill_stores']:>5d}/{r['spill_loads']:<6d} {r['shared_bytes']:>7d} "
                  f"{r['num_warps']:>2d}/{r['num_stages']:<1d} {r['dots']:>8s} "
                  f"{'yes' if r['tma'] else '-':>4s}")
        for f in failures:
            print(f"FAILED {f['kernel']} sm_{f['cc']}: {f['error']}")
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    return 1 if failures or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
