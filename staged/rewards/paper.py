"""The paper's reward (VLM-CapCurriculum, training/reward_functions/math.py on EasyR1):

    response  = re.sub(r"\\s*(<|>|/)\\s*", r"\\1", response)        # "< think >" -> "<think>"
    format    = fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", DOTALL)
    answer    = mathruler.extract_boxed_content(response)         # last \\boxed{}, balanced braces
    accuracy  = 0 if not answer or too_complex(answer) else grade_answer(answer, ground_truth)
    overall   = (1 - format_weight) * accuracy + format_weight * format,   format_weight = 0.1

What differs here, and why:
  * everything is linear-time and bounded (staged.rewards.format); the paper runs sympy in a
    subprocess with a 1 s timeout instead;
  * grade_answer (mathruler: string normalization + sympy equivalence) is replaced by the per-task
    verifiers of staged.rewards.verifiers, which parse literals and never evaluate: an answer that
    only sympy would find equal (e.g. "\\sqrt{4}" vs "2") scores 0 here;
  * the default format check is "strict" (well-formed: one think block, a closed \\boxed{} after it);
    format_mode="paper" gives the paper's regex exactly.
`compute_score` keeps EasyR1's batch reward-function signature for drop-in use.
"""
from __future__ import annotations

import re
from typing import Any

from .format import MAX_RESPONSE_CHARS, answer_text, extract_boxed, format_reward, normalize_tags
from .verifiers import get_verifier

# Tasks whose answer is the whole response when nothing is boxed (their SFT target is plain text).
UNBOXED_TASKS = ("caption",)

_BIG_INT = re.compile(r"\d{50}")


def too_complex(expr: str, *, max_len: int = 200, max_pow: int = 10, max_brackets: int = 40) -> bool:
    """The paper's guard: answers this complex score 0 whatever they say (anti-hacking, anti-hang)."""
    if len(expr) > max_len:
        return True
    if expr.count("^") + expr.count("**") > max_pow:
        return True
    if expr.count("(") > max_brackets or expr.count("{") > max_brackets:
        return True
    return _BIG_INT.search(expr) is not None


def extract_answer(response: str, task: str | None) -> str | None:
    """The answer a completion gives: its last \\boxed{} content; for UNBOXED_TASKS with no box, the
    text after </think>."""
    ans = extract_boxed(response)
    if ans is None and task in UNBOXED_TASKS:
        ans = answer_text(response)
    return ans


def accuracy_reward(response: str, answer: str, task: str | None = None, sample=None) -> float:
    if len(response) > MAX_RESPONSE_CHARS:
        return 0.0
    pred = extract_answer(normalize_tags(response), task)
    if not pred or too_complex(pred):
        return 0.0
    return float(get_verifier(task)(pred, answer, sample))


def score(response: str, answer: str, task: str | None = None, sample=None, *, format_weight: float = 0.1,
          format_mode: str = "strict") -> dict[str, float]:
    """{"overall", "format", "accuracy"} for one completion."""
    fmt = format_reward(response, mode=format_mode)
    acc = accuracy_reward(response, answer, task, sample)
    return {"overall": (1.0 - format_weight) * acc + format_weight * fmt, "format": fmt, "accuracy": acc}


def compute_score(reward_inputs: list[dict[str, Any]], format_weight: float = 0.1) -> list[dict[str, float]]:
    """EasyR1's batch reward function: [{"response", "ground_truth", ...}] -> [{"overall", "format",
    "accuracy"}]. The task comes from an optional "task" key (default "math", as in the paper)."""
    if not isinstance(reward_inputs, list):
        raise ValueError("compute_score takes a list of reward inputs (EasyR1's reward_type=batch)")
    return [score(r["response"], str(r["ground_truth"]), r.get("task"), format_weight=format_weight,
                  format_mode="paper") for r in reward_inputs]
