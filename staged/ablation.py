"""The paper's ablations on one budget, over seeds: staged vs merged vs caption-SFT-then-RL, and
the capability x difficulty 2x2.

    python -m staged.ablation [--arms staged,merged,caption_sft] [--seeds 0,1,2] [--out DIR]
                              [--jobs J] [--eval-n N] [--quick] [--restart] [key.sub=value ...]
    python -m staged.ablation --arms merged,merged_e2h,staged,staged_e2h      # the 2x2
    python -m staged.ablation --recipes paper_qwen2_5_vl,paper_merged_qwen2_5_vl,paper_caption_sft_qwen2_5_vl \\
        model=/ckpt/Qwen2.5-VL-7B-Instruct --eval-files wemath.jsonl mathvista.parquet \\
        --nproc-per-node 8 --seeds 1 --out runs/ablation

An *arm* is a recipe, optionally with every RL stage's curriculum replaced (``RECIPE@easy_to_hard``).
The embedded arms (``--arms``):

    staged       default                   perception RL -> textual RL -> visual RL
    merged       merged                    the same format warm-up, then one shuffled RL stage
                                           on all three stages' data (same GRPO steps, rollouts)
    caption_sft  caption_sft               the same format warm-up, caption SFT in place of the
                                           perception RL, then the default's textual and visual RL
    staged_e2h   default@easy_to_hard      staged + difficulty curriculum (by pass_rate)
    merged_e2h   merged@easy_to_hard       merged + difficulty curriculum

``--recipes A,B@easy_to_hard,...`` adds arms from any recipe (shipped name or TOML path; the arm
is named after it). key.sub=value overrides go to every arm's training run.

Each (arm, seed) is one training process (``python -m staged.train``, or ``torchrun
--nproc-per-node N -m staged.train`` with ``--nproc-per-node``) in ``OUT/ARM/seedS``, with the
trainer's stage-end evaluation switched on (greedy, the same held-out sets for every arm of a
seed: the synthetic perception / textual / visual sets, seed ``S + 1,000,003``, disjoint from
every training seed; or the ``--eval-files`` benchmarks). Its last record is the arm's result;
all of them (and in-stage validation records, when a recipe logs them) are the eval curves. A
finished (arm, seed) leaves ``arm.json``: a rerun with the same settings skips it, an interrupted
one resumes from the trainer's newest checkpoint (``--restart`` starts every run over).

The table: the target (visual reasoning: the synthetic ``visual`` set, or every --eval-files
benchmark) first, then its mean response length and the relative change vs the baseline arm
(the paper: -20.8% vs merged), then format, and the other sets as diagnostics. Every number is
mean +- sample std over seeds; differences vs the baseline (``--baseline``, default merged) are
paired by seed. OUT gets ablation.json (settings, every run's result and eval records),
ablation.md (the tables), ablation.png (every seed's target accuracy, response length and
paired difference) and ablation-curves.png (eval accuracy per set over training steps, per arm
and seed: forgetting shows as a drop after a stage boundary).

--quick shrinks every stage's steps by QUICK_SCALE (a smoke test of the pipeline, minutes ->
seconds); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name -> (recipe, curriculum override or None, what it is)
ARMS = {
    "staged": ("default", None, "perception RL -> textual RL -> visual RL"),
    "merged": ("merged", None, "one RL stage on all stages' data, shuffled"),
    "caption_sft": ("caption_sft", None, "caption SFT -> textual RL -> visual RL"),
    "staged_e2h": ("default", "easy_to_hard", "staged, each RL stage easy -> hard by pass_rate"),
    "merged_e2h": ("merged", "easy_to_hard", "merged, easy -> hard by pass_rate"),
}
DEFAULT_ARMS = ("staged", "merged", "caption_sft")
DEFAULT_SEEDS = (0, 1, 2)
# The paper's capability x difficulty table: (staging, difficulty curriculum) -> arm
GRID = {("merged", "shuffle"): "merged", ("merged", "easy_to_hard"): "merged_e2h",
        ("staged", "shuffle"): "staged", ("staged", "easy_to_hard"): "staged_e2h"}
EVAL_SETS = ("visual", "perception", "textual")  # the target first
TARGET = ("visual",)
EVAL_SEED_OFFSET = 1_000_003  # training data uses seed + 1000 * stage index: never this
QUICK_SCALE = 1 / 40
QUICK_SAMPLES = 64  # synthetic samples per kind in --quick
RESULT_FILE = "arm.json"


# ------------------------------------------------------------------------------------------
# arms and their runs


def parse_arm(spec: str) -> tuple[str, str, str | None, str]:
    """An --arms name or a --recipes spec ``RECIPE[@CURRICULUM]`` -> (name, recipe, curriculum, what)."""
    if spec in ARMS:
        recipe, cur, what = ARMS[spec]
        return spec, recipe, cur, what
    recipe, _, cur = spec.partition("@")
    if cur and cur not in ("shuffle", "easy_to_hard"):
        raise ValueError(f"arm {spec!r}: curriculum after '@' must be shuffle or easy_to_hard, got {cur!r}")
    p = Path(recipe)
    name = p.stem if p.suffix == ".toml" else recipe
    if p.is_file():
        recipe = str(p.resolve())  # the training process may run elsewhere (torchrun): an absolute path
    name = name + ("_e2h" if cur == "easy_to_hard" else "_shuffle" if cur == "shuffle" else "")
    return name, recipe, cur or None, f"recipe {recipe}" + (f", curriculum {cur}" if cur else "")


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


def curriculum_overrides(cfg, curriculum: str | None) -> list[str]:
    """Every stage with RL steps gets ``curriculum`` (a GRPO stage's format warm-up shares its
    stage's order); SFT-only stages keep theirs, so arms of one recipe share their warm-up."""
    if curriculum is None:
        return []
    return [f"stages.{i}.curriculum={curriculum}" for i, s in enumerate(cfg.stages)
            if s.type == "grpo" and s.steps > s.sft_warmup_steps]


def eval_overrides(eval_files: list[str], eval_n: int, max_new_tokens: int) -> list[str]:
    """The trainer's stage-end evaluation, the same for every arm of a seed."""
    if eval_files:
        files = [str(Path(f).resolve()) for f in eval_files]
        return ["eval.synthetic=[]", "eval.files=" + json.dumps(files), f"eval.n={eval_n}",
                f"eval.max_new_tokens={max_new_tokens}", "eval.stages=all"]
    return ["eval.synthetic=" + json.dumps(list(EVAL_SETS)), "eval.files=[]", f"eval.n={eval_n}",
            f"eval.max_new_tokens={max_new_tokens}", "eval.stages=all"]


def plan(out: str | Path, *, arms=DEFAULT_ARMS, seeds=DEFAULT_SEEDS, quick: bool = False, overrides=(),
         eval_files=(), eval_n: int | None = None, nproc_per_node: int = 0) -> list[dict]:
    """Every (arm, seed) run: its validated config and the training overrides. A bad arm, recipe
    or override fails here, before anything trains."""
    from staged.config import load_config

    out = Path(out)
    specs = [parse_arm(a) for a in arms]
    names = [s[0] for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"arms named twice: {dup}")
    eval_n = eval_n if eval_n is not None else (0 if eval_files else 16 if quick else 128)
    # one response-token limit for every arm's evaluation: the largest any arm trains with
    base = {}
    for name, recipe, cur, _ in specs:
        base[name] = load_config(recipe, [f"seed={seeds[0]}", *overrides])
    max_new = max(s.grpo.max_response_tokens for c in base.values() for s in c.stages if s.type == "grpo")
    runs = []
    for name, recipe, cur, what in specs:
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            common = [f"seed={seed}"]
            if base[name].model == "embedded":  # built from the seed: one dir per seed beside it (train.embedded_path)
                common.append(f"embedded_dir={out / 'embedded' / 'model'}")
            common += list(overrides)
            cfg0 = load_config(recipe, common)
            ov = common + (quick_overrides(cfg0) if quick else []) + curriculum_overrides(cfg0, cur) \
                + eval_overrides(list(eval_files), eval_n, max_new) + [f"output_dir={run_dir}"]
            cfg = load_config(recipe, ov)
            runs.append({"arm": name, "recipe": recipe, "curriculum": cur, "what": what, "seed": seed,
                         "dir": run_dir, "cfg": cfg, "overrides": ov, "nproc_per_node": nproc_per_node,
                         "fingerprint": {"recipe": recipe, "curriculum": cur, "overrides": ov,
                                         "nproc_per_node": nproc_per_node}})
    return runs


def train_command(recipe: str, overrides: list[str], *, resume: str, nproc_per_node: int = 0) -> list[str]:
    """``python -m staged.train`` (or torchrun with nproc_per_node >= 1) for one run."""
    launcher = [sys.executable, "-m", "staged.train"]
    if nproc_per_node:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc_per_node}", "-m", "staged.train"]
    return [*launcher, "--config", recipe, *overrides, f"resume={resume}", "progress=true"]


