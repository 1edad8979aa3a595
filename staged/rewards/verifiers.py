"""Verifiers: does an extracted answer match the ground truth? One per task, chosen by Sample.task.

    task     what it checks                                             where it runs
    mcq      the chosen letter (or the text of exactly one option)      in process
    number   a numeric literal, within extra rel_tol / abs_tol          in process
    count    a whole number, exactly                                    in process
    math     letters as mcq, numbers numerically, else math-verify's    in process, then (math-verify)
             symbolic equivalence when installed, else normalised        a worker process with a hard
             string equality                                            time limit
    bbox     box IoU, the prediction rescaled to the ground truth's     in process
             pixels (see verify_bbox)
    caption  normalised exact match                                     in process
    format   the answer format alone (the whole response)               in process

A verifier is (pred, answer, sample) -> float in [0, 1]; pred is the extracted answer (the \\boxed{}
content, or the text after </think> for tasks that do not box, e.g. caption), or the whole response
for input="response" verifiers (format). `sample.extra` carries per-row options (documented at each
verifier). Nothing evaluates model output: the in-process verifiers parse literals only ("1,000",
"3/4", "\\frac{3}{4}", "50%", "5 cm"), are linear in their input and refuse inputs over a size cap;
the caller has already capped the answer (MAX_BOXED_CHARS) and dropped overly complex ones
(paper.too_complex). Symbolic work (sympy, under math-verify) can hang in C loops no signal
interrupts, so it only runs in staged.rewards.sandbox's killable worker processes.

Register more with `register_verifier("name", fn)`; a verifier that raises scores 0 and is counted
by compute_rewards (metric verifier_errors), it never stops a run.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import re
from dataclasses import dataclass
from typing import Callable

from .sandbox import Job, get_pool

log = logging.getLogger(__name__)

Verifier = Callable[[str, str, object], float]


@dataclass(frozen=True)
class VerifierSpec:
    """fn: (pred, answer, sample) -> float, synchronous (runs its own sandbox job if it needs one).
    input: "answer" (the extracted answer, guarded by too_complex) or "response" (the whole completion).
    plan: optional (pred, answer, sample) -> float | sandbox.Job: the same decision, but handing the
        slow part back as a Job so that compute_rewards can run a batch's jobs in parallel."""

    fn: Verifier
    input: str = "answer"
    plan: Callable | None = None


VERIFIERS: dict[str, VerifierSpec] = {}


def register_verifier(name: str, fn: Verifier | None = None, *, input: str = "answer", plan=None):
    """Register fn as the verifier for task `name` (usable as a decorator). It runs in the trainer's
    process: keep it linear-time on capped input (one that overruns the time limit still scores 0,
    but cannot be interrupted); anything that may hang belongs in a reward_fn (staged.rewards.user),
    which runs in a worker process with a hard limit, or in a `plan` that returns a sandbox Job."""
    if input not in ("answer", "response"):
        raise ValueError(f"register_verifier({name!r}): input must be 'answer' or 'response', got {input!r}")

    def deco(f):
        VERIFIERS[name] = VerifierSpec(f, input, plan)
        return f
    return deco(fn) if fn is not None else deco


def get_verifier_spec(task: str | None) -> VerifierSpec:
    key = task or "math"
    if key not in VERIFIERS:
        raise ValueError(f"no verifier for task {task!r}; known tasks: {', '.join(sorted(VERIFIERS))}")
    return VERIFIERS[key]


def get_verifier(task: str | None) -> Verifier:
    return get_verifier_spec(task).fn


def _extra(sample) -> dict:
    extra = getattr(sample, "extra", None)
    return extra if isinstance(extra, dict) else {}


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


def _tolerance(sample) -> tuple[float, float]:
    extra = _extra(sample)
    rel, abs_ = float(extra.get("rel_tol", 1e-6)), float(extra.get("abs_tol", 1e-9))
    if not (rel >= 0 and abs_ >= 0):
        raise ValueError(f"extra rel_tol / abs_tol must be >= 0, got {rel}, {abs_}")
    return rel, abs_


