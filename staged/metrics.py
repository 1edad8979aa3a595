"""Metrics: one JSON line per step (and TensorBoard scalars when installed), the per-stage
summary and the end-of-run plot. Only rank 0 writes; values arrive already reduced over ranks.

A record holds ``step`` (global, 1-based), ``stage`` (index), ``stage_name``, ``stage_step``
(1-based), ``kind`` (``grpo`` or ``sft``) and the numbers: reward, accuracy, format,
response_length, entropy, kl, clip_ratio, truncated, loss, grad_norm, lr, tokens_per_s,
step_time_s, rollout_time_s, peak_mem_mb, skipped; and per optimizer update of the step
(``updates`` of them: batch.mini_batch_prompts, grpo.ppo_epochs) the lists loss_updates,
grad_norm_updates, clip_ratio_updates, ratio_mean_updates (loss and grad_norm above are their
means, clip_ratio and ratio_mean the token-weighted means) and the count skipped_updates.
Evaluation records (``kind = "eval"``) hold eval/<benchmark>/<metric> and the sampling settings.
"""
from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
# Timing and memory differ between otherwise identical runs; everything else must not.
NONDETERMINISTIC_KEYS = ("tokens_per_s", "step_time_s", "rollout_time_s", "peak_mem_mb", "time")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory (GPU) or peak resident set size of this process (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a kill mid-write: the run resumes from before it anyway
            break
    return out


class MetricsLogger:
    """Appends records to ``<out_dir>/metrics.jsonl`` (+ TensorBoard ``<out_dir>/tb``)."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Resuming: drop lines for steps after the checkpoint (they are about to be redone).
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard drops this run dir's events from that step on, written
                # by an earlier process after the checkpoint we resume from (or by an old run).
                self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step + 1)
                self._writer = SummaryWriter
                self._stage_tb: dict[str, Any] = {}
            except ImportError:
                print("[metrics] tensorboard is not installed: writing JSONL only")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = record["step"]
            if record.get("kind") == "eval":  # its own section: eval/<benchmark>/<metric>
                for k, v in record.items():
                    if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._tb.add_scalar(k, v, step)
                return
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "stage_step"):
                    self._tb.add_scalar(f"train/{k}", v, step)
                    if k in ("reward", "accuracy", "response_length"):
                        self._stage_writer(record).add_scalar(f"stage/{k}", v, record["stage_step"])

    def _stage_writer(self, record: dict[str, Any]):
        """Per-stage curves (x = stage step) in a run dir of their own, tb/stages/<name>, so that
        a resume can purge them on their own axis: the first stage step this process logs."""
        name = record["stage_name"]
        if name not in self._stage_tb:
            self._stage_tb[name] = self._writer(str(self.path.parent / "tb" / "stages" / name),
                                                purge_step=record["stage_step"])
        return self._stage_tb[name]

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()
            for w in self._stage_tb.values():
                w.close()


class PlainProgress:
    """tqdm's interface as plain lines, for a stdout that is not a terminal (a log file, a pipe):
    tqdm's carriage returns would make one line of the whole run. A line per ``every`` steps, at
    least one per ``interval_s`` seconds while steps complete, and the last step."""

    def __init__(self, total: int, initial: int = 0, every: int = 0, interval_s: float = 60.0, file=None):
        import time

        self.total, self.n = total, initial
        self.every = every or max(1, total // 50)
        self.interval_s, self._time = interval_s, time.monotonic
        self._last_n, self._last_t, self._t0, self._n0 = initial, self._time(), self._time(), initial
        self.file = file or sys.stdout

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, post: dict[str, Any]) -> None:
        now = self._time()
        if self.n - self._last_n < self.every and now - self._last_t < self.interval_s and self.n < self.total:
            return
        rate = (now - self._t0) / max(1, self.n - self._n0)
        extra = " ".join(f"{k}={v}" for k, v in post.items())
        print(f"[train] step {self.n}/{self.total} {extra} ({rate:.2f} s/step)", file=self.file, flush=True)
        self._last_n, self._last_t = self.n, now

    def write(self, s: str) -> None:
        print(s, file=self.file, flush=True)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------
# per-stage summary


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def stage_summary(records: list[dict[str, Any]], stage_names: list[str], *, window: float = 0.2) -> list[dict]:
    """Per stage: mean reward / accuracy / response length over the first and the last
    ``window`` fraction (at least one step) of its GRPO steps (format warm-up steps excluded)."""
    out = []
    for i, name in enumerate(stage_names):
        rs = [r for r in records if r.get("stage") == i and r.get("kind") == "grpo" and not r.get("skipped")]
        row: dict[str, Any] = {"stage": i, "name": name, "steps": len(rs)}
        if rs:
            k = max(1, int(round(len(rs) * window)))
            for key in ("reward", "accuracy", "response_length"):
                row[f"{key}_start"] = _mean([r.get(key) for r in rs[:k]])
                row[f"{key}_end"] = _mean([r.get(key) for r in rs[-k:]])
        out.append(row)
    return out


def format_summary(rows: list[dict]) -> str:
    head = f"{'stage':<14}{'steps':>6}  {'reward start→end':>20}  {'accuracy start→end':>20}  {'length start→end':>18}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["steps"] == 0:
            lines.append(f"{r['name']:<14}{0:>6}  (no GRPO steps)")
            continue
        lines.append(f"{r['name']:<14}{r['steps']:>6}  "
                     f"{r['reward_start']:>9.3f} → {r['reward_end']:<8.3f}  "
                     f"{r['accuracy_start']:>9.3f} → {r['accuracy_end']:<8.3f}  "
                     f"{r['response_length_start']:>7.1f} → {r['response_length_end']:<7.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# plot


def plot_curves(records: list[dict[str, Any]], stage_names: list[str], out_path: str | Path,
                smooth: int = 5) -> Path | None:
    """Reward and response length per step, one colour per stage. Skipped (with a message) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[metrics] matplotlib is not installed: no plot")
        return None
    rs = [r for r in records if r.get("kind") == "grpo" and not r.get("skipped")]
    if not rs:
        return None

    def smoothed(ys):
        out, acc = [], []
        for y in ys:
            acc.append(y)
            acc = acc[-smooth:]
            out.append(sum(acc) / len(acc))
        return out

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, name in enumerate(stage_names):
        sr = [r for r in rs if r["stage"] == i]
        if not sr:
            continue
        x = [r["step"] for r in sr]
        for ax, key in zip(axes, ("reward", "response_length")):
            ys = [r[key] for r in sr]
            line, = ax.plot(x, smoothed(ys), label=name)
            ax.plot(x, ys, color=line.get_color(), alpha=0.25, linewidth=0.8)
    for ax, title in zip(axes, ("mean reward", "mean response length (tokens)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path