def train_run(run: dict, *, restart: bool) -> float:
    """One training process, its output in RUN_DIR/train.log. Returns the wall time; a failed run
    raises with the log's tail."""
    cmd = train_command(run["recipe"], run["overrides"], resume="never" if restart else "auto",
                        nproc_per_node=run["nproc_per_node"])
    log_path = run["dir"] / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, run["cfg"].cpu_threads)))
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    dt = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"training arm {run['arm']!r} seed {run['seed']} failed (exit {rc}); "
                           f"last lines of {log_path}:\n{tail}")
    return dt


def eval_records(run_dir: Path) -> list[dict]:
    """Every kind="eval" record of a run (stage ends, and in-stage validation when logged), by step."""
    from staged import metrics

    recs = [r for r in metrics.read_jsonl(Path(run_dir) / metrics.METRICS_FILE) if r.get("kind") == "eval"]
    return sorted(recs, key=lambda r: (r["step"], r.get("stage", 0)))


def benchmarks_of(record: dict) -> list[str]:
    return [k.split("/")[1] for k in record if k.startswith("eval/") and k.endswith("/accuracy")
            and k.split("/")[1] != "average"]


def collect(run: dict, seconds: float | None) -> dict:
    """The finished run's result: its final eval (the last eval record of the last stage)."""
    from staged import metrics

    cfg = run["cfg"]
    recs = eval_records(run["dir"])
    last = len(cfg.stages) - 1
    finals = [r for r in recs if r.get("stage") == last]
    if not finals:
        raise RuntimeError(f"arm {run['arm']!r} seed {run['seed']}: no eval record of its last stage in "
                           f"{run['dir'] / metrics.METRICS_FILE}")
    final = finals[-1]
    records = metrics.read_jsonl(run["dir"] / metrics.METRICS_FILE)
    bench = {b: {k: final[f"eval/{b}/{k}"] for k in ("accuracy", "format", "response_tokens", "truncated")}
             for b in benchmarks_of(final)}
    return {"arm": run["arm"], "seed": run["seed"], "recipe": run["recipe"], "curriculum": run["curriculum"],
            "what": run["what"], "fingerprint": run["fingerprint"], "train_seconds": seconds,
            "benchmarks": bench, "final_step": final["step"],
            "stages": [{"name": s.name, "type": s.type, "steps": s.steps, "sft_warmup_steps": s.sft_warmup_steps,
                        "curriculum": s.curriculum, "end_step": sum(t.steps for t in cfg.stages[:i + 1])}
                       for i, s in enumerate(cfg.stages)],
            "grpo_steps": sum(1 for r in records if r.get("kind") == "grpo"),
            "sft_steps": sum(1 for r in records if r.get("kind") == "sft"),
            "rollouts": sum(s.batch.prompts_per_step * s.batch.group_size * (s.steps - s.sft_warmup_steps)
                            for s in cfg.stages if s.type == "grpo"),
            "training_summary": metrics.stage_summary(records, [s.name for s in cfg.stages]),
            "eval_records": [{k: v for k, v in r.items() if k == "step" or k.startswith("eval/")
                              or k in ("stage", "stage_name", "stage_step")} for r in recs]}


