"""The paper's ablation on one budget: staged vs merged vs caption-SFT-then-RL.

    python -m staged.ablation [--out DIR] [--seed S] [--quick] [--eval-n N] [key.sub=value ...]

key.sub=value overrides go to every method's training run (e.g. embedded_dir=..., cpu_threads=2).

Three recipes, each trained as its own process (``python -m staged.train --config ...``: fresh
state, nothing shared but the embedded model's initial weights, which are built from the seed):

    staged       staged/configs/default.toml      perception RL -> textual RL -> visual RL
    merged       staged/configs/merged.toml       all three stages' data in one shuffled RL run,
                                                  the same GRPO steps, warm-up steps and rollouts
    caption_sft  staged/configs/caption_sft.toml  caption SFT (instead of perception RL) ->
                                                  textual RL -> visual RL

Then every final model (the last stage's HF export) is evaluated with ``staged.eval.evaluate`` on
the same held-out synthetic sets (perception, textual, visual; generated with seed
``S + EVAL_SEED_OFFSET``, disjoint from every training seed ``S + 1000 * stage``), greedy, and the
paper-style table is printed:

    | method | perception (%) | textual (%) | visual (%) | average (%) | format (%) | tokens | train (s) |

--out gets ablation.json (settings, per-method eval metrics and training summaries), ablation.md
(the table), ablation.png (accuracy per eval set per method, and mean response length), and one
folder per method with its training outputs (metrics.jsonl, curves.png, hf/, train.log) and
eval/ (results.json, results.md, completions.jsonl).

--quick shrinks every stage's steps by QUICK_SCALE (a smoke test of the whole pipeline, minutes
-> seconds); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

METHODS = (  # (name, shipped recipe, what it is)
    ("staged", "default", "perception RL -> textual RL -> visual RL"),
    ("merged", "merged", "one RL run on all stages' data, shuffled"),
    ("caption_sft", "caption_sft", "caption SFT -> textual RL -> visual RL"),
)
EVAL_SETS = ("perception", "textual", "visual")
EVAL_SEED_OFFSET = 1_000_003  # training data uses seed + 1000 * stage index: never this
QUICK_SCALE = 1 / 40
QUICK_SAMPLES = 64  # synthetic samples per kind in --quick


# ------------------------------------------------------------------------------------------
# recipes


def quick_overrides(cfg, scale: float = QUICK_SCALE, num_samples: int = QUICK_SAMPLES) -> list[str]:
    """key=value overrides that shrink every stage of ``cfg`` by ``scale`` (>= 1 step each; a
    stage with a format warm-up keeps >= 1 GRPO step and, when it had >= 1, one SFT step)."""
    out = []
    for i, s in enumerate(cfg.stages):
        steps = max(1, round(s.steps * scale))
        warm = 0
        if s.type == "grpo" and s.sft_warmup_steps:
            steps = max(2, steps)
            warm = min(steps - 1, max(1, round(s.sft_warmup_steps * scale)))
        out += [f"stages.{i}.steps={steps}", f"stages.{i}.sft_warmup_steps={warm}",
                f"stages.{i}.warmup_steps={min(s.warmup_steps, 1)}"]
        if s.data.synthetic is not None:
            out.append(f"stages.{i}.data.num_samples={min(s.data.num_samples, num_samples)}")
    return out


def final_export(cfg) -> Path:
    from staged.train import export_dir

    return export_dir(cfg, len(cfg.stages) - 1, cfg.stages[-1])


# ------------------------------------------------------------------------------------------
# training (one subprocess per method)


def train_method(recipe: str, out_dir: Path, overrides: list[str], log_path: Path) -> float:
    """``python -m staged.train --config recipe output_dir=... overrides``; its output goes to
    log_path. Returns the wall time; a failed run raises with the log's tail."""
    cmd = [sys.executable, "-m", "staged.train", "--config", recipe, f"output_dir={out_dir}", "resume=never",
           "progress=false", *overrides]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"training {recipe!r} failed (exit {rc}); last lines of {log_path}:\n{tail}")
    return dt


