"""The paper's reward (VLM-CapCurriculum, training/reward_functions/math.py on EasyR1):

    response  = re.sub(r"\\s*(<|>|/)\\s*", r"\\1", response)        # "< think >" -> "<think>"
    format    = fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", DOTALL)
    answer    = mathruler.extract_boxed_content(response)         # last \\boxed{}, balanced braces
    accuracy  = 0 if not answer or too_complex(answer) else grade_answer(answer, ground_truth)
    overall   = (1 - format_weight) * accuracy + format_weight * format,   format_weight = 0.1

What differs here, and why:
  * the format check and answer extraction are linear-time and bounded (staged.rewards.format);
  * grade_answer (mathruler: string normalization + sympy equivalence) is replaced by the per-task
    verifiers of staged.rewards.verifiers, which parse literals and never evaluate; task "math" adds
    math-verify's sympy equivalence (e.g. "\\sqrt{4}" vs "2") when installed, in a worker process
    killed after the time limit (the paper: sympy in a subprocess with a 1 s timeout too);
  * the default format check is "strict" (well-formed: one think block, a closed \\boxed{} after it);
    format_mode="paper" gives the paper's regex exactly.
`compute_score` keeps EasyR1's batch reward-function signature for drop-in use.
"""
from __future__ import annotations

import re
from typing import Any

from .format import MAX_RESPONSE_CHARS, answer_text, extract_boxed, format_reward, normalize_tags
from .verifiers import get_verifier_spec

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


def plan_accuracy(response: str, answer: str, task: str | None = None, sample=None):
    """The accuracy of one completion: a float, or a sandbox Job still to run (math-verify). Raises
    what the verifier raises (compute_rewards counts it); unknown task: ValueError."""
    spec = get_verifier_spec(task)
    if len(response) > MAX_RESPONSE_CHARS:
        return 0.0
    text = normalize_tags(response)
    if spec.input == "response":
        return spec.fn(text, answer, sample)
    pred = extract_answer(text, task)
    if not pred or too_complex(pred):
        return 0.0
    return (spec.plan or spec.fn)(pred, answer, sample)


def accuracy_reward(response: str, answer: str, task: str | None = None, sample=None) -> float:
    """The accuracy of one completion (0.0 when its verifier fails or times out; compute_rewards
    does the same for a batch, in parallel, and counts the failures)."""
    from staged.data.sample import Sample

    from .compute import score_lists

    if sample is None:
        sample = Sample(prompt="", answer=answer, task=task or "math")
    elif getattr(sample, "answer", answer) != answer or getattr(sample, "task", task) != task:
        import dataclasses

        sample = dataclasses.replace(sample, answer=answer, task=task or "math")
    return score_lists([response], [sample], kind="accuracy")["accuracy"][0]


def score(response: str, answer: str, task: str | None = None, sample=None, *, format_weight: float = 0.1,
          format_mode: str = "strict") -> dict[str, float]:
    """{"overall", "format", "accuracy"} for one completion."""
    fmt = format_reward(response, mode=format_mode)
    acc = accuracy_reward(response, answer, task, sample)
    return {"overall": (1.0 - format_weight) * acc + format_weight * fmt, "format": fmt, "accuracy": acc}


def compute_score(reward_inputs: list[dict[str, Any]], format_weight: float = 0.1) -> list[dict[str, float]]:
    """EasyR1's batch reward function: [{"response", "ground_truth", ...}] -> [{"overall", "format",
    "accuracy"}]. The task comes from an optional "task" key (default "math", as in the paper)."""
    from staged.data.sample import Sample

    from .compute import score_lists

    if not isinstance(reward_inputs, list):
        raise ValueError("compute_score takes a list of reward inputs (EasyR1's reward_type=batch)")
    if not reward_inputs:
        return []
    samples = [Sample(prompt="", answer=str(r["ground_truth"]), task=r.get("task") or "math") for r in reward_inputs]
    out = score_lists([r["response"] for r in reward_inputs], samples, format_weight=format_weight,
                      format_mode="paper")
    return [{"overall": o, "format": f, "accuracy": a}
            for o, f, a in zip(out["reward"], out["format"], out["accuracy"])]
