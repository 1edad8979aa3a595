"""One runner for every benchmark: ``python -m benchmarks --list | --only NAME ... | --all``.

Each benchmark module exposes ``run(device: str) -> list[dict]``; rows share the keys
``case``, ``impl``, ``median_ms``, ``p20_ms``, ``p80_ms`` and add what they measure (GB/s,
TFLOP/s, % of the limit, peak memory, ratios). The runner prints one Markdown table per
benchmark, saves a PNG plot of median times, and appends both to benchmarks/RESULTS.md under a
header naming the card, date and versions (``--no-record`` leaves RESULTS.md alone).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> module; the order is the order of --all.
BENCHMARKS = {
    "grpo_loss": "benchmarks.bench_grpo_loss",
    "linear_logprob": "benchmarks.bench_linear_logprob",
    "planner": "benchmarks.bench_planner",
    "collate": "benchmarks.bench_collate",
    "train_step": "benchmarks.bench_train_step",
}


def available() -> dict[str, str]:
    return {k: v for k, v in BENCHMARKS.items() if (HERE / (v.split(".")[-1] + ".py")).exists()}


def plot(name: str, rows: list[dict], device: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot)")
        return None
    timed = [r for r in rows if isinstance(r.get("median_ms"), (int, float))]
    if not timed:
        return None
    cases = list(dict.fromkeys(str(r.get("case", "")) for r in timed))
    impls = list(dict.fromkeys(str(r.get("impl", "")) for r in timed))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases) * max(1, len(impls)) / 2), 4))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys, lo, hi = [], [], [], []
        for i, case in enumerate(cases):
            for r in timed:
                if str(r.get("case", "")) == case and str(r.get("impl", "")) == impl:
                    xs.append(i + j * width)
                    ys.append(r["median_ms"])
                    lo.append(r["median_ms"] - r.get("p20_ms", r["median_ms"]))
                    hi.append(r.get("p80_ms", r["median_ms"]) - r["median_ms"])
        ax.bar(xs, ys, width, yerr=[lo, hi], label=impl, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("median ms (20/80 bars)")
    ax.set_yscale("log")
    ax.set_title(f"{name} on {device}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = HERE / "plots" / f"{name}-{'gpu' if device.startswith('cuda') else 'cpu'}.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.common import machine_header, markdown_table, measured_limits

    p = argparse.ArgumentParser(description="staged benchmarks")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--list", action="store_true")
    g.add_argument("--only", nargs="+", metavar="NAME")
    g.add_argument("--all", action="store_true")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)

    names = available()
    if args.list:
        for n, mod in names.items():
            doc = (importlib.import_module(mod).__doc__ or "").strip().splitlines()
            print(f"{n:16s} {doc[0] if doc else ''}")
        return 0
    chosen = list(names) if args.all else args.only
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; known: {sorted(names)}")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    header = machine_header(device)
    limits = measured_limits(device)
    report = [f"## {header}\n",
              f"Limits measured in this run: GEMM {limits['gemm_tflops']:.1f} TFLOP/s, "
              f"copy {limits['copy_gbps']:.1f} GB/s.\n"]
    print(report[0] + report[1])
    failed = []
    for n in chosen:
        print(f"### {n}")
        try:
            rows = importlib.import_module(names[n]).run(device, limits=limits)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(n)
            continue
        table = markdown_table(rows)
        print(table)
        png = plot(n, rows, device)
        report.append(f"### {n}\n\n{table}")
        if png is not None:
            report.append(f"![{n}](plots/{png.name})\n")
    if not args.no_record:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write("\n" + "\n".join(report))
        print(f"appended to {HERE / 'RESULTS.md'}")
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
