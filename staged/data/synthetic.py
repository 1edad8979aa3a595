"""Synthetic data for the embedded default: one generator per stage kind, deterministic per seed.

kind         task      what
perception   mcq       4-option questions about a 56x56 image of 1-4 solid shapes, one per 28-px cell:
                       how many (count), what colour; optional: where (quadrant), what shape
textual      number    "What is 3 + 4?" over single digits (+ and -, never negative)
visual       number    what the image shows, as a number: "How many circles are in the image? Answer with
                       the number." (the perception stage's count, thought "2 circles", answered "2" instead
                       of a letter), and arithmetic on it: "Count the circles in the image and add 3." (or
                       subtract); optional: "What is the number in the image plus 3?" (a bitmap digit)
caption      caption   "Describe the image." -> "There are 2 red circles." (the caption-SFT ablation)

The stages compose: visual reasoning = the perception stage's counting/reading + the textual stage's
arithmetic, which is what the paper's ordering argument is about.

Every sample carries `pass_rate` (a difficulty proxy in [0, 1], higher = easier: fewer objects,
smaller operands) and `reference_response` in the paper's format `<think>...</think>\\boxed{ANSWER}`
(the caption kind's is the plain caption: its SFT target), and `extra` records what was drawn so
that tests can recompute every answer.
"""
from __future__ import annotations

import random

from .render import COLOURS, SHAPES, draw_digit, draw_objects, grid_cells
from .sample import Sample

KINDS = ("perception", "textual", "visual", "caption")
LETTERS = "ABCD"
COLOUR_NAMES = tuple(COLOURS)  # red green blue yellow
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
COUNT_OPTIONS = ("1", "2", "3", "4")

# Subtasks inside a kind and their default weights. Weight 0 = off by default: a freshly initialised
# tiny model does not learn those in minutes on a CPU (measured with SFT on reference responses:
# count and colour reach 100% in ~200 steps; position stalls near 55%, shape and bitmap digits at
# chance after 300), so they would only add noise to the demo's curves. Pass `mix=` to use them.
SUBTASKS = {
    "perception": {"count": 0.6, "colour": 0.4, "position": 0.0, "shape": 0.0},
    "visual": {"count": 0.5, "count_add": 0.3, "count_sub": 0.2, "digit_add": 0.0},
}


