"""Packing planner: which samples go to which data-parallel rank, in which micro-batch.

One GRPO step has n samples (prompt + completion) in G groups (the G completions of a prompt
share a group id). The planner returns, for each of k ranks, a list of micro-batches of sample
indices, built in two steps:

1. **Groups -> ranks: multi-way Karmarkar-Karp** (largest differencing method). Every group
   starts as a k-way partition with the group alone in one subset. Repeatedly the two
   partitions with the largest spread (heaviest minus lightest subset) are joined, heaviest
   subset of one with lightest of the other, until one partition is left; its subset i goes to
   rank i (rank 0 carries the heaviest load). A group is never split across ranks.
2. **Samples -> micro-batches on each rank: first-fit decreasing** on token counts, longest
   first, so that no micro-batch holds more than ``token_budget`` tokens. Micro-batches are then
   ordered heaviest first on every rank: ranks run their j-th micro-batches in lockstep (FSDP
   collectives), so the step takes about sum_j max_r cost(r, j), which pairing heavy with heavy
   minimises. Inside a micro-batch samples are longest first.

Guarantees: every index appears exactly once; every micro-batch holds at most ``token_budget``
tokens; every rank has the SAME number of micro-batches -- a rank that needs fewer is padded at
the end with empty micro-batches (``[]``), on which it must still run its forward and backward
(e.g. one dummy token with zero loss weight) so that all-gathers and reduce-scatters line up.
More ranks than groups is allowed: the extra ranks get only empty micro-batches. Empty input
gives k ranks with zero micro-batches each. Ties are broken by index, so the result is a
deterministic function of the input.

Two implementations give IDENTICAL output and identical ``ValueError`` messages: the C++
extension ``staged._C`` (fast; used when built) and ``plan_python`` below, its line-by-line
twin (used when the extension is missing or ``STAGED_NO_EXT=1``). Costs are doubles computed
in the same order in both, and afterwards only added and subtracted, so they agree to the bit.
Change one, change the other: tests/packing/test_planner.py compares them.

Complexity: O(G (k log k + log G)) for Karmarkar-Karp with O(k) memory per merged partition
alive, O(n log n) for first-fit decreasing (a max-tree finds the first micro-batch with room).
"""
from __future__ import annotations

import heapq
import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence
from staged.packing.extension import load_native

# ---------------------------------------------------------------------------------------------
# Cost model: cost(sample) = a*L + b*L^2 + v*P, with L its tokens and P its vision patches.
#
# Units are arbitrary (only ratios matter); a = 1 makes one LLM token cost 1. Forward+backward
# of an LLM with N parameters, n_layers layers and hidden size d costs about 6*N*L FLOPs in the
# matmuls plus 6*n_layers*d*L^2 in causal attention, so b/a = n_layers*d/N: 1.5e-5 for
# Qwen2.5-VL-7B's LLM (28 layers, d=3584, 6.5B non-embedding parameters), 2.6e-5 for the 3B.
# Attention kernels reach a lower fraction of peak than GEMMs, so we take b = 2^-15 (3.05e-5):
# the quadratic term adds 6% at L=2048, 12.5% at L=4096 and equals the linear term at L=32768.
# A power of two also makes b*L^2 exact.
#
# P counts patches of the vision tower (before the 2x2 merge; the merged image tokens are
# already in L). The tower is ~0.67B parameters against the LLM's 3-7B and attends mostly
# within windows, so a patch costs about 0.1-0.2 of a token, linearly: v = 0.1. Set v near
# (vision params / LLM params), a third of that when the tower is frozen (no backward).
# Patches do not count against the token budget: the budget bounds the packed LLM rows.

DEFAULT_COST_A = 1.0
DEFAULT_COST_B = 2.0**-15
DEFAULT_COST_VISION = 0.1

# Bounds shared with csrc/planner.cpp.
MAX_COUNT = 2**31 - 1  # tokens or patches per sample: L*L stays exact in 64-bit integers
MAX_RANKS = 1 << 20  # guards a swapped argument; Karmarkar-Karp memory grows with k
_BUDGET_CAP = 1 << 62  # any larger budget packs identically (a rank never holds 2^62 tokens)
_MAX_TOTAL_COST = 1e300  # below this no partial sum of costs can overflow