@register_verifier("number")
def verify_number(pred: str, answer: str, sample=None) -> float:
    """Numeric equality within tolerance: |pred - answer| <= max(rel_tol * max(|pred|, |answer|), abs_tol),
    extra["rel_tol"] (default 1e-6) and extra["abs_tol"] (default 1e-9): e.g. abs_tol=0.01 for answers
    read off a chart."""
    p, a = parse_number(pred), parse_number(answer)
    if p is None or a is None:
        return 0.0
    rel, abs_ = _tolerance(sample)
    return 1.0 if numbers_match(p, a, rel_tol=rel, abs_tol=abs_) else 0.0


@register_verifier("count")
def verify_count(pred: str, answer: str, sample=None) -> float:
    """A whole number (digits, "1,000", or the words zero..twelve), exactly; "3.5" is no count."""
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
_OPTION_LABEL = re.compile(r"^\s*[\(\[]?[A-Za-z][\)\].:]\s+")  # "A. red", "(B) green" -> the text


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
        hits = [i for i, o in enumerate(options) if _norm_text(_OPTION_LABEL.sub("", str(o), count=1)) == norm]
        if len(hits) == 1 and hits[0] < 26:
            return chr(ord("A") + hits[0])
    return None


def mcq_options(sample) -> list[str] | None:
    """extra["options"] or extra["choices"] (MathVista's name): a list in letter order, or a
    {"A": text, ...} dict; option texts may carry their label ("A. red")."""
    extra = _extra(sample)
    opts = extra.get("options", extra.get("choices"))
    if isinstance(opts, dict):
        return [str(v) for _, v in sorted(opts.items(), key=lambda kv: str(kv[0]))]
    if isinstance(opts, (list, tuple)) and len(opts) <= 26:
        return [str(o) for o in opts]
    return None


@register_verifier("mcq")
def verify_mcq(pred: str, answer: str, sample=None) -> float:
    """The chosen letter against the answer letter; the answer may also be one option's text (then
    its letter is looked up in the options), and so may the prediction."""
    options = mcq_options(sample)
    truth = parse_mcq_letter(answer, options)
    if truth is None:
        return 0.0
    got = parse_mcq_letter(pred, options)
    return 1.0 if got == truth else 0.0


# ----------------------------------------------------------------------------------------------
# free text: captions


def _norm_text(s: str) -> str:
    s = strip_latex(s).lower()
    s = re.sub(r"[^\w\s]", " ", s)
    return " ".join(s.split())


@register_verifier("caption")
def verify_caption(pred: str, answer: str, sample=None) -> float:
    """Exact match after lower-casing and dropping punctuation and extra spaces."""
    return 1.0 if _norm_text(pred) == _norm_text(answer) and _norm_text(answer) else 0.0


# ----------------------------------------------------------------------------------------------
# math: fast literal matching first, then math-verify in a worker process


def _norm_math(s: str) -> str:
    s = strip_latex(s)
    s = s.replace(" ", "").replace("\\{", "{").replace("\\}", "}")
    return s.lower()


def _is_letter_answer(answer: str) -> bool:
    return parse_mcq_letter(answer) is not None and len(strip_latex(answer)) <= 3


def verify_math_literal(pred: str, answer: str, sample=None) -> float:
    """Without sympy: a letter answer is graded as MCQ, a numeric one numerically, anything else by
    normalised string equality (no symbolic algebra, no eval)."""
    if _is_letter_answer(answer):
        return verify_mcq(pred, answer, sample)
    a = parse_number(answer)
    if a is not None:
        p = parse_number(pred)
        if p is None:
            return 0.0
        rel, abs_ = _tolerance(sample)
        return 1.0 if numbers_match(p, a, rel_tol=rel, abs_tol=abs_) else 0.0
    return 1.0 if _norm_math(pred) == _norm_math(answer) and _norm_math(answer) else 0.0