def finished(run: dict) -> dict | None:
    """The saved result of a finished run with the same settings; None when not finished. A run
    finished with other settings is an error: its numbers would be mixed into the table."""
    path = run["dir"] / RESULT_FILE
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    if res.get("fingerprint") != json.loads(json.dumps(run["fingerprint"])):
        raise ValueError(f"{path}: arm {run['arm']!r} seed {run['seed']} was run with other settings "
                         f"({res.get('fingerprint')}, now {run['fingerprint']}); use --restart or another --out")
    return res


# ------------------------------------------------------------------------------------------
# statistics and tables


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan with fewer than two values)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt(m: float, s: float, digits: int = 1, sign: bool = False) -> str:
    if not math.isfinite(m):
        return "—"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(m) + (f" ± {s:.{digits}f}" if math.isfinite(s) else "")


def target_value(res: dict, target: list[str], key: str) -> float:
    return sum(res["benchmarks"][b][key] for b in target) / len(target)


def summarize(results: list[dict], arms: list[str], seeds: list[int], target: list[str], baseline: str | None) -> dict:
    """Per arm: mean/std over seeds of the target accuracy, tokens, format and every benchmark;
    paired differences vs the baseline (accuracy in points, tokens as a relative change)."""
    by = {(r["arm"], r["seed"]): r for r in results}
    benches = list(results[0]["benchmarks"]) if results else []
    out = {}
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        row = {"seeds": [r["seed"] for r in rs],
               "target": [100 * target_value(r, target, "accuracy") for r in rs],
               "tokens": [target_value(r, target, "response_tokens") for r in rs],
               "format": [100 * target_value(r, target, "format") for r in rs],
               "train_seconds": [r["train_seconds"] for r in rs if r.get("train_seconds") is not None],
               "benchmarks": {b: [100 * r["benchmarks"][b]["accuracy"] for r in rs] for b in benches}}
        if baseline is not None and arm != baseline:
            pairs = [(by[(arm, s)], by[(baseline, s)]) for s in seeds if (arm, s) in by and (baseline, s) in by]
            row["paired_seeds"] = [a["seed"] for a, _ in pairs]
            row["diff"] = [100 * (target_value(a, target, "accuracy") - target_value(b, target, "accuracy"))
                           for a, b in pairs]
            row["tokens_rel"] = [100 * (target_value(a, target, "response_tokens")
                                        / max(1e-9, target_value(b, target, "response_tokens")) - 1)
                                 for a, b in pairs]
        out[arm] = row
    return out