def sample_cost(length: int, vision_patches: int = 0, cost_a: float = DEFAULT_COST_A,
                cost_b: float = DEFAULT_COST_B, cost_vision: float = DEFAULT_COST_VISION) -> float:
    """Cost of one sample, rounded exactly as both planners round it."""
    return cost_a * length + cost_b * (length * length) + cost_vision * vision_patches


# ---------------------------------------------------------------------------------------------
# Backends


_plan_cpp, _EXT_MISSING_REASON = load_native("plan_micro_batches")
HAS_EXT: bool = _plan_cpp is not None


def backend_name() -> str:
    """The backend ``backend="auto"`` uses: "cpp" when staged._C is usable, else "python"."""
    return "cpp" if HAS_EXT else "python"


# ---------------------------------------------------------------------------------------------
# The pure-Python twin of csrc/planner.cpp: same steps, same order, same messages.


def plan_python(lengths: Sequence[int], group_ids: Sequence[Any] | None,
                vision_patches: Sequence[int] | None, token_budget: int, num_ranks: int,
                cost_a: float, cost_b: float, cost_vision: float) -> list[list[list[int]]]:
    """Same arguments and result as ``staged._C.plan_micro_batches``: list[rank][mb][sample]."""
    k = operator.index(num_ranks)
    if not 1 <= k <= MAX_RANKS:
        raise ValueError(f"num_ranks must be in [1, {MAX_RANKS}], got {k}")
    budget = operator.index(token_budget)
    if budget < 1:
        raise ValueError(f"token_budget must be >= 1 (tokens per micro-batch), got {budget}")
    budget = min(budget, _BUDGET_CAP)
    a, b, v = float(cost_a), float(cost_b), float(cost_vision)
    for name, x in (("cost_a", a), ("cost_b", b), ("cost_vision", v)):
        if not (x >= 0.0 and math.isfinite(x)):
            raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")

    lengths = list(lengths)
    n = len(lengths)
    if group_ids is not None:
        group_ids = list(group_ids)
        if len(group_ids) != n:
            raise ValueError(f"group_ids has {len(group_ids)} entries but lengths has {n}: "
                             "give one GRPO group id per sample")
    if vision_patches is not None:
        vision_patches = list(vision_patches)
        if len(vision_patches) != n:
            raise ValueError(f"vision_patches has {len(vision_patches)} entries but lengths has "
                             f"{n}: give one count per sample")

    # Per sample, in index order: length, budget, patches, group id (the C++ order).
    length = [0] * n
    cost = [0.0] * n
    group_of = [0] * n
    group_number: dict[Any, int] = {}  # group id -> dense number, in order of first appearance
    total = 0.0
    for i in range(n):
        L = operator.index(lengths[i])
        if not 0 <= L <= MAX_COUNT:
            raise ValueError(f"lengths[{i}] is {L}: token counts must be in [0, {MAX_COUNT}]")
        if L > budget:
            raise ValueError(f"sample {i} has {L} tokens, more than the token budget of "
                             f"{budget} per micro-batch")
        P = 0
        if vision_patches is not None:
            P = operator.index(vision_patches[i])
            if not 0 <= P <= MAX_COUNT:
                raise ValueError(f"vision_patches[{i}] is {P}: patch counts must be in "
                                 f"[0, {MAX_COUNT}]")
        if group_ids is not None:
            group_of[i] = group_number.setdefault(group_ids[i], len(group_number))
        else:
            group_of[i] = i  # no group ids: every sample is its own group
        c = a * L + b * (L * L) + v * P
        length[i] = L
        cost[i] = c
        total += c
    if not total <= _MAX_TOTAL_COST:
        raise ValueError(f"the total cost of all samples is {total!r}, too close to overflowing "
                         "a double: lower cost_a, cost_b or cost_vision")

    num_groups = len(group_number) if group_ids is not None else n
    group_members: list[list[int]] = [[] for _ in range(num_groups)]
    group_load = [0.0] * num_groups
    for i in range(n):
        group_members[group_of[i]].append(i)
        group_load[group_of[i]] += cost[i]

    rank_head, next_group = _karmarkar_karp(group_load, k)
    per_rank = []
    for r in range(k):
        samples = []
        g = rank_head[r]
        while g >= 0:
            samples.extend(group_members[g])
            g = next_group[g]
        per_rank.append(_pack_rank(samples, length, cost, budget))
    count = max(len(mbs) for mbs in per_rank)
    for mbs in per_rank:
        mbs.extend([] for _ in range(count - len(mbs)))  # equal counts: FSDP lockstep
    return per_rank