MATH_BACKENDS = ("auto", "math_verify", "literal")
_math_backend = "auto"
_has_math_verify: bool | None = None
_noted_fallback = False


def set_math_backend(backend: str) -> None:
    """auto: math-verify when installed, else literal matching (noted once in the log);
    math_verify: require it (ImportError when missing); literal: never use it."""
    global _math_backend
    if backend not in MATH_BACKENDS:
        raise ValueError(f"math backend must be one of {MATH_BACKENDS}, got {backend!r}")
    if backend == "math_verify" and not math_verify_available():
        raise ImportError("math backend 'math_verify' needs the math-verify package: pip install math-verify")
    _math_backend = backend


def math_verify_available() -> bool:
    global _has_math_verify
    if _has_math_verify is None:
        _has_math_verify = importlib.util.find_spec("math_verify") is not None
    return _has_math_verify


def _use_math_verify() -> bool:
    global _noted_fallback
    if _math_backend == "literal":
        return False
    if math_verify_available():
        return True
    if not _noted_fallback:
        _noted_fallback = True
        log.warning("math-verify is not installed: task 'math' is graded by literal matching (numbers, "
                    "letters, normalised strings), so symbolically equal answers like \\sqrt{4} vs 2 score 0; "
                    "pip install math-verify for symbolic equivalence")
    return False


_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
MAX_MATH_BRACE_DEPTH = 8  # math-verify's LaTeX parser slows down exponentially with brace depth (12: ~1 s)
_FACTORIAL = re.compile(r"(\d+|[)}\]])\s*!")


def hostile_math(s: str) -> bool:
    """Inputs we do not hand to sympy at all (the worker's time limit would catch them, at the cost of
    a killed and restarted worker each): power towers on constants (a^{b^{c}} with no variable:
    10^{10^{10}}, 9**9**9), exponents with more than 5 digits (10^{1000000}), and factorials of
    anything but a literal up to 1000 ((10^{10})!, 10001!), braces nested deeper than
    MAX_MATH_BRACE_DEPTH or three in a row ({{{x}}}: the LaTeX parser's slow path)."""
    if s.count("**") > 1 or "{{{" in s:
        return True
    for m in _FACTORIAL.finditer(s):
        if not m.group(1).isdigit() or int(m.group(1)) > 1000:
            return True
    stack: list[bool] = []  # per open "{": does it hold an exponent?
    level = 0  # exponent groups around the current position
    exp_next = False  # the next token is an exponent
    single_exp = False  # just read a one-token exponent (x^2): a "^" now stacks on it
    digits = 0
    nested = False
    for c in s:
        if c == "^":
            if level > 0 or single_exp or exp_next:
                nested = True
            exp_next, single_exp, digits = True, False, 0
            continue
        if c == "{":
            stack.append(exp_next)
            if len(stack) > MAX_MATH_BRACE_DEPTH:
                return True
            level += exp_next
            exp_next = single_exp = False
            continue
        if c == "}":
            if stack:
                level -= stack.pop()
            single_exp, digits = False, 0
            continue
        if c.isspace():
            continue
        if c.isdigit() and (level > 0 or exp_next):
            digits += 1
            if digits > 5:
                return True
        else:
            digits = 0
        single_exp = exp_next
        exp_next = False
    if nested and not re.search(r"[A-Za-z]", _LATEX_CMD.sub("", s)):
        return True
    return False


def plan_math(pred: str, answer: str, sample=None):
    """The math verifier's decision: a float when literal matching settles it, else a sandbox Job for
    math-verify (see verify_math)."""
    fast = verify_math_literal(pred, answer, sample)
    if fast or _is_letter_answer(answer):
        return fast
    if parse_number(pred) is not None and parse_number(answer) is not None:
        return fast  # two numbers: compared already
    if not _use_math_verify() or hostile_math(pred) or hostile_math(answer):
        return fast
    return Job("math_verify", (pred, answer))


