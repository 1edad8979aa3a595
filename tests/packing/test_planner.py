"""Packing planner: invariants, C++ == Python to the bit, error messages, balance, fallback.

The C++ planner (staged._C) and its pure-Python twin must return identical plans and identical
ValueError messages. Agreement tests skip with a reason where the extension is not built.
"""
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from staged.packing import (
    DEFAULT_COST_B,
    DEFAULT_COST_VISION,
    HAS_EXT,
    backend_name,
    plan_micro_batches,
    plan_python,
    sample_cost,
)
from staged.packing import planner as planner_module

needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason=f"C++ planner unavailable: {planner_module._EXT_MISSING_REASON}")


def plan_cpp(*args):
    from staged import _C

    return _C.plan_micro_batches(*args)


# ---------------------------------------------------------------------------------------------
# Random inputs: small counts, so that equal lengths and equal costs (ties) are frequent.

COST_A = [1.0, 0.0, 0.1, 3.7]
COST_B = [DEFAULT_COST_B, 0.0, 1 / 3, 0.01, 1e-9]  # 1/3 and 0.1: costs that round
COST_VISION = [DEFAULT_COST_VISION, 0.0, 2.5]


@st.composite
def planner_inputs(draw, max_n=40, max_ranks=9):
    """Positional arguments of the raw planners."""
    n = draw(st.integers(0, max_n))
    budget = draw(st.integers(1, 64))
    lengths = draw(st.lists(st.integers(0, budget), min_size=n, max_size=n))
    num_groups = draw(st.integers(1, max(1, n)))
    group_ids = draw(st.none() | st.lists(st.integers(0, num_groups - 1), min_size=n, max_size=n))
    patches = draw(st.none() | st.lists(st.integers(0, 100), min_size=n, max_size=n))
    ranks = draw(st.integers(1, max_ranks))
    costs = (draw(st.sampled_from(COST_A)), draw(st.sampled_from(COST_B)),
             draw(st.sampled_from(COST_VISION)))
    return (lengths, group_ids, patches, budget, ranks, *costs)


def random_inputs(rng: random.Random, max_n=40, max_ranks=9):
    """The same distribution as planner_inputs, for plain seeded loops (cheaper per case)."""
    n = rng.randint(0, max_n)
    budget = rng.randint(1, 64)
    lengths = [rng.randint(0, budget) for _ in range(n)]
    num_groups = rng.randint(1, max(1, n))
    group_ids = None if rng.random() < 0.2 else [rng.randrange(num_groups) for _ in range(n)]
    patches = None if rng.random() < 0.5 else [rng.randint(0, 100) for _ in range(n)]
    return (lengths, group_ids, patches, budget, rng.randint(1, max_ranks),
            rng.choice(COST_A), rng.choice(COST_B), rng.choice(COST_VISION))


def check_invariants(args, plan):
    """Every index once, budget kept, equal micro-batch counts, groups on one rank, order."""
    lengths, group_ids, patches, budget, ranks, a, b, v = args
    assert len(plan) == ranks
    counts = {len(mbs) for mbs in plan}
    assert len(counts) == 1, f"micro-batch counts differ across ranks: {counts}"
    seen = sorted(i for mbs in plan for mb in mbs for i in mb)
    assert seen == list(range(len(lengths)))
    rank_of_group = {}
    for r, mbs in enumerate(plan):
        costs = []
        for mb in mbs:
            assert sum(lengths[i] for i in mb) <= budget
            assert [lengths[i] for i in mb] == sorted((lengths[i] for i in mb), reverse=True)
            costs.append(sum(sample_cost(lengths[i], patches[i] if patches else 0, a, b, v)
                             for i in mb))
            for i in mb:
                group = group_ids[i] if group_ids is not None else ("own", i)
                assert rank_of_group.setdefault(group, r) == r, f"group {group} split"
        # Heaviest micro-batch first; padding (empty) only at the end.
        assert costs == sorted(costs, reverse=True)
        # First-fit never leaves a micro-batch empty: empty ones are padding, at the end.
        filled = [len(mb) > 0 for mb in mbs]
        assert filled == sorted(filled, reverse=True)


