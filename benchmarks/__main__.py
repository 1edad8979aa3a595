"""One runner for every benchmark: ``python -m benchmarks --list | --only NAME ... | --all``.

Each benchmark module exposes ``run(device, limits=None[, quick=False]) -> list[dict]``; rows
share the keys ``case``, ``impl``, ``median_ms``, ``p20_ms``, ``p80_ms`` and add what they
measure (GB/s, TFLOP/s, % of the limit, peak memory, ratios). The runner prints one Markdown
table per benchmark, saves a PNG plot (median times; peak memory beside them when the rows
carry it) to benchmarks/plots/, and appends the tables to benchmarks/RESULTS.md under a header
naming the card, date and versions — after each benchmark, so that a run cut short (a time
limit in ``make gpu-check``) still records what it finished. ``--no-record`` leaves RESULTS.md
alone; ``--quick`` runs small shapes (for tests and a first look: its header and plot names say
quick); ``--json PATH`` also writes every row as JSON; ``--plot-dir`` puts the PNGs elsewhere.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> module; the order is the order of --all.
BENCHMARKS = {
    "grpo_loss": "benchmarks.bench_grpo_loss",
    "linear_logprob": "benchmarks.bench_linear_logprob",
    "packing": "benchmarks.bench_packing",
    "planner": "benchmarks.bench_planner",
    "collate": "benchmarks.bench_collate",
    "train_step": "benchmarks.bench_train_step",
    "rollout": "benchmarks.bench_rollout",
    "rollout_at_scale": "benchmarks.bench_rollout_at_scale",
    "paged_decode": "benchmarks.bench_paged_decode",
}
MEMORY_KEYS = ("peak_mb", "peak_extra_mb", "peak_rss_mb", "peak_gpu_mb")  # first present is plotted


def available() -> dict[str, str]:
    return {k: v for k, v in BENCHMARKS.items() if (HERE / (v.split(".")[-1] + ".py")).exists()}


def summary_line(module: str) -> str:
    """The first sentence of a module's docstring (its first paragraph, joined), without importing it."""
    import ast

    path = HERE / (module.split(".")[-1] + ".py")
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def plot(name: str, rows: list[dict], device: str, *, quick: bool = False, out_dir: Path | None = None) -> Path | None:
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
    mem_key = next((k for k in MEMORY_KEYS if any(isinstance(r.get(k), (int, float)) for r in timed)), None)

    def label(r):
        case = str(r.get("case", ""))
        case = case if len(case) <= 44 else case[:42] + "…"
        return case + (f" [{r['pass']}]" if r.get("pass") else "")

    cases = list(dict.fromkeys(label(r) for r in timed))
    impls = list(dict.fromkeys(str(r.get("impl", "")) for r in timed))
    panels = [("median_ms", "median ms (bars: 20/80 %)")] + ([(mem_key, f"{mem_key} (MiB)")] if mem_key else [])
    width_in = max(6.0, 0.9 * len(cases) * max(1, len(impls)) / 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in * len(panels), 4.2), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, (key, ylabel) in zip(axes[0], panels):
        for j, impl in enumerate(impls):
            xs, ys, lo, hi = [], [], [], []
            for i, case in enumerate(cases):
                for r in timed:
                    v = r.get(key)
                    if label(r) == case and str(r.get("impl", "")) == impl and isinstance(v, (int, float)):
                        xs.append(i + j * width)
                        ys.append(v)
                        if key == "median_ms":
                            lo.append(max(0.0, v - r.get("p20_ms", v)))
                            hi.append(max(0.0, r.get("p80_ms", v) - v))
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi] if lo else None, label=impl, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=25, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        vals = [r[key] for r in timed if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if key == "median_ms" and vals and max(vals) > 10 * min(vals):
            ax.set_yscale("log")   # times that span orders of magnitude; otherwise (and memory) from 0
        ax.legend(fontsize=7)
    fig.suptitle(f"{name} on {device}{' (quick)' if quick else ''}", fontsize=10)
    fig.tight_layout()
    out = (out_dir or HERE / "plots") / f"{name}-{'gpu' if device.startswith('cuda') else 'cpu'}{'-quick' if quick else ''}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _record(text: str) -> None:
    with open(HERE / "RESULTS.md", "a") as f:
        f.write(text)


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.common import machine_header, markdown_table, measured_limits

    p = argparse.ArgumentParser(prog="python -m benchmarks", description="staged benchmarks")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--list", action="store_true", help="list the benchmarks")
    g.add_argument("--only", nargs="+", metavar="NAME", help="run these benchmarks")
    g.add_argument("--all", action="store_true", help="run every benchmark")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--json", metavar="PATH", help="also write every row (and the header) as JSON")
    p.add_argument("--plot-dir", metavar="DIR", default=None, help="where the PNGs go (default benchmarks/plots)")
    args = p.parse_args(argv)

    names = available()
    if args.list:
        for n, mod in names.items():
            print(f"{n:16s} {summary_line(mod)}")
        return 0
    chosen = list(names) if args.all else args.only
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; known: {sorted(names)}")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU on this machine")
    t_start = time.perf_counter()
    header = machine_header(device) + (" — quick (small shapes)" if args.quick else "")
    limits = measured_limits(device)
    intro = (f"## {header}\n\n`python -m benchmarks {' '.join(sys.argv[1:] if argv is None else argv)}`. "
             f"Limits measured in this run: GEMM {limits['gemm_tflops']:.3g} TFLOP/s "
             f"({'bf16 8192³' if device.startswith('cuda') else 'fp32 1024³'}), "
             f"copy {limits['copy_gbps']:.3g} GB/s (read + write).\n")
    print(intro)
    if not args.no_record:
        _record("\n" + intro)
    failed, dump = [], {"header": header, "limits": limits, "benchmarks": {}}
    for n in chosen:
        print(f"### {n}", flush=True)
        t0 = time.perf_counter()
        try:
            fn = importlib.import_module(names[n]).run
            kwargs = {"limits": limits}
            if "quick" in inspect.signature(fn).parameters:
                kwargs["quick"] = args.quick
            rows = fn(device, **kwargs)
        except ModuleNotFoundError as exc:   # an optional dependency (transformers, trl, ...) is missing
            print(f"skipped: {exc}\n", flush=True)
            dump["benchmarks"][n] = {"seconds": time.perf_counter() - t0, "rows": [], "skipped": str(exc)}
            if not args.no_record:
                _record(f"\n### {n}\n\nskipped: {exc}\n")
            continue
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(n)
            if not args.no_record:
                _record(f"\n### {n}\n\nFAILED (see the run's log).\n")
            continue
        secs = time.perf_counter() - t0
        table = markdown_table(rows)
        print(table)
        png = plot(n, rows, device, quick=args.quick, out_dir=Path(args.plot_dir) if args.plot_dir else None)
        print(f"({n}: {secs:.0f} s{f', plot {png}' if png else ''})\n", flush=True)
        dump["benchmarks"][n] = {"seconds": secs, "rows": rows}
        if args.json:   # after each benchmark: a run cut short still leaves what it finished
            Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
        if not args.no_record:
            link = f"\n![{n}]({os.path.relpath(png, HERE)})\n" if png else ""
            _record(f"\n### {n} ({secs:.0f} s)\n\n{table}{link}")
    total = time.perf_counter() - t_start
    print(f"all done in {total:.0f} s" + (f"; appended to {HERE / 'RESULTS.md'}" if not args.no_record else ""))
    if args.json:
        dump["seconds"] = total
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
