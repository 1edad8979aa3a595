"""Rewards: the paper's 0.9*accuracy + 0.1*format, per-task verifiers, hostile inputs."""
import time

import pytest
import torch

from staged.data import Sample
from staged.rewards import compute_rewards, compute_score, extract_boxed, too_complex
from staged.rewards.format import MAX_RESPONSE_CHARS, format_reward, normalize_tags
from staged.rewards.verifiers import parse_mcq_letter, parse_number

OPTIONS = ["red", "green", "blue", "yellow"]


def S(answer, task, **kw):
    return Sample(prompt="q", answer=answer, task=task, **kw)


def R(text, sample, **kw):
    out = compute_rewards([text], [sample], **kw)
    assert set(out) == {"reward", "accuracy", "format", "verifier_errors", "verifier_timeouts"}
    assert all(out[k].dtype == torch.float32 and out[k].shape == (1,) for k in ("reward", "accuracy", "format"))
    assert out["verifier_errors"].shape == () and out["verifier_timeouts"].shape == ()
    assert out["verifier_errors"].item() == 0 and out["verifier_timeouts"].item() == 0
    return {k: round(out[k].item(), 6) for k in ("reward", "accuracy", "format")}


def test_correct_incorrect_and_format():
    assert R("<think>3+4=7</think>\\boxed{7}", S("7", "number")) == {"reward": 1.0, "accuracy": 1.0, "format": 1.0}
    assert R("<think>3+4=8</think>\\boxed{8}", S("7", "number")) == {"reward": 0.1, "accuracy": 0.0, "format": 1.0}
    assert R("\\boxed{7}", S("7", "number")) == {"reward": 0.9, "accuracy": 1.0, "format": 0.0}
    assert R("7", S("7", "number")) == {"reward": 0.0, "accuracy": 0.0, "format": 0.0}  # no box, no answer
    assert R("< think >x</ think >\\boxed{7}", S("7", "number"))["reward"] == 1.0  # the paper's tag clean-up


@pytest.mark.parametrize("text,ok", [
    ("<think>a</think>\\boxed{1}", True),
    ("<think>a</think> so \\boxed{1} done", True),
    ("  <think>a</think>\\boxed{1}", True),  # whitespace next to '<' is dropped, as in the paper
    ("x<think>a</think>\\boxed{1}", False),  # must start with <think>
    ("<think>a\\boxed{1}", False),
    ("<think>a</think>", False),
    ("\\boxed{1}<think>a</think>", False),
    ("<think>a</think>\\boxed{}", False),  # empty answer
    ("<think>a</think>\\boxed{1", False),  # unclosed
    ("<think><think>a</think>\\boxed{1}", False),  # two think blocks: not well-formed
])
def test_strict_format(text, ok):
    assert format_reward(text) == float(ok)


def test_paper_format_mode_is_the_papers_regex():
    import re

    pat = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
    for t in ["<think>a</think>\\boxed{1}", "<think><think>a</think>\\boxed{}", "<think>a</think>\\boxed{",
              "<think>a</think>}\\boxed{", "x<think>a</think>\\boxed{1}", "<think></think></think>\\boxed{}}",
              "<think>\n</think>\n\\boxed{\n}\n"]:
        want = 1.0 if pat.fullmatch(normalize_tags(t)) else 0.0
        assert format_reward(t, mode="paper") == want, t


@pytest.mark.parametrize("pred", ["C", "(C)", "C.", "C)", "C) blue", "C: blue", "c", "[C]", "\\text{C}", "Option C",
                                  "The answer is C", "Answer: (C)", "blue", "Blue."])
def test_mcq_variants_right(pred):
    s = S("C", "mcq", extra={"options": OPTIONS})
    assert R(f"<think>t</think>\\boxed{{{pred}}}", s)["accuracy"] == 1.0


@pytest.mark.parametrize("pred", ["B", "(B)", "CD", "a circle", "Because", "green", "", "C or D", "C, D", "(C) and (D)",
                                  "C/D"])
def test_mcq_variants_wrong(pred):
    s = S("C", "mcq", extra={"options": OPTIONS})
    assert R(f"<think>t</think>\\boxed{{{pred}}}", s)["accuracy"] == 0.0


@pytest.mark.parametrize("pred,answer", [("1,000", "1000"), ("3.0", "3"), ("3/4", "0.75"), ("\\frac{3}{4}", "3/4"),
                                         ("\\dfrac{3}{4}", "0.75"), ("-2", "-2"), ("+5", "5"), ("$7$", "7"),
                                         ("50\\%", "50"), ("5 cm", "5"), ("12.", "12"), ("0.5", ".5"), ("seven", "7")])
def test_number_variants_right(pred, answer):
    assert R(f"<think>t</think>\\boxed{{{pred}}}", S(answer, "number"))["accuracy"] == 1.0


@pytest.mark.parametrize("pred", ["8", "7.01", "1,00", "3+4", "x", "7/0", "inf", "nan", "1e400"])
def test_number_variants_wrong(pred):
    assert R(f"<think>t</think>\\boxed{{{pred}}}", S("7", "number"))["accuracy"] == 0.0