def markdown_tables(summary: dict, target: list[str], baseline: str | None, results: list[dict]) -> str:
    """The main table (mean ± std over seeds), the paired differences, the 2x2 when its four arms
    ran, the per-seed table and the stage-end eval curve table."""
    tname = target[0] if len(target) == 1 else "target avg"
    diag = [b for b in (list(results[0]["benchmarks"]) if results else []) if b not in target]
    per_target = target if len(target) > 1 else []
    bl = baseline or "—"
    head = ["arm", "seeds", f"{tname} (%)", *[f"{b} (%)" for b in per_target], f"Δ {tname} vs {bl} (pp)",
            "tokens", f"Δ tokens vs {bl}", "format (%)", *[f"{b} (%)" for b in diag], "train (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for arm, row in summary.items():
        if not row["seeds"]:
            continue
        cells = [arm, str(len(row["seeds"])), fmt(*mean_std(row["target"]), 2)]
        cells += [fmt(*mean_std(row["benchmarks"][b]), 2) for b in per_target]
        cells += [fmt(*mean_std(row["diff"]), 2, sign=True) if "diff" in row else "0",
                  fmt(*mean_std(row["tokens"]), 1),
                  (fmt(*mean_std(row["tokens_rel"]), 1, sign=True) + "%") if "tokens_rel" in row else "0%",
                  fmt(*mean_std(row["format"]), 1)]
        cells += [fmt(*mean_std(row["benchmarks"][b]), 2) for b in diag]
        cells.append(fmt(*mean_std(row["train_seconds"]), 0))
        lines.append("| " + " | ".join(cells) + " |")
    parts = ["\n".join(lines)]

    if baseline is not None:
        pl = [f"Paired by seed, {tname} accuracy minus {baseline}'s (pp):", ""]
        for arm, row in summary.items():
            if "diff" not in row or not row["diff"]:
                continue
            m, s = mean_std(row["diff"])
            each = ", ".join(f"seed {sd}: {d:+.2f}" for sd, d in zip(row["paired_seeds"], row["diff"]))
            pos = sum(d > 0 for d in row["diff"])
            neg = sum(d < 0 for d in row["diff"])
            pl.append(f"- {arm} − {baseline}: {fmt(m, s, 2, sign=True)} ({each}; {pos} of {len(row['diff'])} "
                      f"seeds > 0, {neg} < 0)")
        parts.append("\n".join(pl))

    if all(a in summary and summary[a]["seeds"] for a in GRID.values()):
        g = ["Capability × difficulty (the paper's 2×2; " + tname + " accuracy, %, mean ± std over seeds):", "",
             "| | shuffle | easy_to_hard (pass_rate) |", "|---|---:|---:|"]
        for staging in ("merged", "staged"):
            g.append(f"| {staging} | " + " | ".join(fmt(*mean_std(summary[GRID[(staging, c)]]["target"]), 2)
                                                 for c in ("shuffle", "easy_to_hard")) + " |")
        parts.append("\n".join(g))

    benches = list(results[0]["benchmarks"]) if results else []
    ps = ["Every seed:", "", "| arm | seed | " + " | ".join(f"{b} (%)" for b in benches)
          + " | tokens | format (%) | train (s) |", "|---|---:|" + "---:|" * (len(benches) + 3)]
    for r in sorted(results, key=lambda r: (list(summary).index(r["arm"]), r["seed"])):
        ps.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(f"{100 * r['benchmarks'][b]['accuracy']:.2f}"
                                                              for b in benches)
                  + f" | {target_value(r, target, 'response_tokens'):.1f} | "
                  + f"{100 * target_value(r, target, 'format'):.1f} | "
                  + (f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "—") + " |")
    parts.append("\n".join(ps))
    parts.append(curve_table(results, benches))
    return "\n\n".join(parts)