def make_synthetic_dataset(kind: str, n: int, *, seed: int, image_size: int = 56,
                           mix: dict[str, float] | None = None) -> list[Sample]:
    """n samples of one stage kind (see the module doc); the same arguments give the same samples (a
    string-seeded random.Random: independent of PYTHONHASHSEED, numpy and torch, and of other kinds).

    mix: subtask -> weight for "perception" (count, colour, position, shape) and "visual" (count_add,
    count_sub, digit_add); default SUBTASKS[kind]. image_size: a multiple of 28 (56 = 4 image tokens).
    """
    if kind not in KINDS:
        raise ValueError(f"synthetic kind must be one of {KINDS}, got {kind!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    grid_cells(image_size)  # validates the size
    weights = None
    if kind in SUBTASKS:
        weights = dict(SUBTASKS[kind]) if mix is None else dict(mix)
        unknown = sorted(set(weights) - set(SUBTASKS[kind]))
        if unknown:
            raise ValueError(f"unknown {kind} subtasks {unknown}; known: {sorted(SUBTASKS[kind])}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"{kind} mix weights must be >= 0 with a positive sum, got {weights}")
        weights = tuple((k, w) for k, w in weights.items() if w > 0)
    elif mix is not None:
        raise ValueError(f"synthetic kind {kind!r} has no subtasks to mix")
    rng = random.Random(f"staged-synthetic:{kind}:{seed}")
    make = {"perception": _perception, "textual": _textual, "visual": _visual, "caption": _caption}[kind]
    return [make(rng, image_size, weights) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# helpers


def _pick(rng: random.Random, mix) -> str:
    names, weights = zip(*mix)
    return rng.choices(names, weights=weights)[0]


def _objects(rng: random.Random, size: int, count: int, shape: str | None = None, colour: str | None = None,
             cells: list[tuple[int, int]] | None = None) -> list[dict]:
    """`count` objects in distinct cells, big enough to fill most of their cell (radius 8-11 px)."""
    n = grid_cells(size)
    all_cells = [(r, c) for r in range(n) for c in range(n)]
    cells = cells if cells is not None else sorted(rng.sample(all_cells, count))
    out = []
    for cell in cells:
        r = rng.randint(8, 11)
        slack = 14 - r - 1
        out.append({
            "shape": shape or rng.choice(SHAPES), "colour": colour or rng.choice(COLOUR_NAMES),
            "cell": cell, "r": r, "dx": rng.randint(-slack, slack), "dy": rng.randint(-slack, slack),
        })
    return out


def _options_text(options) -> str:
    return " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def _response(thought: str, answer: str) -> str:
    return f"<think>{thought}</think>\\boxed{{{answer}}}"


def _plural(word: str, k: int) -> str:
    return word if k == 1 else word + "s"


def quadrant(cell: tuple[int, int], size: int) -> str:
    half = grid_cells(size) / 2
    row, col = cell
    return QUADRANTS[(2 if row >= half else 0) + (1 if col >= half else 0)]


# ----------------------------------------------------------------------------------------------
# perception: 4-option multiple choice about the image


def _perception(rng: random.Random, size: int, mix) -> Sample:
    sub = _pick(rng, mix)
    if sub == "count":
        k = rng.randint(1, 4)
        shape = rng.choice(SHAPES)
        objs = _objects(rng, size, k, shape=shape, colour=rng.choice(COLOUR_NAMES))
        options, correct = COUNT_OPTIONS, str(k)
        question = f"How many {shape}s are in the image?"
        thought = f"{k} {_plural(shape, k)}"
        pass_rate = 0.9 - 0.15 * (k - 1)  # more objects, harder
    elif sub == "colour":
        shape = rng.choice(SHAPES)
        objs = _objects(rng, size, 1, shape=shape)
        options, correct = COLOUR_NAMES, objs[0]["colour"]
        question = f"What colour is the {shape}?"
        thought = correct
        pass_rate = 0.85
    elif sub == "position":
        shape = rng.choice(SHAPES)
        objs = _objects(rng, size, 1, shape=shape)
        options, correct = QUADRANTS, quadrant(objs[0]["cell"], size)
        question = f"Where is the {shape}?"
        thought = correct
        pass_rate = 0.7
    else:  # shape
        objs = _objects(rng, size, 1)
        options, correct = SHAPES, objs[0]["shape"]
        question = "What shape is in the image?"
        thought = correct
        pass_rate = 0.6  # triangle vs diamond is the hardest distinction here
    letter = LETTERS[options.index(correct)]
    return Sample(
        prompt=f"{question} {_options_text(options)}",
        answer=letter, task="mcq", images=[draw_objects(objs, size)], pass_rate=round(pass_rate, 3),
        extra={"kind": "perception", "subtask": sub, "objects": objs, "options": list(options), "value": correct},
        reference_response=_response(thought, letter),
    )


# ----------------------------------------------------------------------------------------------
# textual reasoning: single-digit arithmetic in words


def _textual(rng: random.Random, size: int, mix=None) -> Sample:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    result = a + b if op == "+" else a - b
    # Bigger operands and a carry into a second digit are harder.
    pass_rate = 0.95 - 0.04 * max(a, b) - (0.15 if result >= 10 else 0.0) - (0.05 if op == "-" else 0.0)
    return Sample(
        prompt=f"What is {a} {op} {b}?", answer=str(result), task="number", pass_rate=round(pass_rate, 3),
        extra={"kind": "textual", "a": a, "b": b, "op": op},
        reference_response=_response(f"{a}{op}{b}={result}", str(result)),
    )


# ----------------------------------------------------------------------------------------------
# visual reasoning: arithmetic on what the image shows


def _visual(rng: random.Random, size: int, mix) -> Sample:
    sub = _pick(rng, mix)
    if sub == "count":  # the perception stage's count, answered with the number instead of a letter
        k = rng.randint(1, 4)
        shape = rng.choice(SHAPES)
        objs = _objects(rng, size, k, shape=shape, colour=rng.choice(COLOUR_NAMES))
        return Sample(
            prompt=f"How many {shape}s are in the image? Answer with the number.", answer=str(k), task="number",
            images=[draw_objects(objs, size)], pass_rate=round(0.9 - 0.15 * (k - 1), 3),
            extra={"kind": "visual", "subtask": sub, "objects": objs, "value": k, "x": 0, "op": "+"},
            reference_response=_response(f"{k} {_plural(shape, k)}", str(k)),
        )
    if sub in ("count_add", "count_sub"):
        k = rng.randint(1, 4)
        shape = rng.choice(SHAPES)
        objs = _objects(rng, size, k, shape=shape, colour=rng.choice(COLOUR_NAMES))
        image = draw_objects(objs, size)
        if sub == "count_add":
            x = rng.randint(1, 5)
            op, result, verb = "+", k + x, "add"
        else:
            x = rng.randint(0, k)
            op, result, verb = "-", k - x, "subtract"
        prompt = f"Count the {shape}s in the image and {verb} {x}."
        pass_rate = 0.8 - 0.1 * (k - 1) - 0.02 * x - (0.05 if op == "-" else 0.0)
        extra = {"kind": "visual", "subtask": sub, "objects": objs, "value": k, "x": x, "op": op}
    else:  # digit_add
        d = rng.randint(0, 9)
        x = rng.randint(1, 5)
        image = draw_digit(d, size, colour=rng.choice(COLOUR_NAMES))
        k, op, result = d, "+", d + x
        prompt = f"What is the number in the image plus {x}?"
        pass_rate = 0.5 - 0.02 * x - (0.1 if result >= 10 else 0.0)
        extra = {"kind": "visual", "subtask": sub, "digit": d, "value": d, "x": x, "op": op}
    return Sample(
        prompt=prompt, answer=str(result), task="number", images=[image], pass_rate=round(pass_rate, 3),
        extra=extra, reference_response=_response(f"{k}{op}{x}={result}", str(result)),
    )


# ----------------------------------------------------------------------------------------------
# caption pairs (caption SFT instead of perception RL: the paper's ablation)


def caption_for(objects: list[dict]) -> str:
    """The caption of an image of same-looking objects: "There are 2 red circles." """
    k = len(objects)
    shape, colour = objects[0]["shape"], objects[0]["colour"]
    return f"There {'is' if k == 1 else 'are'} {k} {colour} {_plural(shape, k)}."


def _caption(rng: random.Random, size: int, mix=None) -> Sample:
    k = rng.randint(1, 4)
    objs = _objects(rng, size, k, shape=rng.choice(SHAPES), colour=rng.choice(COLOUR_NAMES))
    caption = caption_for(objs)
    return Sample(
        prompt="Describe the image.", answer=caption, task="caption", images=[draw_objects(objs, size)],
        pass_rate=round(0.9 - 0.15 * (k - 1), 3), extra={"kind": "caption", "objects": objs},
        reference_response=caption,
    )