# A partition is (load, head, tail), each of length k, heaviest subset first; a subset's groups
# form a linked list through next_group (head/tail -1 when empty), so joining is O(1).
_Partition = tuple[list[float], list[int], list[int]]


def _karmarkar_karp(group_load: list[float], k: int) -> tuple[list[int], list[int]]:
    """Groups -> ranks. Returns each rank's first group (-1: none) and the next-group links."""
    G = len(group_load)
    next_group = [-1] * G
    if G == 0:
        return [-1] * k, next_group

    def view(entry: int | _Partition) -> _Partition:
        if isinstance(entry, int):  # a group not merged yet, kept implicit as in C++
            return [group_load[entry]] + [0.0] * (k - 1), [entry] + [-1] * (k - 1), \
                   [entry] + [-1] * (k - 1)
        return entry

    # Heap of (-spread, id, partition): largest spread first, ties by smallest id (groups are
    # 0..G-1 in order of first appearance, merges G, G+1, ...). Ids are unique, so the
    # partition itself is never compared.
    heap = [(-(0.0 if k == 1 else group_load[g]), g, g) for g in range(G)]
    heapq.heapify(heap)
    next_id = G
    while len(heap) > 1:
        x = view(heapq.heappop(heap)[2])
        y = view(heapq.heappop(heap)[2])
        merged = _difference(x, y, k, next_group)
        heapq.heappush(heap, (-(merged[0][0] - merged[0][k - 1]), next_id, merged))
        next_id += 1
    return view(heap[0][2])[1], next_group


def _difference(x: _Partition, y: _Partition, k: int, next_group: list[int]) -> _Partition:
    """Join x's heaviest subset with y's lightest, and so on; re-sort heaviest first (stable)."""
    x_load, x_head, x_tail = x
    y_load, y_head, y_tail = y
    load, head, tail = [0.0] * k, [-1] * k, [-1] * k
    for j in range(k):
        r = k - 1 - j
        load[j] = x_load[j] + y_load[r]
        if x_head[j] < 0:
            head[j], tail[j] = y_head[r], y_tail[r]
        elif y_head[r] < 0:
            head[j], tail[j] = x_head[j], x_tail[j]
        else:
            next_group[x_tail[j]] = y_head[r]
            head[j], tail[j] = x_head[j], y_tail[r]
    order = sorted(range(k), key=lambda j: -load[j])
    return [load[j] for j in order], [head[j] for j in order], [tail[j] for j in order]


def _pack_rank(samples: list[int], length: list[int], cost: list[float],
               budget: int) -> list[list[int]]:
    """One rank's samples -> micro-batches by first-fit decreasing, heaviest micro-batch first."""
    samples.sort(key=lambda i: (-length[i], i))
    bins: list[list[int]] = []
    bin_cost: list[float] = []
    if samples:
        # Max-tree over the room left in each micro-batch. Unopened ones have the full budget
        # and come after the opened ones, so "leftmost with room" is exactly first fit.
        size = 1
        while size < len(samples):
            size <<= 1
        room = [budget] * (2 * size)
        for i in samples:
            need = length[i]
            node = 1
            while node < size:
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            mb = node - size
            if mb == len(bins):
                bins.append([])
                bin_cost.append(0.0)
            bins[mb].append(i)
            bin_cost[mb] += cost[i]
            room[node] -= need
            node >>= 1
            while node:
                left, right = room[2 * node], room[2 * node + 1]
                most = left if left > right else right
                if room[node] == most:
                    break  # unchanged here, so unchanged above
                room[node] = most
                node >>= 1
    order = sorted(range(len(bins)), key=lambda j: -bin_cost[j])
    return [bins[j] for j in order]


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class PackPlan:
    """A packing plan for one step.

    micro_batches: ``micro_batches[rank][j]`` is the list of sample indices of rank's j-th
        micro-batch; every rank has ``num_micro_batches`` of them (trailing ``[]`` are padding).
    rank_loads: cost per rank (the cost model above), summed in plan order.
    rank_tokens: tokens per rank.
    imbalance: max(rank_loads) / mean(rank_loads); 1.0 is perfect, and 1.0 for an all-zero
        load. With more ranks than groups it cannot be 1.0.
    num_micro_batches: micro-batches per rank, the same on every rank.
    backend: "cpp" or "python", whichever made the plan.
    """

    micro_batches: list[list[list[int]]]
    rank_loads: list[float]
    rank_tokens: list[int]
    imbalance: float
    num_micro_batches: int
    backend: str


