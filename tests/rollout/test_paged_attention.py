"""The CPU decode attention over the paged cache (staged.rollout.paged_attention, torch path, eager
steps): a row's output is the same bits in any length group and on any thread count, and equals
a float64 reference."""
from __future__ import annotations

import types

import pytest
import torch

from staged.rollout.engine import _length_groups
from staged.rollout.paged_attention import _attend_by_length, token_index

BS, KV, HEADS, D = 16, 2, 4, 32


def _rows(lens, gen):
    """A pool and rows of ``lens`` tokens (sorted, as a step groups them) over shuffled blocks."""
    need = sum(-(-n // BS) for n in lens)
    keys = torch.randn(need + 3, BS, KV, D, generator=gen)
    values = torch.randn(need + 3, BS, KV, D, generator=gen)
    free = torch.randperm(need + 3, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lens]
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    query = torch.randn(len(lens), HEADS, 1, D, generator=gen)
    return keys, values, table, query


def _attend(query, keys, values, table, lens, scale):
    seqlens = torch.tensor(lens)
    step = types.SimpleNamespace(token_index=token_index(table, seqlens, BS), by_length=_length_groups(lens))
    return _attend_by_length(query, keys, values, step, scale)


def _reference(query, keys, values, table, lens, scale):
    out = []
    for r, n in enumerate(lens):
        idx = token_index(table[r:r + 1], torch.tensor([n]), BS)
        k = keys.view(-1, KV, D)[idx].double().repeat_interleave(HEADS // KV, 1)    # [n, heads, D]
        v = values.view(-1, KV, D)[idx].double().repeat_interleave(HEADS // KV, 1)
        p = torch.einsum("hd,nhd->hn", query[r, :, 0].double(), k).mul(scale).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(out)[:, None]                                                # [S, 1, heads, D]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_rows_attention_is_the_same_bits_alone_as_in_its_length_group(threads, seed):
    """Length groups of several rows over a few hundred keys (where torch's CPU flash attention,
    given several threads, shares a one-query call's work out by how many rows it holds), a lone
    row, an awkward length: each row attended alone gives the bits it got beside the others."""
    gen = torch.Generator().manual_seed(seed)
    lens = sorted([300] * 5 + [257] * 3 + [7, 513] + [int(torch.randint(200, 700, (1,), generator=gen))] * 2)
    keys, values, table, query = _rows(lens, gen)
    scale = D ** -0.5
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = _attend(query, keys, values, table, lens, scale)
        for r in range(len(lens)):
            alone = _attend(query[r:r + 1], keys, values, table[r:r + 1], lens[r:r + 1], scale)
            assert torch.equal(alone, together[r:r + 1]), (r, lens[r])
        assert torch.get_num_threads() == threads  # restored after the attention's one-thread block
    finally:
        torch.set_num_threads(old)
    ref = _reference(query, keys, values, table, lens, scale)
    assert torch.allclose(together.double(), ref, rtol=1e-5, atol=1e-5)


def test_the_attention_is_the_same_bits_on_one_thread_and_two():
    """Two ranks on one CPU run a thread each (torchrun sets OMP_NUM_THREADS=1), one process runs
    several: a rollout must sample the same tokens either way."""
    gen = torch.Generator().manual_seed(5)
    lens = [40, 300, 300, 300, 600]
    keys, values, table, query = _rows(lens, gen)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_attend(query, keys, values, table, lens, 0.2))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])
