"""Time limits: hostile completions never hang or crash scoring; the worker pool kills overrunning jobs;
verifier and user-reward failures score 0 and are counted; user rewards by 'module:function'."""
import sys
import textwrap
import time
import uuid

import pytest

from staged.data import Sample
from staged.rewards import VERIFIERS, compute_rewards, load_reward_function, register_verifier
from staged.rewards import verifiers as V
from staged.rewards.format import MAX_RESPONSE_CHARS
from staged.rewards.sandbox import Job, WorkerPool

needs_math_verify = pytest.mark.skipif(not V.math_verify_available(), reason="math-verify is not installed")


def S(answer, task, **kw):
    return Sample(prompt="q", answer=answer, task=task, **kw)


# ----------------------------------------------------------------------------------------------
# hostile completions, every task


HOSTILE_ANSWERS = ["9**9**9**9", "10^{10^{10^{10}}}", "9^{9^{9^{9}}}", "(10^{10})!", "\\frac{10^{10^{8}}}{3}",
                   "{" * 12 + "x" + "}" * 12, "{" * 10_000 + "7" + "}" * 10_000, "9^9^9^9^9^9^9^9^9^9^9^9",
                   "9" * 60, "\\sqrt{" * 30 + "2" + "}" * 30]
HOSTILE_TEXTS = [f"<think>t</think>\\boxed{{{a}}}" for a in HOSTILE_ANSWERS] + [
    "x" * 10_000_000,
    " " * 10_000_000,
    "<think>" + "a " * 5_000_000 + "</think>\\boxed{7}",
    "<think>" + " /" * (MAX_RESPONSE_CHARS // 2 - 8),
    "\\boxed{" * (MAX_RESPONSE_CHARS // 8),
    "<think>t</think>\\boxed{" + "\\frac{" * 5000,
]
TASKS = ["math", "number", "count", "mcq", "bbox", "caption"]


@pytest.mark.parametrize("task", TASKS)
def test_hostile_completions_score_zero_fast(task):
    ans = {"bbox": "[1, 2, 3, 4]", "mcq": "C", "caption": "two circles"}.get(task, "7")
    for text in HOSTILE_TEXTS:
        t0 = time.perf_counter()
        out = compute_rewards([text], [S(ans, task)])
        dt = time.perf_counter() - t0
        assert dt < 1.0, (task, text[:40], dt)
        assert out["accuracy"].item() == 0.0, (task, text[:40])


@needs_math_verify
@pytest.mark.parametrize("answer", HOSTILE_ANSWERS[:6])
def test_hostile_math_reaching_sympy_is_killed_within_the_limit(answer, monkeypatch):
    """With the cheap guard switched off, the hostile answers go to math-verify/sympy, which hangs in
    C on several of them: the worker is killed at the limit, the row scores 0 and is counted."""
    monkeypatch.setattr(V, "hostile_math", lambda s: False)
    V.math_pool().warm()  # a replacement for the last killed worker: started, not charged to this call
    t0 = time.perf_counter()
    out = compute_rewards([f"<think>t</think>\\boxed{{{answer}}}"], [S("7", "math")], timeout=0.5)
    dt = time.perf_counter() - t0
    assert dt < 1.0, dt
    assert out["accuracy"].item() == 0.0
    assert out["verifier_errors"].item() == 0
    assert out["verifier_timeouts"].item() in (0.0, 1.0)  # 9**9**9**9 parses to nothing, fast
    # the pool recovers for the next row
    assert compute_rewards(["<think>t</think>\\boxed{\\sqrt{4}}"], [S("2", "math")])["accuracy"].item() == 1.0


@needs_math_verify
def test_one_hung_row_does_not_hold_up_the_batch(monkeypatch):
    monkeypatch.setattr(V, "hostile_math", lambda s: False)
    V.math_pool().warm()
    texts = ["<think>t</think>\\boxed{10^{10^{10^{10}}}}"] + ["<think>t</think>\\boxed{\\sqrt{4}}"] * 6
    t0 = time.perf_counter()
    out = compute_rewards(texts, [S("2", "math")] * len(texts), timeout=0.5)
    assert time.perf_counter() - t0 < 2.0
    assert out["accuracy"].tolist() == [0.0] + [1.0] * 6
    assert out["verifier_timeouts"].item() == 1.0


def test_in_process_verifier_errors_and_slowness_are_counted(monkeypatch):
    def boom(pred, answer, sample):
        raise RuntimeError("verifier bug")

    def slow(pred, answer, sample):
        time.sleep(0.06)
        return 1.0

    def nan(pred, answer, sample):
        return float("nan")

    monkeypatch.setitem(VERIFIERS, "boom", None)
    monkeypatch.setitem(VERIFIERS, "slow", None)
    monkeypatch.setitem(VERIFIERS, "nan", None)
    register_verifier("boom", boom)
    register_verifier("slow", slow)
    register_verifier("nan", nan)
    texts = ["<think>t</think>\\boxed{7}"] * 4
    out = compute_rewards(texts, [S("7", "boom"), S("7", "slow"), S("7", "nan"), S("7", "number")], timeout=0.05)
    assert out["accuracy"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert out["reward"].tolist() == pytest.approx([0.1, 0.1, 0.1, 1.0])  # the format point stays
    assert out["verifier_errors"].item() == 2 and out["verifier_timeouts"].item() == 1


# ----------------------------------------------------------------------------------------------
# the pool itself


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module of reward functions on a fresh import path entry; returns its name."""
    name = f"user_rewards_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        import os, time

        def sleep(completion, sample):
            time.sleep(float(completion))
            return 1.0

        def c_loop(completion, sample):
            return pow(10, 10 ** 9) and 1.0  # one C call: no signal handler ever runs

        def crash(completion, sample):
            os._exit(3)

        def raises(completion, sample):
            raise KeyError("no such column")

        def per_sample(completion, sample):
            return 1.0 if sample.extra.get("target", "?") in completion else 0.0

        def as_dict(completion, sample):
            return {"accuracy": 0.5, "format": 1.0}

        def with_reward(completion, sample):
            return {"accuracy": 1.0, "reward": 0.25}

        def sees_images(completion, sample):
            return float(len(sample.images))

        def returns_nan(completion, sample):
            return float("nan")

        def returns_text(completion, sample):
            return "yes"

        def prints(completion, sample):
            print("noise on stdout must not break the protocol")
            return 1.0

        def trl_style(completions, solution, **kwargs):
            return [1.0 if s in c else 0.0 for c, s in zip(completions, solution)]

        def batch_columns(completions, samples, prompts, task, colour=None):
            return [{"accuracy": float(col == "red"), "reward": float(len(p))} for col, p in zip(colour, prompts)]

        def wrong_length(completions, **kwargs):
            return [1.0]

        def none_for_na(completions, **kwargs):
            return [None for _ in completions]

        def marked(xs, samples):
            return [float(s.answer in x) for x, s in zip(xs, samples)]
        marked.batched = True

        def one_arg(completion):
            return 1.0
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_pool_timeout_crash_error_and_parallelism(user_module):
    pool = WorkerPool("test", size=2)
    try:
        assert pool.warm() == 2

        def job(fn, arg="0", timeout=None):
            return Job("call", (f"{user_module}:{fn}", sys.path, (arg, None), {}), timeout=timeout)

        t0 = time.perf_counter()
        res = pool.run([job("sleep", "0.3")] * 4, timeout=2.0)
        assert [r.status for r in res] == ["ok"] * 4 and time.perf_counter() - t0 < 1.1  # 2 at a time

        t0 = time.perf_counter()
        res = pool.run([job("c_loop"), job("sleep", "0")], timeout=0.3)
        assert [r.status for r in res] == ["timeout", "ok"]
        assert time.perf_counter() - t0 < 0.9

        res = pool.run([job("crash"), job("raises"), job("sleep", "0"), job("sleep", "5", timeout=0.2)], timeout=2.0)
        assert [r.status for r in res] == ["error", "error", "ok", "timeout"]
        assert "exit code 3" in res[0].value and "KeyError" in res[1].value
        assert pool.run([job("sleep", "0")])[0].ok  # recovered
        assert len(pool.workers) == 2
    finally:
        pool.close()
    assert all(w.proc.poll() is not None for w in pool.workers) or not pool.workers


def test_pool_that_cannot_start_reports_errors(monkeypatch):
    pool = WorkerPool("broken", size=1, preload=("no_such_module_for_staged_tests",))
    try:
        res = pool.run([Job("call", ("x:y", [], (), {}))] * 2, timeout=1.0)
        assert [r.status for r in res] == ["error", "error"]
        assert pool.broken and "died while starting" in pool.broken
        assert pool.run([Job("call")])[0].status == "error"  # stays broken, fails fast
    finally:
        pool.close()


# ----------------------------------------------------------------------------------------------
# user reward functions


def test_user_reward_per_completion(user_module):
    samples = [S("x", "mcq", extra={"target": "cat"}), S("x", "mcq", extra={"target": "dog"})]
    texts = ["<think>t</think>\\boxed{a cat}", "a cat"]
    out = compute_rewards(texts, samples, reward_fn=f"{user_module}:per_sample")
    assert out["accuracy"].tolist() == [1.0, 0.0]
    assert out["format"].tolist() == [1.0, 0.0]
    assert out["reward"].tolist() == pytest.approx([1.0, 0.0])

    out = compute_rewards(texts, samples, reward_fn=f"{user_module}:as_dict")
    assert out["accuracy"].tolist() == [0.5, 0.5] and out["format"].tolist() == [1.0, 1.0]
    assert out["reward"].tolist() == pytest.approx([0.55, 0.55])
    out = compute_rewards(texts, samples, reward_fn=f"{user_module}:with_reward", kind="accuracy")
    assert out["reward"].tolist() == [0.25, 0.25] and out["accuracy"].tolist() == [1.0, 1.0]
    out = compute_rewards(texts, samples, reward_fn=f"{user_module}:prints")
    assert out["accuracy"].tolist() == [1.0, 1.0]
    # images are not sent to the worker
    from PIL import Image

    out = compute_rewards(["a"], [S("x", "mcq", images=[Image.new("RGB", (8, 8))])],
                          reward_fn=f"{user_module}:sees_images")
    assert out["accuracy"].item() == 0.0 and out["verifier_errors"].item() == 0


def test_user_reward_batch_signatures(user_module):
    samples = [S("cat", "caption", extra={"colour": "red"}), S("dog", "caption", extra={"colour": "blue"}),
               S("cow", "caption")]
    texts = ["a cat", "a cat", "a cow"]
    out = compute_rewards(texts, samples, reward_fn=f"{user_module}:trl_style", kind="accuracy")
    assert out["accuracy"].tolist() == [1.0, 0.0, 1.0]  # TRL's convention: the answer as `solution`
    out = compute_rewards(texts, samples, reward_fn=f"{user_module}:batch_columns")
    assert out["accuracy"].tolist() == [1.0, 0.0, 0.0]  # extra columns, None where a row lacks one
    assert out["reward"].tolist() == [1.0, 1.0, 1.0]  # len("q")
    out = compute_rewards(texts, samples, reward_fn=f"{user_module}:marked")
    assert out["accuracy"].tolist() == [1.0, 0.0, 1.0]
    out = compute_rewards(texts, samples, reward_fn=f"{user_module}:none_for_na")
    assert out["accuracy"].tolist() == [0.0, 0.0, 0.0] and out["verifier_errors"].item() == 0
    out = compute_rewards(texts, samples, reward_fn=f"{user_module}:wrong_length")
    assert out["accuracy"].tolist() == [0.0, 0.0, 0.0] and out["verifier_errors"].item() == 3


def test_user_reward_failures_are_counted_not_raised(user_module):
    samples = [S("x", "mcq")] * 2
    for fn, errors, timeouts in [("raises", 2, 0), ("returns_nan", 2, 0), ("returns_text", 2, 0), ("crash", 2, 0),
                                 ("c_loop", 0, 2)]:
        t0 = time.perf_counter()
        out = compute_rewards(["a", "b"], samples, reward_fn=f"{user_module}:{fn}", timeout=0.3)
        assert time.perf_counter() - t0 < 2.0, fn
        assert out["accuracy"].tolist() == [0.0, 0.0], fn
        assert (out["verifier_errors"].item(), out["verifier_timeouts"].item()) == (errors, timeouts), fn


def test_bad_reward_function_specs(user_module):
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_reward_function("no_colon")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        load_reward_function(f"{user_module}:missing")
    with pytest.raises(ValueError, match="takes \\(completion, sample\\)"):
        load_reward_function(f"{user_module}:one_arg")
    with pytest.raises(ValueError, match="importable"):
        load_reward_function(lambda c, s: 1.0)
    ur = load_reward_function(f"{user_module}:trl_style")
    assert ur.batched and ur.params is None  # takes **kwargs: every column is passed
    import importlib

    fn = importlib.import_module(user_module).per_sample
    assert load_reward_function(fn).spec == f"{user_module}:per_sample" and not load_reward_function(fn).batched