def curve_table(results: list[dict], benches: list[str]) -> str:
    """Eval accuracy after each stage (and at in-stage validations), mean over seeds: forgetting
    shows as a drop in an earlier stage's set after a later stage."""
    rows: dict = {}
    for r in results:
        for rec in r["eval_records"]:
            key = (r["arm"], rec["step"])
            rows.setdefault(key, {"stage": rec.get("stage_name", ""), "vals": []})["vals"].append(rec)
    lines = ["Eval curves (greedy; mean over seeds at each evaluated step):", "",
             "| arm | step | after / in stage | " + " | ".join(f"{b} (%)" for b in benches) + " | format (%) |",
             "|---|---:|---|" + "---:|" * (len(benches) + 1)]
    order = list(dict.fromkeys(r["arm"] for r in results))
    for (arm, step), v in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        accs = [mean_std([100 * rec.get(f"eval/{b}/accuracy", float("nan")) for rec in v["vals"]])[0] for b in benches]
        form = mean_std([100 * rec.get("eval/average/format", float("nan")) for rec in v["vals"]])[0]
        lines.append(f"| {arm} | {step} | {v['stage']} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {form:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# plots


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_summary(summary: dict, target: list[str], baseline: str | None, path: Path, title: str) -> Path | None:
    """Target accuracy, response length and the paired difference vs the baseline per arm: a bar
    for the mean, a dot per seed, each seed's dots joined across arms."""
    plt = _plt()
    if plt is None:
        return None
    arms = [a for a, r in summary.items() if r["seeds"]]
    tname = target[0] if len(target) == 1 else "target avg"
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    seeds = sorted({s for a in arms for s in summary[a]["seeds"]})
    for ax, key, ylabel in ((axes[0], "target", f"{tname} accuracy (%)"), (axes[1], "tokens", "mean response tokens")):
        for j, a in enumerate(arms):
            m, s = mean_std(summary[a][key])
            ax.bar([j], [m], 0.6, color=f"C{j}", alpha=0.5, yerr=[s] if math.isfinite(s) else None, capsize=3)
        for k, sd in enumerate(seeds):
            xs = [j for j, a in enumerate(arms) if sd in summary[a]["seeds"]]
            ys = [summary[arms[j]][key][summary[arms[j]]["seeds"].index(sd)] for j in xs]
            ax.plot(xs, ys, "o-", color="k", alpha=0.35 + 0.5 * k / max(1, len(seeds)), markersize=4, linewidth=0.8,
                    label=f"seed {sd}")
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    axes[0].set_title(title, fontsize=8)
    ax = axes[2]
    others = [a for a in arms if "diff" in summary[a]]
    for j, a in enumerate(others):
        ds = summary[a]["diff"]
        m, s = mean_std(ds)
        ax.bar([j], [m], 0.6, color=f"C{arms.index(a)}", alpha=0.5)
        ax.scatter([j] * len(ds), ds, color="k", s=14, zorder=3)
        for sd, d in zip(summary[a]["paired_seeds"], ds):
            ax.annotate(str(sd), (j, d), xytext=(4, 0), textcoords="offset points", fontsize=7)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(others)), [f"{a} − {baseline}" for a in others], rotation=20)
    ax.set_ylabel(f"paired Δ {tname} (pp), per seed")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(results: list[dict], path: Path) -> Path | None:
    """Eval accuracy per set over global training steps: a thin line per seed, a thick one for the
    mean, one colour per arm; stage ends of the first seed's run marked on each arm's line."""
    plt = _plt()
    if plt is None or not results:
        return None
    benches = list(results[0]["benchmarks"]) + ["format"]
    arms = list(dict.fromkeys(r["arm"] for r in results))
    fig, axes = plt.subplots(1, len(benches), figsize=(4.2 * len(benches), 3.8), squeeze=False)
    for j, arm in enumerate(arms):
        rs = [r for r in results if r["arm"] == arm]
        for ax, b in zip(axes[0], benches):
            key = "eval/average/format" if b == "format" else f"eval/{b}/accuracy"
            per = {}
            for r in rs:
                xs = [e["step"] for e in r["eval_records"] if key in e]
                ys = [100 * e[key] for e in r["eval_records"] if key in e]
                ax.plot(xs, ys, color=f"C{j}", alpha=0.3, linewidth=0.8)
                for x, y in zip(xs, ys):
                    per.setdefault(x, []).append(y)
            xs = sorted(per)
            ax.plot(xs, [sum(per[x]) / len(per[x]) for x in xs], "o-", color=f"C{j}", linewidth=2, markersize=4,
                    label=arm)
    for ax, b in zip(axes[0], benches):
        ax.set_title(f"{b} (%)" if b != "format" else "format, all sets (%)", fontsize=9)
        ax.set_xlabel("global step (stage ends / validations)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------
# the command


def run(out: str | Path = "outputs/ablation", *, arms=DEFAULT_ARMS, seeds=DEFAULT_SEEDS, quick: bool = False,
        eval_n: int | None = None, eval_files=(), target=None, baseline: str | None = "auto", overrides=(),
        jobs: int = 1, nproc_per_node: int = 0, restart: bool = False, report_only: bool = False, log=print) -> dict:
    """Train and evaluate every (arm, seed) not finished yet, then write and return the comparison."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    runs = plan(out, arms=arms, seeds=seeds, quick=quick, overrides=overrides, eval_files=eval_files,
                eval_n=eval_n, nproc_per_node=nproc_per_node)
    arm_names = list(dict.fromkeys(r["arm"] for r in runs))
    results: dict = {}
    todo = []
    # seed-major: all arms of a seed before the next seed, so that an ablation cut short still
    # holds complete paired comparisons
    for r in sorted(runs, key=lambda r: (list(seeds).index(r["seed"]), arm_names.index(r["arm"]))):
        done = None if restart else finished(r)
        if done is not None:
            results[(r["arm"], r["seed"])] = done
            log(f"[{r['arm']} seed {r['seed']}] finished earlier: {r['dir'] / RESULT_FILE}", flush=True)
        elif report_only:
            log(f"[{r['arm']} seed {r['seed']}] not finished: left out of the tables (--report-only)", flush=True)
        else:
            todo.append(r)
    if report_only and not results:
        raise ValueError(f"--report-only: no finished run in {out}")
    lock = threading.Lock()

    def one(i_r):
        i, r = i_r
        s = r["cfg"].stages
        budget = ", ".join(f"{t.name} {t.steps}" + (f" ({t.sft_warmup_steps} sft)" if t.sft_warmup_steps else "")
                           + (" sft" if t.type == "sft" else "") for t in s)
        with lock:
            log(f"[{i}/{len(todo)}] {r['arm']} seed {r['seed']}: training {r['recipe']} ({r['what']}; steps: "
                f"{budget}) ...", flush=True)
        dt = train_run(r, restart=restart)
        res = collect(r, dt)
        (r["dir"] / RESULT_FILE).write_text(json.dumps(res, indent=2, default=_jsonable) + "\n")
        acc = ", ".join(f"{b} {100 * m['accuracy']:.1f}%" for b, m in res["benchmarks"].items())
        with lock:
            log(f"[{i}/{len(todo)}] {r['arm']} seed {r['seed']}: {acc} (trained + evaluated in {dt:.0f} s)",
                flush=True)
        return res

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        for res in ex.map(one, enumerate(todo, 1)):
            results[(res["arm"], res["seed"])] = res

    ordered = [results[(r["arm"], r["seed"])] for r in runs if (r["arm"], r["seed"]) in results]
    benches = list(ordered[0]["benchmarks"])
    if target is None:
        target = [b for b in benches if b in TARGET] or benches
    missing = [t for t in target if t not in benches]
    if missing:
        raise ValueError(f"--target {missing}: not among the evaluated benchmarks {benches}")
    if baseline == "auto":
        baseline = "merged" if "merged" in arm_names else next((a for a in arm_names if "merged" in a), arm_names[0])
    if baseline is not None and baseline not in arm_names:
        raise ValueError(f"--baseline {baseline!r} is not one of the arms {arm_names}")
    summary = summarize(ordered, arm_names, list(seeds), list(target), baseline)
    tables = markdown_tables(summary, list(target), baseline, ordered)
    wall = time.perf_counter() - t_all
    what = "embedded default" if ordered and ordered[0]["fingerprint"]["recipe"] in ("default", "merged",
                                                                                         "caption_sft") else "recipes"
    title = (f"{' vs '.join(arm_names)} ({what}{', --quick' if quick else ''}; seeds "
             f"{','.join(map(str, seeds))}; greedy eval)")
    result = {"settings": {"arms": arm_names, "seeds": list(seeds), "quick": quick, "target": list(target),
                           "baseline": baseline, "eval_files": [str(f) for f in eval_files],
                           "eval_n": runs[0]["cfg"].eval.n, "eval_max_new_tokens": runs[0]["cfg"].eval.max_new_tokens,
                           "eval_seed_offset": EVAL_SEED_OFFSET, "greedy": True, "overrides": list(overrides),
                           "jobs": jobs, "nproc_per_node": nproc_per_node},
              "summary": summary, "runs": ordered, "table": tables, "wall_seconds": wall}
    (out / "ablation.json").write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    (out / "ablation.md").write_text(f"{title}\n\n{tables}\n")
    png = plot_summary(summary, list(target), baseline, out / "ablation.png", title)
    curves = plot_curves(ordered, out / "ablation-curves.png")
    log("\n" + tables)
    log(f"\nablation: {out / 'ablation.json'}, {out / 'ablation.md'}" + (f", {png}" if png else "")
        + (f", {curves}" if curves else "") + f" ({wall:.0f} s)")
    return result


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got {s!r}")
    return out


def _str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m staged.ablation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="outputs/ablation", help="output folder (default outputs/ablation)")
    p.add_argument("--arms", type=_str_list, default=None,
                   help=f"comma-separated embedded arms: {', '.join(ARMS)} (default {','.join(DEFAULT_ARMS)} "
                        "unless --recipes is given)")
    p.add_argument("--recipes", type=_str_list, default=[],
                   help="comma-separated arms from recipes: NAME or PATH.toml, optionally @easy_to_hard / @shuffle")
    p.add_argument("--seeds", type=_int_list, default=None,
                   help=f"comma-separated run seeds (default {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--seed", type=int, default=None, help="one seed (= --seeds S)")
    p.add_argument("--eval-files", nargs="+", default=[], metavar="FILE",
                   help="benchmark files (JSONL / Parquet) instead of the synthetic sets; all are the target")
    p.add_argument("--eval-n", type=int, default=None,
                   help="samples per synthetic eval set (default 128; --quick 16) / first N rows per file (0 = all)")
    p.add_argument("--target", type=_str_list, default=None,
                   help="benchmarks that are the target (default: visual, or every --eval-files benchmark)")
    p.add_argument("--baseline", default="auto", help="arm the paired differences are against (default merged)")
    p.add_argument("--jobs", type=int, default=0,
                   help="runs at once (default: 1 on a GPU or with --nproc-per-node, else CPU cores / cpu_threads)")
    p.add_argument("--nproc-per-node", type=int, default=0, help="launch every run with torchrun on N processes")
    p.add_argument("--restart", action="store_true", help="train every run from scratch (no skipping, no resume)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the tables and plots of the finished runs among the requested ones")
    p.add_argument("--quick", action="store_true", help=f"every stage x {QUICK_SCALE:g} steps: a smoke test")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="training overrides for every arm")
    a = p.parse_args(argv)
    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must look like key.sub=value, got {bad}")
    if a.eval_n is not None and a.eval_n < (0 if a.eval_files else 1):
        p.error(f"--eval-n must be >= 1 (>= 0 with --eval-files), got {a.eval_n}")
    if a.seed is not None and a.seeds is not None:
        p.error("give --seed or --seeds, not both")
    if a.nproc_per_node < 0 or a.jobs < 0:
        p.error("--nproc-per-node and --jobs must be >= 0")
    seeds = [a.seed] if a.seed is not None else (a.seeds or list(DEFAULT_SEEDS))
    arms = list(a.arms if a.arms is not None else ([] if a.recipes else DEFAULT_ARMS)) + list(a.recipes)
    if not arms:
        p.error("no arms: give --arms and/or --recipes")
    try:
        runs = plan(a.out, arms=arms, seeds=seeds, quick=a.quick, overrides=a.overrides, eval_files=a.eval_files,
                    eval_n=a.eval_n, nproc_per_node=a.nproc_per_node)
        if not a.restart:
            for r in runs:
                finished(r)
    except (ValueError, FileNotFoundError) as e:  # a bad arm or override is the user's, not a crash
        print(f"staged.ablation: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    jobs = a.jobs
    if not jobs:
        threads = max(1, runs[0]["cfg"].cpu_threads)
        import torch

        on_gpu = a.nproc_per_node or torch.cuda.is_available() or runs[0]["cfg"].device not in ("auto", "cpu")
        jobs = 1 if on_gpu else max(1, min(len(runs), (os.cpu_count() or 1) // threads))
    baseline = None if a.baseline == "none" else a.baseline
    return run(a.out, arms=arms, seeds=seeds, quick=a.quick, eval_n=a.eval_n, eval_files=a.eval_files,
               target=a.target, baseline=baseline, overrides=a.overrides, jobs=jobs,
               nproc_per_node=a.nproc_per_node, restart=a.restart, report_only=a.report_only)


if __name__ == "__main__":
    main()
