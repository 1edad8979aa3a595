"""Verifiers: does an extracted answer match the ground truth? One per task, chosen by Sample.task.

Each takes (pred, answer, sample) -> float in [0, 1]; pred is the extracted answer (the \\boxed{}
content, or the text after </think> for tasks that do not box, e.g. caption). Nothing here evaluates
model output: numbers are parsed from literals only ("1,000", "3.0", "-2", "3/4", "\\frac{3}{4}",
"50%", "5 cm"), so `9**9**9**9` is simply not a number. Inputs are bounded by the caller (MAX_BOXED_CHARS),
and the regexes have no nested quantifiers.

Register more with `register_verifier("name", fn)`.
"""
from __future__ import annotations

import math
import re
from typing import Callable

Verifier = Callable[[str, str, object], float]
VERIFIERS: dict[str, Verifier] = {}


def register_verifier(name: str, fn: Verifier | None = None):
    """Register fn as the verifier for task `name` (usable as a decorator)."""
    def deco(f):
        VERIFIERS[name] = f
        return f
    return deco(fn) if fn is not None else deco


def get_verifier(task: str | None) -> Verifier:
    key = task or "math"
    if key not in VERIFIERS:
        raise ValueError(f"no verifier for task {task!r}; known tasks: {', '.join(sorted(VERIFIERS))}")
    return VERIFIERS[key]


# ----------------------------------------------------------------------------------------------
# cleaning

_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_MAX_NUMBER_CHARS = 64


