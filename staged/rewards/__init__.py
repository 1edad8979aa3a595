"""Rewards for GRPO: format + per-task verifiers, the paper's 0.9*accuracy + 0.1*format by default.

    compute_rewards(completions, samples, kind="paper") -> {"reward", "accuracy", "format"}: float32 [N]

kind: "paper"    reward = (1 - format_weight) * accuracy + format_weight * format
      "accuracy" reward = accuracy
      "format"   reward = format (for a format-only warm-up)
Completion i is graded against samples[i] (answer, task -> verifier, extra -> verifier options).
"""
from __future__ import annotations

import torch

from .format import extract_boxed, format_reward, normalize_tags
from .paper import accuracy_reward, compute_score, too_complex
from .verifiers import VERIFIERS, get_verifier, parse_mcq_letter, parse_number, register_verifier

REWARD_KINDS = ("paper", "accuracy", "format")


def compute_rewards(completions: list[str], samples: list, *, kind: str = "paper", format_weight: float = 0.1,
                    format_mode: str = "strict") -> dict[str, torch.Tensor]:
    """Score decoded completions (special tokens already stripped) against their samples.

    Returns float32 CPU tensors [N]: "reward", "accuracy" (0/1, or a verifier's partial credit),
    "format" (0/1). format_mode: "strict" (well-formed, default) or "paper" (the paper's regex).
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}")
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    if len(completions) != len(samples):
        raise ValueError(f"compute_rewards: {len(completions)} completions but {len(samples)} samples")
    acc, fmt = [], []
    for text, s in zip(completions, samples):
        text = text if isinstance(text, str) else str(text)
        fmt.append(format_reward(text, mode=format_mode))
        acc.append(0.0 if kind == "format" else accuracy_reward(text, s.answer, s.task, s))
    accuracy = torch.tensor(acc, dtype=torch.float32)
    fmt_t = torch.tensor(fmt, dtype=torch.float32)
    if kind == "paper":
        reward = (1.0 - format_weight) * accuracy + format_weight * fmt_t
    elif kind == "accuracy":
        reward = accuracy.clone()
    else:
        reward = fmt_t.clone()
    return {"reward": reward, "accuracy": accuracy, "format": fmt_t}


__all__ = ["compute_rewards", "REWARD_KINDS", "compute_score", "accuracy_reward", "format_reward", "too_complex",
           "extract_boxed", "normalize_tags", "VERIFIERS", "get_verifier", "register_verifier", "parse_number",
           "parse_mcq_letter"]