# ---------------------------------------------------------------------------------------------
# Invariants


@settings(max_examples=300, deadline=None)
@given(planner_inputs())
def test_invariants_python(args):
    check_invariants(args, plan_python(*args))


@needs_ext
@settings(max_examples=300, deadline=None)
@given(planner_inputs())
def test_invariants_cpp(args):
    check_invariants(args, plan_cpp(*args))


def test_known_plan():
    """Worked by hand: KK puts groups {2, 0} (load 16) on rank 0 and {1} (10) on rank 1."""
    lengths, groups = [5, 3, 8, 2, 7, 1], [0, 0, 1, 1, 2, 2]
    want = [[[4, 1], [0, 5]], [[2, 3], []]]
    for backend in ["python"] + (["cpp"] if HAS_EXT else []):
        plan = plan_micro_batches(lengths, groups, 10, 2, cost_b=0.0, backend=backend)
        assert plan.micro_batches == want
        assert plan.rank_loads == [16.0, 10.0] and plan.rank_tokens == [16, 10]
        assert plan.num_micro_batches == 2 and plan.backend == backend
        assert plan.imbalance == pytest.approx(16 / 13)


def test_empty_input_gives_equal_empty_ranks():
    plan = plan_micro_batches([], [], 100, 4)
    assert plan.micro_batches == [[], [], [], []]
    assert plan.num_micro_batches == 0 and plan.imbalance == 1.0


def test_more_ranks_than_groups_pads_with_empty_micro_batches():
    plan = plan_micro_batches([10, 10, 20, 8], ["a", "a", "b", "b"], 25, 5)
    assert plan.num_micro_batches == 2
    assert plan.micro_batches[0] == [[2], [3]]  # group b: 28 tokens, over the budget of 25
    assert plan.micro_batches[1] == [[0, 1], []]
    assert plan.micro_batches[2:] == [[[], []]] * 3
    assert plan.rank_tokens == [28, 20, 0, 0, 0]


def test_array_inputs_and_any_hashable_group_ids():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=200)
    groups = [f"prompt-{i // 5}" for i in range(200)]
    patches = rng.integers(0, 1000, size=200)
    plan = plan_micro_batches(lengths, groups, 1024, 4, vision_patches=patches)
    same = plan_micro_batches(lengths.tolist(), [i // 5 for i in range(200)], 1024, 4,
                              vision_patches=patches.tolist())
    assert plan.micro_batches == same.micro_batches
    assert sum(plan.rank_tokens) == int(lengths.sum())
    for backend in ["python"] + (["cpp"] if HAS_EXT else []):  # numpy scalars, tuples
        scalars = plan_micro_batches(list(lengths), tuple(groups), 1024, 4,
                                     vision_patches=tuple(patches), backend=backend)
        assert scalars.micro_batches == plan.micro_batches


# ---------------------------------------------------------------------------------------------
# C++ == Python, bit for bit


@needs_ext
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planner_inputs())
def test_cpp_matches_python(args):
    assert plan_cpp(*args) == plan_python(*args)


@needs_ext
@pytest.mark.parametrize("cases, max_n, max_ranks", [(10_000, 40, 9), (1_000, 400, 33)])
def test_cpp_matches_python_seeded_cases(cases, max_n, max_ranks):
    rng = random.Random(20260521 + max_n)
    for case in range(cases):
        args = random_inputs(rng, max_n, max_ranks)
        assert plan_cpp(*args) == plan_python(*args), f"case {case}: {args}"


