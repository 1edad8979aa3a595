"""Synthetic datasets: deterministic per seed, every answer recomputed from what was drawn."""
import pytest

from staged.data import Sample, make_synthetic_dataset
from staged.data.render import draw_digit, inked_cells
from staged.data.synthetic import KINDS, LETTERS, SHAPES, SUBTASKS, caption_for, quadrant

ALL = {k: {sub: 1.0 for sub in subs} for k, subs in SUBTASKS.items()}
from staged.rewards import compute_rewards

N = 64


def _key(s: Sample):
    return (s.prompt, s.answer, s.task, s.pass_rate, s.reference_response, [im.tobytes() for im in s.images])


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_seed(kind):
    a = make_synthetic_dataset(kind, 16, seed=3)
    b = make_synthetic_dataset(kind, 16, seed=3)
    c = make_synthetic_dataset(kind, 16, seed=4)
    assert [_key(s) for s in a] == [_key(s) for s in b]
    assert [_key(s) for s in a] != [_key(s) for s in c]
    assert [_key(s) for s in make_synthetic_dataset(kind, 4, seed=3)] == [_key(s) for s in a[:4]]


def _check_objects(s):
    objs = s.extra["objects"]
    assert len(s.images) == 1 and s.images[0].size == (56, 56)
    assert inked_cells(s.images[0]) == sorted(tuple(o["cell"]) for o in objs)  # recount from the pixels
    return objs


def test_perception_answers():
    subtasks = set()
    for s in make_synthetic_dataset("perception", N, seed=0, mix=ALL["perception"]):
        objs = _check_objects(s)
        sub = s.extra["subtask"]
        subtasks.add(sub)
        truth = {"count": lambda: str(len(objs)), "colour": lambda: objs[0]["colour"],
                 "position": lambda: quadrant(objs[0]["cell"], 56), "shape": lambda: objs[0]["shape"]}[sub]()
        assert s.task == "mcq"
        assert s.answer == LETTERS[s.extra["options"].index(truth)]
        assert f"({s.answer}) {truth}" in s.prompt
        if sub == "count":
            assert len({o["shape"] for o in objs}) == 1 and f"{objs[0]['shape']}s" in s.prompt
    assert subtasks == {"count", "colour", "position", "shape"}


def test_textual_answers():
    for s in make_synthetic_dataset("textual", N, seed=0):
        a, b, op = s.extra["a"], s.extra["b"], s.extra["op"]
        assert s.prompt == f"What is {a} {op} {b}?" and not s.images
        want = a + b if op == "+" else a - b
        assert want >= 0 and s.answer == str(want) and s.task == "number"


def test_visual_answers():
    subtasks = set()
    for s in make_synthetic_dataset("visual", N, seed=0, mix=ALL["visual"]):
        sub = s.extra["subtask"]
        subtasks.add(sub)
        if sub.startswith("count"):
            value = len(_check_objects(s))
            if sub == "count":  # the perception count's thought, answered with the number
                assert s.reference_response == f"<think>{value} {s.extra['objects'][0]['shape']}" \
                    f"{'s' if value > 1 else ''}</think>\\boxed{{{value}}}"
        else:
            value = s.extra["digit"]
            assert s.images[0].tobytes() == draw_digit(value, 56, colour=_ink_colour(s.images[0])).tobytes()
        want = value + s.extra["x"] if s.extra["op"] == "+" else value - s.extra["x"]
        assert s.extra["value"] == value and s.answer == str(want) and want >= 0
    assert subtasks == {"count", "count_add", "count_sub", "digit_add"}


def _ink_colour(img):
    from staged.data.render import BACKGROUND, COLOURS

    px = {p for p in img.getdata()} - {BACKGROUND}
    (rgb,) = px
    return next(k for k, v in COLOURS.items() if v == rgb)


def test_caption_answers():
    for s in make_synthetic_dataset("caption", N, seed=0):
        objs = _check_objects(s)
        assert s.answer == s.reference_response == caption_for(objs) and s.task == "caption"
        assert objs[0]["shape"] in SHAPES


@pytest.mark.parametrize("kind", KINDS)
def test_reference_responses_score_full_marks(kind):
    ss = make_synthetic_dataset(kind, N, seed=1, mix=ALL.get(kind))
    r = compute_rewards([s.reference_response for s in ss], ss)
    assert r["accuracy"].min() == 1.0
    if kind != "caption":  # the caption SFT target is plain text, not the think/boxed format
        assert r["format"].min() == 1.0 and r["reward"].min() == 1.0
    assert all(0.0 <= s.pass_rate <= 1.0 for s in ss)
    assert len({s.pass_rate for s in ss}) > 1  # a usable curriculum signal


def test_default_mix_uses_the_learnable_subtasks():
    for kind in ("perception", "visual"):
        on = {k for k, w in SUBTASKS[kind].items() if w > 0}
        assert {s.extra["subtask"] for s in make_synthetic_dataset(kind, N, seed=0)} == on
    only = make_synthetic_dataset("perception", 8, seed=0, mix={"shape": 1.0})
    assert {s.extra["subtask"] for s in only} == {"shape"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown perception subtasks"):
        make_synthetic_dataset("perception", 1, seed=0, mix={"smell": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        make_synthetic_dataset("visual", 1, seed=0, mix={"count_add": 0.0})
    with pytest.raises(ValueError, match="no subtasks"):
        make_synthetic_dataset("textual", 1, seed=0, mix={"x": 1.0})
    with pytest.raises(ValueError, match="kind"):
        make_synthetic_dataset("audio", 1, seed=0)
    with pytest.raises(ValueError, match="multiple of 28"):
        make_synthetic_dataset("perception", 1, seed=0, image_size=50)
    assert len(make_synthetic_dataset("perception", 3, seed=0, image_size=112)[0].images[0].tobytes()) == 112 * 112 * 3