def strip_latex(s: str) -> str:
    """Unwrap \\text{..}-like wrappers, drop $, \\left/\\right, spacing commands and a trailing period."""
    s = s.strip()
    for _ in range(3):  # nested wrappers, bounded
        s2 = _TEXT_WRAP.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    for tok in ("$", "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle"):
        s = s.replace(tok, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s


# ----------------------------------------------------------------------------------------------
# numbers

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN = re.compile(rf"^{_NUM}$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SLASH = re.compile(rf"^({_NUM})/({_NUM})$")
_FRAC = re.compile(rf"^([+-]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}$")
_FRAC_SHORT = re.compile(r"^([+-]?)\\frac(\d)(\d)$")  # \frac34
_UNIT = re.compile(r"^(.*?)\s*(?:\^\s*\{?\\circ\}?|°|\\%|%|[A-Za-z]+)$")

_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


def parse_number(s: str) -> float | None:
    """A float from a numeric literal, or None. Accepts 7, -2, +3.0, .5, 1,000, 3/4, \\frac{3}{4},
    \\frac34, 50%, 5 cm (one trailing unit word), and the words zero..twelve."""
    s = strip_latex(s)
    if not s or len(s) > _MAX_NUMBER_CHARS:
        return None
    s = s.replace(" ", "")
    v = _parse_number_core(s)
    if v is None:
        m = _UNIT.match(s)
        if m and m.group(1):
            v = _parse_number_core(m.group(1).strip())
    if v is None and s.lower() in _WORDS:
        v = float(_WORDS[s.lower()])
    if v is None or not math.isfinite(v):
        return None
    return v


def _parse_number_core(s: str) -> float | None:
    if _PLAIN.match(s):
        return float(s)
    if _THOUSANDS.match(s):
        return float(s.replace(",", ""))
    m = _SLASH.match(s)
    if m:
        return _div(float(m.group(1)), float(m.group(2)))
    m = _FRAC.match(s) or _FRAC_SHORT.match(s)
    if m:
        v = _div(float(m.group(2)), float(m.group(3)))
        return None if v is None else (-v if m.group(1) == "-" else v)
    return None


def _div(a: float, b: float) -> float | None:
    return None if b == 0 else a / b


def numbers_match(a: float, b: float, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


@register_verifier("number")
def verify_number(pred: str, answer: str, sample=None) -> float:
    p, a = parse_number(pred), parse_number(answer)
    if p is None or a is None:
        return 0.0
    tol = _extra(sample).get("rel_tol", 1e-6)
    return 1.0 if numbers_match(p, a, rel_tol=tol) else 0.0


@register_verifier("count")
def verify_count(pred: str, answer: str, sample=None) -> float:
    p, a = parse_number(pred), parse_number(answer)
    if p is None or a is None or p != int(p):
        return 0.0
    return 1.0 if int(p) == int(a) else 0.0


# ----------------------------------------------------------------------------------------------
# multiple choice

# "C", "(C)", "C.", "C)", "C) text", "C: text", "C text", "Option C", "Answer: (C)"; letters A-Z.
_MCQ = re.compile(r"^(?:(?:the\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*)?"
                  r"[\(\[]?([A-Za-z])[\)\]]?(?:[.:)\s].*)?$", re.IGNORECASE | re.DOTALL)
_HEDGE = re.compile(r"(?:\bor\b|\band\b|,|/|&)\s*[\(\[]?[A-Z]\b")  # "C or D", "C, D": two answers


def parse_mcq_letter(pred: str, options: list[str] | None = None) -> str | None:
    """The chosen letter (upper case), or None. Also maps an answer that is exactly one option's text
    ("2", "top left") to its letter when the options are known."""
    s = strip_latex(pred)
    if not s or len(s) > 256:
        return None
    m = _MCQ.match(s)
    if m:
        letter = m.group(1)
        # a bare lower-case word like "a" in "a circle" is not an answer; a lone letter is
        rest = s[m.end(1):].strip()
        if _HEDGE.search(rest):
            return None
        if letter.isupper() or not rest or rest[0] in ".:)]":
            return letter.upper()
    if options:
        norm = _norm_text(s)
        hits = [i for i, o in enumerate(options) if _norm_text(str(o)) == norm]
        if len(hits) == 1 and hits[0] < 26:
            return chr(ord("A") + hits[0])
    return None


@register_verifier("mcq")
def verify_mcq(pred: str, answer: str, sample=None) -> float:
    truth = parse_mcq_letter(answer)
    if truth is None:
        return 0.0
    got = parse_mcq_letter(pred, _extra(sample).get("options"))
    return 1.0 if got == truth else 0.0


# ----------------------------------------------------------------------------------------------
# free text: captions, math


def _norm_text(s: str) -> str:
    s = strip_latex(s).lower()
    s = re.sub(r"[^\w\s]", " ", s)
    return " ".join(s.split())


@register_verifier("caption")
def verify_caption(pred: str, answer: str, sample=None) -> float:
    """Exact match after lower-casing and dropping punctuation and extra spaces."""
    return 1.0 if _norm_text(pred) == _norm_text(answer) and _norm_text(answer) else 0.0


def _norm_math(s: str) -> str:
    s = strip_latex(s)
    s = s.replace(" ", "").replace("\\{", "{").replace("\\}", "}")
    return s.lower()


@register_verifier("math")
def verify_math(pred: str, answer: str, sample=None) -> float:
    """A stand-in for mathruler's grade_answer without sympy: a letter answer is graded as MCQ, a
    numeric one numerically, anything else by normalized string equality (no symbolic algebra, no eval)."""
    if parse_mcq_letter(answer) is not None and len(strip_latex(answer)) <= 3:
        return verify_mcq(pred, answer, sample)
    a = parse_number(answer)
    if a is not None:
        p = parse_number(pred)
        return 1.0 if p is not None and numbers_match(p, a) else 0.0
    return 1.0 if _norm_math(pred) == _norm_math(answer) and _norm_math(answer) else 0.0


# ----------------------------------------------------------------------------------------------
# grounding

_FLOAT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def _box(s: str) -> tuple[float, float, float, float] | None:
    if len(s) > 256:
        return None
    nums = _FLOAT.findall(s)
    if len(nums) != 4:
        return None
    x1, y1, x2, y2 = (float(n) for n in nums)
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@register_verifier("bbox")
def verify_bbox(pred: str, answer: str, sample=None) -> float:
    """[x1, y1, x2, y2]: 1.0 when IoU >= extra["iou_threshold"] (default 0.5)."""
    p, a = _box(pred), _box(answer)
    if p is None or a is None:
        return 0.0
    return 1.0 if box_iou(p, a) >= _extra(sample).get("iou_threshold", 0.5) else 0.0


def _extra(sample) -> dict:
    extra = getattr(sample, "extra", None)
    return extra if isinstance(extra, dict) else {}