@needs_ext
@pytest.mark.parametrize("n, group_size, ranks, budget", [
    (20_000, 8, 8, 16384),      # a big step: 2500 groups of 8 on 8 ranks
    (3_000, 5, 64, 8192),       # many ranks: long Karmarkar-Karp partitions
    (40, 4, 1000, 4096),        # far more ranks than groups
    (5_000, 1, 1, 65536),       # one rank: everything is first-fit decreasing
])
def test_cpp_matches_python_at_scale(n, group_size, ranks, budget):
    rng = random.Random(n)
    lengths = [rng.randint(0, min(budget, 6000)) for _ in range(n)]
    groups = [i // group_size for i in range(n)]
    rng.shuffle(groups)  # a group's samples need not be adjacent
    patches = [rng.choice([0, 0, 256, 1024, 4096]) for _ in range(n)]
    args = (lengths, groups, patches, budget, ranks, 1.0, DEFAULT_COST_B, DEFAULT_COST_VISION)
    plan = plan_cpp(*args)
    assert plan == plan_python(*args)
    check_invariants(args, plan)


# ---------------------------------------------------------------------------------------------
# Errors: ValueError with the numbers, the same message from both backends


BAD_INPUTS = [
    # (lengths, group_ids, patches, budget, ranks, a, b, v), message pattern
    (([3, -2], None, None, 10, 1, 1.0, 0.0, 0.0), r"lengths\[1\] is -2: token counts must be in \[0, 2147483647\]"),
    (([3, 2**31], None, None, 2**40, 1, 1.0, 0.0, 0.0), r"lengths\[1\] is 2147483648"),
    (([3, 2**70], None, None, 10, 1, 1.0, 0.0, 0.0), r"lengths\[1\] is 1180591620717411303424"),
    (([4, 9000, 1], None, None, 8192, 2, 1.0, 0.0, 0.0), r"sample 1 has 9000 tokens, more than the token budget of 8192"),
    (([1], None, None, 0, 1, 1.0, 0.0, 0.0), r"token_budget must be >= 1 \(tokens per micro-batch\), got 0"),
    (([1], None, None, -2**70, 1, 1.0, 0.0, 0.0), r"token_budget must be >= 1 .*got -1180591620717411303424"),
    (([1], None, None, 5, 0, 1.0, 0.0, 0.0), r"num_ranks must be in \[1, 1048576\], got 0"),
    (([1], None, None, 5, 2**70, 1.0, 0.0, 0.0), r"num_ranks must be in \[1, 1048576\], got 1180591620717411303424"),
    (([1, 2], [0], None, 5, 1, 1.0, 0.0, 0.0), r"group_ids has 1 entries but lengths has 2"),
    (([1, 2], [0, 0], [1, 2, 3], 5, 1, 1.0, 0.0, 0.0), r"vision_patches has 3 entries but lengths has 2"),
    (([1, 2], None, [0, -7], 5, 1, 1.0, 0.0, 0.0), r"vision_patches\[1\] is -7: patch counts must be in"),
    (([1], None, None, 5, 1, -1.0, 0.0, 0.0), r"cost_a must be a finite number >= 0, got -1.0"),
    (([1], None, None, 5, 1, 1.0, math.nan, 0.0), r"cost_b must be a finite number >= 0, got nan"),
    (([1], None, None, 5, 1, 1.0, 0.0, math.inf), r"cost_vision must be a finite number >= 0, got inf"),
    (([2**30] * 3, None, None, 2**31, 1, 1.0, 1e290, 0.0), r"the total cost of all samples is inf"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_messages(args, message):
    lengths, groups, patches, budget, ranks, a, b, v = args
    with pytest.raises(ValueError, match=message):
        plan_micro_batches(lengths, groups, budget, ranks, vision_patches=patches,
                           cost_a=a, cost_b=b, cost_vision=v, backend="python")
    if HAS_EXT:
        with pytest.raises(ValueError, match=message):
            plan_micro_batches(lengths, groups, budget, ranks, vision_patches=patches,
                               cost_a=a, cost_b=b, cost_vision=v, backend="cpp")


def test_bad_backend_and_non_integer_counts():
    with pytest.raises(ValueError, match="backend must be 'auto', 'cpp' or 'python', got 'gpu'"):
        plan_micro_batches([1], None, 4, 1, backend="gpu")
    for backend in ["python"] + (["cpp"] if HAS_EXT else []):
        with pytest.raises(TypeError):
            plan_micro_batches([1.5], None, 4, 1, backend=backend)
        with pytest.raises(TypeError):
            plan_micro_batches([1], [[0]], 4, 1, backend=backend)  # unhashable group id


def corrupt(rng: random.Random, args):
    """Random inputs with one field made invalid."""
    lengths, groups, patches, budget, ranks, a, b, v = args
    lengths = list(lengths) or [1]
    groups = None if groups is None else list(groups) + [0] * (len(lengths) - len(groups))
    patches = None if patches is None else list(patches) + [0] * (len(lengths) - len(patches))
    i = rng.randrange(len(lengths))
    kind = rng.randrange(8)
    if kind == 0:
        lengths[i] = -rng.randint(1, 10**6)
    elif kind == 1:
        lengths[i] = budget + rng.randint(1, 100)
    elif kind == 2:
        budget = -rng.randint(0, 100)
    elif kind == 3:
        ranks = -rng.randint(0, 3)
    elif kind == 4:
        groups = [0] * (len(lengths) + rng.choice([-1, 1]))
    elif kind == 5:
        patches = [0] * len(lengths)
        patches[i] = -rng.randint(1, 50)
    elif kind == 6:
        a = -rng.random()
    else:
        b = rng.choice([math.nan, math.inf, -1e-300])
    return (lengths, groups, patches, budget, ranks, a, b, v)


@needs_ext
def test_cpp_and_python_raise_the_same_messages():
    rng = random.Random(7)
    for case in range(2_000):
        args = corrupt(rng, random_inputs(rng))
        messages = []
        for planner in (plan_cpp, plan_python):
            with pytest.raises(ValueError) as info:
                planner(*args)
            messages.append(str(info.value))
        assert messages[0] == messages[1], f"case {case}: {args}"


# ---------------------------------------------------------------------------------------------
# Balance quality


def round_robin_imbalance(lengths, groups, ranks):
    loads = [0.0] * ranks
    for length, group in zip(lengths, groups):
        loads[group % ranks] += sample_cost(length)
    return max(loads) / (sum(loads) / ranks)


@pytest.mark.parametrize("seed", range(5))
def test_karmarkar_karp_balances_uniform_lengths(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(16, 4096) for _ in range(256 * 8)]  # 256 prompts x 8 completions
    groups = [i // 8 for i in range(len(lengths))]
    plan = plan_micro_batches(lengths, groups, 8192, 8)
    assert plan.imbalance < 1.001, plan.rank_loads
    assert plan.imbalance <= round_robin_imbalance(lengths, groups, 8)
    assert plan.rank_loads == sorted(plan.rank_loads, reverse=True)  # rank 0 heaviest


def test_quadratic_term_changes_the_balance():
    """One long sample against many short ones: with b > 0 it costs more than its tokens.

    Linear: 16000 + 8 x 1000 tokens balance 24 x 1000. Quadratic (b = 2^-15): the long one
    costs 16000 + 7812.5, a short one 1030.5, so its rank takes only 4 short ones.
    """
    lengths = [16000] + [1000] * 32
    linear = plan_micro_batches(lengths, None, 16384, 2, cost_b=0.0)
    quadratic = plan_micro_batches(lengths, None, 16384, 2)
    assert sorted(linear.rank_tokens) == [24000, 24000] and linear.imbalance == 1.0
    long_rank = next(r for r, mbs in enumerate(quadratic.micro_batches) if [0] in mbs or
                     any(0 in mb for mb in mbs))
    assert quadratic.rank_tokens[long_rank] == 16000 + 4 * 1000
    assert quadratic.imbalance < 1.02


# ---------------------------------------------------------------------------------------------
# Backend selection


def test_backend_name_follows_the_extension():
    assert backend_name() == ("cpp" if HAS_EXT else "python")
    assert plan_micro_batches([1, 2], None, 4, 1).backend == backend_name()


def test_staged_no_ext_forces_the_twin():
    code = (
        "from staged.packing import HAS_EXT, backend_name, plan_micro_batches\n"
        "assert not HAS_EXT and backend_name() == 'python'\n"
        "assert plan_micro_batches([3, 1], [0, 1], 4, 2).backend == 'python'\n"
        "try:\n"
        "    plan_micro_batches([3], None, 4, 1, backend='cpp')\n"
        "except RuntimeError as exc:\n"
        "    assert 'STAGED_NO_EXT=1' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('backend=cpp ran with STAGED_NO_EXT=1')\n"
    )
    env = dict(os.environ, STAGED_NO_EXT="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
