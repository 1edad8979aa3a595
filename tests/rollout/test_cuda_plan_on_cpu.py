"""The paged engine's CUDA code path, run on a CPU: CUDA's plan (staged.rollout.plan) with the
tensors on the host. Prompts left-padded through the full model (one per forward with
invariant_rows), decode steps and first-token draws at exactly invariant_rows rows and static
shapes (run eagerly: graph capture is a GPU's), the host's look at the finished rows only every
check_every steps, the sampler's sorted nucleus over one vocabulary chunk, plain torch linears.

Rows end early and at max_new_tokens between the host's looks: a row at max_new_tokens decoded
again indexed past the output buffers, which on a GPU would have been a device-side assert on
the first rollout (found by emulating this path; fixed in the engine's ``decodable``).

The reference is the simple engine under the same plan (the same sampler branch: a sorted
nucleus draws other tokens than the CPU's radix one for the same uniform)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the tiny models and batches of test_engine
from test_engine import KINDS, make_batch, models, params, prompts_for, seeds_for  # noqa: E402,F401 (models: a fixture)

from staged.rollout import generate, plan, sample_tokens, select_rows  # noqa: E402

T = 10  # max_new_tokens: with the end tokens of test_engine's params, some rows end early, some at T


@pytest.fixture(autouse=True)
def cuda_plan(monkeypatch):
    monkeypatch.setitem(plan.PLANS, "cpu", plan.CUDA)


def batch_and_seeds(group=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(prompts_for(gen), group, gen)
    return batch, seeds_for(batch["input_ids"].shape[0])


# (invariant_rows, slots, check_every): fewer rows per pass than live rows (several passes per
# step), more than the slots (padding rows in every pass), none (power-of-two buckets), each
# with the host looking every few steps
CASES = [(4, 0, 8), (4, 5, 3), (0, 0, 8), (0, 3, 5), (64, 5, 8), (64, 0, 8)]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_plan_gives_the_simple_engines_completions(models, kind, top_p):
    model = models(kind)
    batch, seeds = batch_and_seeds()
    B = batch["input_ids"].shape[0]
    ref = generate(model, batch, params(engine="simple", max_new_tokens=T, top_p=top_p), seeds=seeds)
    lengths = ref.completion_mask.sum(-1)
    assert (lengths == T).any() and (lengths < T).any(), "rows should end early and at max_new_tokens"
    m = ref.completion_mask.bool()
    for rows, slots, every in CASES:
        ro = generate(model, batch, params(max_new_tokens=T, top_p=top_p, invariant_rows=rows, batch_size=slots,
                                           check_every=every), seeds=seeds)
        case = (rows, slots, every)
        assert torch.equal(ro.completion_ids, ref.completion_ids), case
        assert torch.equal(ro.completion_mask, ref.completion_mask), case
        torch.testing.assert_close(ro.logprobs[m], ref.logprobs[m], atol=1e-5, rtol=0, msg=lambda s: f"{case}: {s}")
        st = ro.stats
        assert st["free_blocks_end"] == st["cache_blocks"], case
        assert not st["cuda_graphs"] and st["graph_captures"] == 0, case  # eager: capture is a GPU's
        assert st["attention"] == "torch", case
        # one prompt per forward with invariant rows; else prefill_tokens' worth (all 4 prompts)
        assert st["prefill_forwards"] == (B // 3 if rows else 1), case
        # the host looked every few steps only: rows that ended in between were decoded on until
        # then (those at max_new_tokens were not: the tokens above)
        assert st["decode_row_steps"] > int((lengths - 1).sum()), case


@pytest.mark.parametrize("kind", KINDS)
def test_with_invariant_rows_a_rows_bits_ignore_its_neighbours(models, kind):
    """Every step and first-token draw at exactly invariant_rows rows and each prompt prefilled
    alone: a row decoded alone, among others, or with fewer slots gets the same bits -- with the
    GPU path's plain kernels, whose rounding follows the shapes (unlike the CPU's).

    Each subset holds a row of the longest prompt: the torch attention (the only one a CPU runs
    here) reads block tables as wide as the longest row of the call can grow, and its reductions'
    rounding follows that width; the GPU's triton / flash kernels read each row's own length."""
    model = models(kind)
    batch, seeds = batch_and_seeds()
    B = batch["input_ids"].shape[0]
    p = dict(max_new_tokens=T, top_p=0.9, invariant_rows=4)
    ref = generate(model, batch, params(**p), seeds=seeds)
    for rows, slots in (([B - 3], 0), ([B - 1, 2, 5], 2), (list(range(B))[::-1], 7)):
        got = generate(model, select_rows(batch, rows), params(batch_size=slots, **p), seeds=seeds[rows])
        assert got.stats["free_blocks_end"] == got.stats["cache_blocks"]
        for i, r in enumerate(rows):
            n = int(ref.completion_mask[r].sum())
            assert int(got.completion_mask[i].sum()) == n, (rows, slots, r)
            assert torch.equal(got.completion_ids[i, :n], ref.completion_ids[r, :n]), (rows, slots, r)
            assert torch.equal(got.logprobs[i, :n], ref.logprobs[r, :n]), (rows, slots, r)


def test_the_sampler_takes_the_gpus_nucleus(monkeypatch):
    """CUDA's plan reaches the sampler too (which the comparison above cannot show: the simple
    engine samples with the same branch): the nucleus drawn in sorted order, where a uniform
    near 0 draws the most likely token, not the CPU's vocabulary order (the nucleus' first id)."""
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]])  # nucleus at 0.9: tokens 2, 3, 1
    u = torch.tensor([1e-6], dtype=torch.float64)
    assert sample_tokens(logits, u, 1.0, 0.9)[0].tolist() == [2]
    monkeypatch.setitem(plan.PLANS, "cpu", plan.CPU)
    assert sample_tokens(logits, u, 1.0, 0.9)[0].tolist() == [1]