def test_count_and_math_and_caption_and_bbox():
    assert R("<think>t</think>\\boxed{3}", S("3", "count"))["accuracy"] == 1.0
    assert R("<think>t</think>\\boxed{3.5}", S("3", "count"))["accuracy"] == 0.0
    assert R("<think>t</think>\\boxed{\\frac{1}{2}}", S("0.5", "math"))["accuracy"] == 1.0
    assert R("<think>t</think>\\boxed{x^2+1}", S("x^2+1", "math"))["accuracy"] == 1.0
    assert R("<think>t</think>\\boxed{(B)}", S("B", "math"))["accuracy"] == 1.0  # letters under the default task
    assert R("There are 2 red circles", S("There are 2 red circles.", "caption"))["accuracy"] == 1.0
    assert R("There are 3 red circles.", S("There are 2 red circles.", "caption"))["accuracy"] == 0.0
    assert R("<think>t</think>\\boxed{[10, 10, 50, 50]}", S("[12,12,50,50]", "bbox"))["accuracy"] == 1.0
    assert R("<think>t</think>\\boxed{[0, 0, 5, 5]}", S("[12,12,50,50]", "bbox"))["accuracy"] == 0.0


def test_boxed_extraction():
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{ 7 }") == "7"
    assert extract_boxed("\\boxed{{1}") is None
    assert extract_boxed("no box") is None


HOSTILE = [
    "\\boxed{9**9**9**9}",
    "<think>t</think>\\boxed{9**9**9**9}",
    "<think>t</think>\\boxed{9^9^9^9^9^9^9^9^9^9^9^9}",
    "<think>t</think>\\boxed{" + "9" * 60 + "}",
    "x" * 10_000_000,
    " " * 10_000_000,
    "<think>" + "a " * 5_000_000 + "</think>\\boxed{7}",
    "<think>t</think>\\boxed{" + "{" * 10_000 + "7" + "}" * 10_000,
    "<think>t</think>\\boxed{" + "{" * 10_000 + "7" + "}" * 10_001,
    "<think>" + " /" * (MAX_RESPONSE_CHARS // 2 - 8),  # worst case for the tag clean-up, just under the cap
    "<think></think>" * (MAX_RESPONSE_CHARS // 15),
    ("\\boxed{" * (MAX_RESPONSE_CHARS // 8)),
]


@pytest.mark.parametrize("i", range(len(HOSTILE)))
def test_hostile_inputs_are_fast_and_score_zero_accuracy(i):
    text = HOSTILE[i]
    t0 = time.perf_counter()
    out = compute_rewards([text], [S("7", "number")])
    assert time.perf_counter() - t0 < 1.0
    assert out["accuracy"].item() == 0.0
    assert out["reward"].item() <= 0.1 + 1e-6  # at most the format point


@pytest.mark.parametrize("i", [0, 4, 5, 7, 8])
def test_hostile_inputs_listed_in_the_spec_score_zero(i):
    assert compute_rewards([HOSTILE[i]], [S("7", "number")])["reward"].item() == 0.0


def test_too_complex_guard():
    assert too_complex("x" * 201) and too_complex("{" * 41) and too_complex("1" * 50) and too_complex("^" * 11)
    assert not too_complex("\\frac{3}{4}")
    # the guard wins over a correct value
    assert R("<think>t</think>\\boxed{" + "0" * 60 + "7}", S("7", "number"))["accuracy"] == 0.0


def test_kinds_and_batch():
    ss = [S("7", "number"), S("C", "mcq"), S("2", "count")]
    texts = ["<think>t</think>\\boxed{7}", "\\boxed{C}", "<think>t</think>\\boxed{3}"]
    paper = compute_rewards(texts, ss)
    assert paper["reward"].tolist() == pytest.approx([1.0, 0.9, 0.1])
    fmt = compute_rewards(texts, ss, kind="format")
    assert fmt["reward"].tolist() == [1.0, 0.0, 1.0] and fmt["accuracy"].tolist() == [0.0, 0.0, 0.0]
    assert compute_rewards(texts, ss, kind="accuracy")["reward"].tolist() == [1.0, 1.0, 0.0]
    assert compute_rewards(texts, ss, format_weight=0.5)["reward"].tolist() == pytest.approx([1.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="kind"):
        compute_rewards(texts, ss, kind="nope")
    with pytest.raises(ValueError, match="3 completions but 2 samples"):
        compute_rewards(texts, ss[:2])
    with pytest.raises(ValueError, match="no verifier for task 'audio'"):
        compute_rewards(["\\boxed{1}"], [S("1", "audio")])


def test_easyr1_compute_score_signature():
    out = compute_score([{"response": "<think>t</think>\\boxed{7}", "ground_truth": "7"},
                         {"response": "\\boxed{7}", "ground_truth": 8}])
    assert out == [{"overall": 1.0, "format": 1.0, "accuracy": 1.0}, {"overall": 0.0, "format": 0.0, "accuracy": 0.0}]


def test_parsers_directly():
    assert parse_number("1,234.5") == 1234.5 and parse_number("9**9") is None and parse_number("") is None
    assert parse_mcq_letter("(D) bottom right") == "D" and parse_mcq_letter("top left", ["top left", "x"]) == "A"