MATH_WORKER_MEMORY_MB = 4096  # sympy gets this much address space per worker (MemoryError past it)


def math_pool():
    return get_pool("math_verify", preload=("math_verify",), memory_mb=MATH_WORKER_MEMORY_MB)


def verify_math(pred: str, answer: str, sample=None, *, timeout: float = 1.0) -> float:
    """Letters as MCQ, numbers numerically, identical normalised strings; otherwise, when math-verify
    is installed, its symbolic equivalence (\\sqrt{4} = 2, x^2+1 = 1+x^{2}, \\frac{\\pi}{2} = \\pi/2,
    intervals, sets) in a worker process killed after `timeout` seconds (then 0.0). Without
    math-verify: the literal matching alone (logged once). compute_rewards batches these jobs."""
    r = plan_math(pred, answer, sample)
    if not isinstance(r, Job):
        return float(r)
    res = math_pool().run([r], timeout=timeout)[0]
    return 1.0 if res.ok and res.value else 0.0


register_verifier("math", verify_math, plan=plan_math)


# ----------------------------------------------------------------------------------------------
# grounding

_FLOAT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_BOX4 = re.compile(rf"[\[\(]\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*[\]\)]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")  # JSON keys like "bbox_2d" hold digits that are no coordinate


def parse_box(s: str) -> tuple[float, float, float, float] | None:
    """[x1, y1, x2, y2] from "[10, 20, 30, 40]", "(10,20),(30,40)", Qwen's {"bbox_2d": [10, 20, 30, 40],
    "label": "cat"} (the first bracketed 4-tuple wins), or any text with exactly 4 numbers. Corners are
    sorted, so (x2, y2, x1, y1) is the same box."""
    if len(s) > 256:
        return None
    m = _BOX4.search(s)
    if m:
        nums = [float(m.group(i)) for i in range(1, 5)]
    else:
        found = _FLOAT.findall(_IDENT.sub(" ", s))
        if len(found) != 4:
            return None
        nums = [float(n) for n in found]
    if not all(math.isfinite(v) for v in nums):
        return None
    x1, y1, x2, y2 = nums
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


_box = parse_box  # the old private name


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


BBOX_SPACES = ("resized", "original", "norm1", "norm1000")


def _wh(v, what: str) -> tuple[float, float] | None:
    if v is None:
        return None
    if isinstance(v, dict):
        v = (v.get("width", v.get("w")), v.get("height", v.get("h")))
    try:
        w, h = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"extra[{what!r}] must be [width, height], got {v!r}") from None
    if not (w > 0 and h > 0):
        raise ValueError(f"extra[{what!r}] must be positive, got {v!r}")
    return w, h


def original_size(sample) -> tuple[float, float] | None:
    """(width, height) of the image the ground truth refers to: extra["image_size"] (or
    "original_size"), else the first image's own size."""
    extra = _extra(sample)
    for key in ("image_size", "original_size"):
        if extra.get(key) is not None:
            return _wh(extra[key], key)
    images = getattr(sample, "images", None) or []
    if images and hasattr(images[0], "size"):
        return _wh(images[0].size, "images[0].size")
    return None


def resized_size(sample) -> tuple[float, float] | None:
    """(width, height) of the image as the model saw it: extra["resized_size"], else from
    extra["image_grid_thw"] ([t, h, w] patches of extra["patch_size"], default 14 = Qwen2.5-VL's)."""
    extra = _extra(sample)
    if extra.get("resized_size") is not None:
        return _wh(extra["resized_size"], "resized_size")
    grid = extra.get("image_grid_thw")
    if grid is not None:
        if hasattr(grid, "tolist"):
            grid = grid.tolist()
        if grid and isinstance(grid[0], (list, tuple)):  # one row per image: the first image's
            grid = grid[0]
        try:
            _, gh, gw = (float(x) for x in grid)
        except (TypeError, ValueError):
            raise ValueError(f"extra['image_grid_thw'] must be [t, h, w], got {grid!r}") from None
        ps = float(extra.get("patch_size", 14))
        return _wh((gw * ps, gh * ps), "image_grid_thw")
    return None