# ------------------------------------------------------------------------------------------
# evaluation (in this process: one model at a time)


def eval_sets(seed: int, n: int) -> dict:
    from staged.data.synthetic import make_synthetic_dataset

    return {kind: make_synthetic_dataset(kind, n, seed=seed + EVAL_SEED_OFFSET) for kind in EVAL_SETS}


def evaluate_model(path: Path, datasets: dict, *, max_new_tokens: int, system_prompt: str | None, seed: int,
                   batch_size: int = 64) -> dict:
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    from staged.eval import evaluate
    from staged.models.loading import load_model_and_processor

    hf_logging.disable_progress_bar()
    # fp32 everywhere (the embedded model's numbers); CPU: one thread, as in training (cpu_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    with warnings.catch_warnings():  # the image-only processor fallback (no torchvision) is expected
        warnings.simplefilter("ignore", UserWarning)
        model, processor = load_model_and_processor(path, dtype=torch.float32, device=device)
    model.eval()
    with torch.no_grad():
        res = evaluate(model, processor, datasets, greedy=True, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, system_prompt=system_prompt, seed=seed, device=device, progress=False)
    del model
    return res


# ------------------------------------------------------------------------------------------
# reporting


def markdown_table(rows: list[dict]) -> str:
    """rows: {"method", "benchmarks": {set: metrics}, "average": metrics, "train_seconds"}."""
    head = ["method"] + [f"{k} (%)" for k in EVAL_SETS] + ["average (%)", "format (%)", "tokens", "train (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["method"]] + [f"{100 * r['benchmarks'][k]['accuracy']:.2f}" for k in EVAL_SETS]
        cells += [f"{100 * r['average']['accuracy']:.2f}", f"{100 * r['average']['format']:.2f}",
                  f"{r['average']['response_tokens']:.1f}", f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Grouped bars: accuracy per eval set (and the average) per method; mean response tokens."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = list(EVAL_SETS) + ["average"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    w = 0.8 / max(1, len(rows))
    for j, r in enumerate(rows):
        vals = [100 * r["benchmarks"][g]["accuracy"] for g in EVAL_SETS] + [100 * r["average"]["accuracy"]]
        xs = [i + (j - (len(rows) - 1) / 2) * w for i in range(len(groups))]
        bars = ax.bar(xs, vals, w, label=r["method"], color=f"C{j}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax2.bar([j], [r["average"]["response_tokens"]], 0.6, color=f"C{j}")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax2.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=20)
    ax2.set_ylabel("mean response tokens")
    ax2.set_title("response length", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------
# the command


def plan(out: str | Path, *, seed: int = 0, quick: bool = False, overrides: list[str] = (), methods=METHODS):
    """Every method's validated config and its training overrides: [(name, recipe, what, cfg, overrides)].
    A bad override fails here, before anything trains."""
    from staged.config import load_config

    plans = []
    for name, recipe, what in methods:
        common = [f"seed={seed}", *overrides]
        base = load_config(recipe, common)
        run_overrides = common + (quick_overrides(base) if quick else [])
        cfg = load_config(recipe, run_overrides + [f"output_dir={Path(out) / name}"])
        plans.append((name, recipe, what, cfg, run_overrides))
    return plans


def run(out: str | Path = "outputs/ablation", *, seed: int = 0, quick: bool = False, eval_n: int | None = None,
        overrides: list[str] = (), methods=METHODS, log=print) -> dict:
    """Train every method, evaluate each final model, write and return the comparison."""
    from staged import metrics
    from staged.eval import write_results

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eval_n = eval_n or (16 if quick else 128)
    t_all = time.perf_counter()
    datasets = eval_sets(seed, eval_n)
    rows, trained = [], []
    plans = plan(out, seed=seed, quick=quick, overrides=overrides, methods=methods)
    for i, (name, recipe, what, cfg, run_overrides) in enumerate(plans, 1):
        budget = ", ".join(f"{s.name} {s.steps}" + (f" ({s.sft_warmup_steps} sft)" if s.sft_warmup_steps else "")
                           + (" sft" if s.type == "sft" else "") for s in cfg.stages)
        log(f"[{i}/{len(plans)}] {name}: training {recipe} ({what}; steps: {budget}) ...", flush=True)
        dt = train_method(recipe, out / name, run_overrides, out / name / "train.log")
        log(f"[{i}/{len(plans)}] {name}: trained in {dt:.1f} s", flush=True)
        trained.append((name, recipe, cfg, dt))

    max_new = max(s.grpo.max_response_tokens for _, _, cfg, _ in trained for s in cfg.stages if s.type == "grpo")
    for i, (name, recipe, cfg, dt) in enumerate(trained, 1):
        t0 = time.perf_counter()
        res = evaluate_model(final_export(cfg), datasets, max_new_tokens=max_new,
                             system_prompt=cfg.stages[-1].system_prompt, seed=seed)
        write_results(res, out / name / "eval")
        records = metrics.read_jsonl(Path(cfg.output_dir) / metrics.METRICS_FILE)
        rows.append({"method": name, "recipe": recipe, "train_seconds": dt, "eval_seconds": time.perf_counter() - t0,
                     "benchmarks": res["benchmarks"], "average": res["average"],
                     "stages": [{"name": s.name, "type": s.type, "steps": s.steps,
                                 "sft_warmup_steps": s.sft_warmup_steps} for s in cfg.stages],
                     "grpo_steps": sum(1 for r in records if r.get("kind") == "grpo"),
                     "sft_steps": sum(1 for r in records if r.get("kind") == "sft"),
                     "rollouts": sum(s.batch.prompts_per_step * s.batch.group_size * (s.steps - s.sft_warmup_steps)
                                     for s in cfg.stages if s.type == "grpo"),
                     "training_summary": metrics.stage_summary(records, [s.name for s in cfg.stages])})
        acc = ", ".join(f"{k} {100 * res['benchmarks'][k]['accuracy']:.1f}%" for k in EVAL_SETS)
        log(f"[eval {i}/{len(trained)}] {name}: {acc}, average {100 * res['average']['accuracy']:.1f}% "
            f"({rows[-1]['eval_seconds']:.1f} s)", flush=True)

    table = markdown_table(rows)
    wall = time.perf_counter() - t_all
    title = (f"staged vs merged vs caption SFT (embedded default{', --quick' if quick else ''}; seed {seed}; "
             f"{eval_n} greedy samples per set)")
    result = {"settings": {"seed": seed, "quick": quick, "eval_n": eval_n, "eval_seed": seed + EVAL_SEED_OFFSET,
                           "eval_sets": list(EVAL_SETS), "greedy": True, "max_new_tokens": max_new},
              "methods": rows, "table": table, "wall_seconds": wall}
    (out / "ablation.json").write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    (out / "ablation.md").write_text(f"{title}\n\n{table}\n")
    png = plot(rows, out / "ablation.png", title)
    log("\n" + table)
    log(f"\nablation: {out / 'ablation.json'}, {out / 'ablation.md'}" + (f", {png}" if png else "")
        + f" ({wall:.0f} s)")
    return result


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m staged.ablation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/ablation", help="output folder (default outputs/ablation)")
    p.add_argument("--seed", type=int, default=0, help="run seed for all three methods (default 0)")
    p.add_argument("--quick", action="store_true", help=f"every stage x {QUICK_SCALE:g} steps: a smoke test")
    p.add_argument("--eval-n", type=int, default=None, help="samples per eval set (default 128; --quick 16)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="training overrides for every method")
    a = p.parse_args(argv)
    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must look like key.sub=value, got {bad}")
    if a.eval_n is not None and a.eval_n < 1:
        p.error(f"--eval-n must be >= 1, got {a.eval_n}")
    try:
        plan(a.out, seed=a.seed, quick=a.quick, overrides=a.overrides)
    except (ValueError, FileNotFoundError) as e:  # a bad override is the user's, not a crash
        print(f"staged.ablation: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(a.out, seed=a.seed, quick=a.quick, eval_n=a.eval_n, overrides=a.overrides)


if __name__ == "__main__":
    main()
