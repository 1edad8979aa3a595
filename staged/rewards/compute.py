"""compute_rewards: a batch of completions -> reward, accuracy, format, and the verifier failure counts.

Every verifier call is bounded, and none can stop a run:
  * in-process verifiers (mcq, number, count, bbox, caption, format, the literal part of math) are
    linear in inputs capped upstream; one that raises scores 0 (verifier_errors += 1), one that takes
    longer than `timeout` anyway scores 0 (verifier_timeouts += 1);
  * math-verify (task math) and user reward functions run in worker processes (staged.rewards.sandbox),
    all of a batch's jobs in parallel, each killed after `timeout` seconds (scores 0, counted).
The counts come back as 0-d tensors next to the per-completion ones; the first failures are logged.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch

from .format import format_reward
from .paper import plan_accuracy
from .sandbox import Job
from .user import UserReward, jobs_for, load_reward_function, parse_value, user_pool
from .verifiers import get_verifier_spec, math_pool

log = logging.getLogger(__name__)

REWARD_KINDS = ("paper", "accuracy", "format")
DEFAULT_TIMEOUT_S = 1.0
_LOG_FIRST = 20  # failures logged per process (then every 1000th)
_failures_seen = 0


def _note(what: str, task, detail) -> None:
    global _failures_seen
    _failures_seen += 1
    if _failures_seen <= _LOG_FIRST or _failures_seen % 1000 == 0:
        log.warning("verifier %s (task %r): %s%s", what, task, str(detail)[:300],
                    "" if _failures_seen < _LOG_FIRST else f" [{_failures_seen} so far; logging every 1000th]")


def _pool_for(job: Job):
    return math_pool() if job.kind == "math_verify" else user_pool()


def score_lists(completions: list[str], samples: list, *, kind: str = "paper", format_weight: float = 0.1,
                format_mode: str = "strict", reward_fn: str | Callable | UserReward | None = None,
                timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """compute_rewards' work in plain Python: {"reward", "accuracy", "format": list[float],
    "verifier_errors", "verifier_timeouts": int}."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}")
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    if not timeout > 0:
        raise ValueError(f"verifier timeout must be > 0 seconds, got {timeout}")
    if len(completions) != len(samples):
        raise ValueError(f"compute_rewards: {len(completions)} completions but {len(samples)} samples")
    texts = [t if isinstance(t, str) else str(t) for t in completions]
    n = len(texts)
    fmt = [format_reward(t, mode=format_mode) for t in texts]
    acc = [0.0] * n
    override: list[float | None] = [None] * n
    errors = timeouts = 0

    if kind != "format" and reward_fn is not None:
        # ---- a user reward function, in the worker pool
        ur = load_reward_function(reward_fn)
        plan = jobs_for(ur, texts, samples, timeout)
        results = user_pool().run([job for _, job in plan], timeout=timeout)
        for (rows, _), res in zip(plan, results):
            if res.status == "timeout":
                timeouts += len(rows)
                _note("timeout", ur.spec, res.value)
                continue
            if res.status == "error":
                errors += len(rows)
                _note("error", ur.spec, res.value)
                continue
            values = res.value if ur.batched else [res.value]
            if not isinstance(values, list) or len(values) != len(rows):
                errors += len(rows)
                _note("error", ur.spec, f"a batch reward must return a list of {len(rows)} values, got "
                      f"{type(values).__name__}{'' if not isinstance(values, list) else f' of {len(values)}'}")
                continue
            for i, v in zip(rows, values):
                try:
                    a, f, r = parse_value(v)
                except ValueError as e:
                    errors += 1
                    _note("error", ur.spec, e)
                    continue
                acc[i] = a
                if f is not None:
                    fmt[i] = f
                override[i] = r
    elif kind != "format":
        # ---- per-task verifiers: in process, or planned as sandbox jobs run in parallel below
        jobs: list[tuple[int, Job]] = []
        for i, (text, s) in enumerate(zip(texts, samples)):
            get_verifier_spec(s.task)  # an unknown task is a configuration error: raise it
            t0 = time.perf_counter()
            try:
                r = plan_accuracy(text, s.answer, s.task, s)
            except Exception as e:  # noqa: BLE001 - a verifier bug scores 0 and is counted
                errors += 1
                _note("error", s.task, f"{type(e).__name__}: {e}")
                continue
            if time.perf_counter() - t0 > timeout:
                timeouts += 1
                _note("timeout", s.task, f"in-process verifier took {time.perf_counter() - t0:.2f} s")
                continue
            if isinstance(r, Job):
                jobs.append((i, r))
                continue
            try:
                acc[i] = _finite(r)
            except ValueError as e:
                errors += 1
                _note("error", s.task, e)
        for pool_kind in sorted({j.kind for _, j in jobs}):
            sub = [(i, j) for i, j in jobs if j.kind == pool_kind]
            results = _pool_for(sub[0][1]).run([j for _, j in sub], timeout=timeout)
            for (i, _), res in zip(sub, results):
                if res.status == "ok":
                    try:
                        acc[i] = _finite(res.value or 0.0)
                    except (TypeError, ValueError) as e:
                        errors += 1
                        _note("error", samples[i].task, e)
                elif res.status == "timeout":
                    timeouts += 1
                    _note("timeout", samples[i].task, res.value)
                else:
                    errors += 1
                    _note("error", samples[i].task, res.value)

    if kind == "paper":
        reward = [(1.0 - format_weight) * a + format_weight * f for a, f in zip(acc, fmt)]
    elif kind == "accuracy":
        reward = list(acc)
    else:
        reward = list(fmt)
    if kind != "format":
        reward = [r if o is None else o for r, o in zip(reward, override)]
    return {"reward": reward, "accuracy": acc, "format": fmt, "verifier_errors": errors,
            "verifier_timeouts": timeouts}


def _finite(x) -> float:
    f = float(x)
    if not math.isfinite(f):
        raise ValueError(f"verifier returned {f}")
    return f


def compute_rewards(completions: list[str], samples: list, *, kind: str = "paper", format_weight: float = 0.1,
                    format_mode: str = "strict", reward_fn: str | Callable | UserReward | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, torch.Tensor]:
    """Score decoded completions (special tokens already stripped) against their samples.

    Completion i is graded against samples[i] (answer; task -> verifier; extra -> verifier options).
    kind: "paper"    reward = (1 - format_weight) * accuracy + format_weight * format
          "accuracy" reward = accuracy
          "format"   reward = format (a format-only warm-up; no verifier runs)
    format_mode: "strict" (well-formed, default) or "paper" (the paper's regex).
    reward_fn: a user reward function ("module:function", see staged.rewards.user) that replaces the
        per-task verifiers as the accuracy term (and may override format / reward per row).
    timeout: seconds per verifier call (a batch user reward: per completion).

    Returns float32 CPU tensors [N]: "reward", "accuracy" (0/1, or partial credit), "format" (0/1);
    and 0-d float32 "verifier_errors", "verifier_timeouts": rows scored 0 because their verifier
    raised / ran out of time.
    """
    out = score_lists(completions, samples, kind=kind, format_weight=format_weight, format_mode=format_mode,
                      reward_fn=reward_fn, timeout=timeout)
    res = {k: torch.tensor(out[k], dtype=torch.float32) for k in ("reward", "accuracy", "format")}
    res["verifier_errors"] = torch.tensor(float(out["verifier_errors"]))
    res["verifier_timeouts"] = torch.tensor(float(out["verifier_timeouts"]))
    return res