def box_to_original(box, sample):
    """The predicted box in the ground truth's pixels, by extra["bbox_space"] (default "resized"):
      resized   pixels of the resized image the model saw (Qwen2.5-VL's absolute coordinates): scaled
                by original / resized size per axis; when either size is unknown, left as is (the
                image was not resized, or the ground truth is in the same space);
      original  already in the ground truth's pixels: left as is;
      norm1     fractions of the image in [0, 1]; norm1000: thousandths (Qwen2-VL / Qwen3-VL): scaled
                by the original size (which must then be known).
    """
    space = _extra(sample).get("bbox_space", "resized")
    if space not in BBOX_SPACES:
        raise ValueError(f"extra['bbox_space'] must be one of {BBOX_SPACES}, got {space!r}")
    if space == "original":
        return box
    orig = original_size(sample)
    if space in ("norm1", "norm1000"):
        if orig is None:
            raise ValueError(f"bbox_space {space!r} needs the original image size (extra['image_size'] or an image)")
        d = 1.0 if space == "norm1" else 1000.0
        sx, sy = orig[0] / d, orig[1] / d
    else:
        new = resized_size(sample)
        if orig is None or new is None:
            return box
        sx, sy = orig[0] / new[0], orig[1] / new[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


@register_verifier("bbox")
def verify_bbox(pred: str, answer: str, sample=None) -> float:
    """Grounding: the answer is [x1, y1, x2, y2] in the ORIGINAL image's pixels; the prediction is
    rescaled into that space first (box_to_original: extra bbox_space, image_size, resized_size or
    image_grid_thw + patch_size). Score: 1.0 when IoU >= extra["iou_threshold"] (default 0.5), or the
    IoU itself when extra["bbox_reward"] == "iou"."""
    p, a = parse_box(pred), parse_box(answer)
    if p is None or a is None:
        return 0.0
    iou = box_iou(box_to_original(p, sample), a)
    extra = _extra(sample)
    if extra.get("bbox_reward", "threshold") == "iou":
        return iou
    return 1.0 if iou >= float(extra.get("iou_threshold", 0.5)) else 0.0


def with_image_geometry(sample, image_grid_thw, patch_size: int = 14):
    """A copy of `sample` whose extra records the first image's original size and the patch grid the
    processor resized it to (image_size, image_grid_thw, patch_size; values already there win), so
    that verify_bbox can rescale. image_grid_thw: [3] or [n_images, 3] for this sample's images."""
    import dataclasses

    grid = image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else list(image_grid_thw)
    if grid and isinstance(grid[0], (list, tuple)):
        grid = grid[0]
    extra = dict(_extra(sample))
    extra.setdefault("image_grid_thw", [int(x) for x in grid])
    extra.setdefault("patch_size", int(patch_size))
    images = getattr(sample, "images", None) or []
    if images and hasattr(images[0], "size") and "original_size" not in extra:
        extra.setdefault("image_size", list(images[0].size))
    return dataclasses.replace(sample, extra=extra)


# ----------------------------------------------------------------------------------------------
# format only


@register_verifier("format", input="response")
def verify_format(response: str, answer: str, sample=None) -> float:
    """Accuracy = the strict answer format `<think>...</think>...\\boxed{...}` of the whole response
    (whatever it answers): for format warm-up rows mixed into a stage."""
    from .format import format_reward

    return format_reward(response, mode=_extra(sample).get("format_mode", "strict"))
