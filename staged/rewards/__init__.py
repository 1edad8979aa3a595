"""Rewards for GRPO: format + per-task verifiers, the paper's 0.9*accuracy + 0.1*format by default.

    compute_rewards(completions, samples, kind="paper") -> {"reward", "accuracy", "format"}: float32 [N],
                                                          {"verifier_errors", "verifier_timeouts"}: 0-d

kind: "paper"    reward = (1 - format_weight) * accuracy + format_weight * format
      "accuracy" reward = accuracy
      "format"   reward = format (for a format-only warm-up)
Completion i is graded against samples[i] (answer, task -> verifier, extra -> verifier options), or by
a user reward function (reward_fn="module:function", staged.rewards.user). Verifiers that can hang
(math-verify's sympy, user code) run in killable worker processes (staged.rewards.sandbox) with a
time limit per call; a failing or overrunning verifier scores 0 and is counted, never raised.
"""
from __future__ import annotations

from .compute import DEFAULT_TIMEOUT_S, REWARD_KINDS, compute_rewards, score_lists
from .format import extract_boxed, format_reward, normalize_tags
from .paper import accuracy_reward, compute_score, too_complex
from .sandbox import shutdown_pools
from .user import load_reward_function
from .verifiers import (
    VERIFIERS,
    box_iou,
    box_to_original,
    get_verifier,
    get_verifier_spec,
    hostile_math,
    math_verify_available,
    parse_box,
    parse_mcq_letter,
    parse_number,
    register_verifier,
    set_math_backend,
    verify_math,
    with_image_geometry,
)

__all__ = ["compute_rewards", "score_lists", "REWARD_KINDS", "DEFAULT_TIMEOUT_S", "compute_score", "accuracy_reward",
           "format_reward", "too_complex", "extract_boxed", "normalize_tags", "VERIFIERS", "get_verifier",
           "get_verifier_spec", "register_verifier", "parse_number", "parse_mcq_letter", "parse_box", "box_iou",
           "box_to_original", "with_image_geometry", "verify_math", "math_verify_available", "set_math_backend",
           "hostile_math", "load_reward_function", "shutdown_pools"]