def _as_list(values: Any) -> list:
    """A list: numpy arrays and tensors through .tolist() (Python ints, fast), others list()."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def plan_micro_batches(lengths: Sequence[int], group_ids: Sequence[Any] | None, token_budget: int,
                       num_ranks: int, *, vision_patches: Sequence[int] | None = None,
                       cost_a: float = DEFAULT_COST_A, cost_b: float = DEFAULT_COST_B,
                       cost_vision: float = DEFAULT_COST_VISION, backend: str = "auto") -> PackPlan:
    """Plan micro-batches for ``num_ranks`` data-parallel ranks (see the module docstring).

    lengths: tokens per sample (prompt + completion): ints >= 0, a list, numpy array or tensor.
    group_ids: the GRPO group of each sample (any hashable; samples of a group need not be
        adjacent), or None to make every sample its own group.
    token_budget: the most tokens one micro-batch may hold; a longer sample is a ValueError.
    num_ranks: data-parallel ranks (>= 1).
    vision_patches: vision-tower patches per sample (ints >= 0), or None for none.
    cost_a, cost_b, cost_vision: the cost model a*L + b*L^2 + v*P used to balance ranks.
    backend: "auto" (C++ when built and STAGED_NO_EXT != "1", else Python), "cpp" (a
        RuntimeError when the extension is unavailable) or "python".
    Raises ValueError, with the numbers, on negative counts, a sample over the budget,
    token_budget < 1, num_ranks < 1 and sequences of different lengths.
    """
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'python', got {backend!r}")
    if backend == "cpp" and not HAS_EXT:
        raise RuntimeError(f"backend='cpp' but the C++ planner is unavailable: "
                           f"{_EXT_MISSING_REASON}")
    use_cpp = backend == "cpp" or (backend == "auto" and HAS_EXT)
    planner = _plan_cpp if use_cpp else plan_python

    lengths = _as_list(lengths)
    group_ids = None if group_ids is None else _as_list(group_ids)
    vision_patches = None if vision_patches is None else _as_list(vision_patches)
    cost_a, cost_b, cost_vision = float(cost_a), float(cost_b), float(cost_vision)
    micro_batches = planner(lengths, group_ids, vision_patches, token_budget, num_ranks,
                            cost_a, cost_b, cost_vision)

    # Loads from the plan itself, so they describe what was returned (the counts are valid:
    # the planner checked them). Summed in plan order.
    tokens = list(map(operator.index, lengths))
    patches = [0] * len(tokens) if vision_patches is None else \
        list(map(operator.index, vision_patches))
    cost = [cost_a * L + cost_b * (L * L) + cost_vision * P  # sample_cost, inlined
            for L, P in zip(tokens, patches)]
    rank_loads, rank_tokens = [], []
    for rank in micro_batches:
        load, total = 0.0, 0
        for mb in rank:
            for i in mb:
                load += cost[i]
                total += tokens[i]
        rank_loads.append(load)
        rank_tokens.append(total)
    mean = sum(rank_loads) / len(rank_loads)
    imbalance = max(rank_loads) / mean if mean > 0 else 1.0
    return PackPlan(micro_batches=micro_batches, rank_loads=rank_loads, rank_tokens=rank_tokens,
                    imbalance=imbalance, num_micro_batches=len(micro_batches[0]),
                    backend="cpp" if use_cpp else "python")
