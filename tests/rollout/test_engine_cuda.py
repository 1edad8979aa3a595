"""The paged engine on a CUDA GPU (skipped elsewhere; ``make gpu-check`` runs this file): what a
CPU cannot show. Decode steps replayed as CUDA graphs give the eager steps' bits; the host looks
at the finished rows only every ``check_every`` steps there, so rows sit at max_new_tokens or past
their end for a few steps (the first GPU run of round 2 would have indexed past the output
buffers); with ``invariant_rows`` a row's tokens do not depend on the rows beside it; the
log-probs are a full forward's."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the tiny models and batches of test_engine
from test_engine import ENDS, VE, build, full_forward_logprobs, make_batch, params, prompts_for, seeds_for  # noqa: E402

from staged.rollout import generate, select_rows  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(kind, dtype):
        if (kind, dtype) not in cache:
            cache[kind, dtype] = build(kind).to(CUDA, dtype)
        return cache[kind, dtype]

    return get


def batch_and_seeds(group=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(prompts_for(gen), group, gen)
    return batch, seeds_for(batch["input_ids"].shape[0])


@pytest.mark.parametrize("attention", ["triton", "torch"])
@pytest.mark.parametrize("ends", ["varied", "none"])
@pytest.mark.parametrize("invariant_rows", [64, 0])
def test_graphs_replay_the_eager_steps_bit_for_bit(models, attention, ends, invariant_rows):
    """Graphs on vs off (the same padded static shapes run eagerly: cuBLAS picks its kernels by
    shape, so only those are comparable to the bit): the same tokens, mask and log-probs; with no
    end token drawn (ends 'none') every row runs to max_new_tokens while the host looks only
    every 8 steps."""
    model = models("qwen2_5_vl", torch.bfloat16)
    batch, seeds = batch_and_seeds()
    kw = dict(attention=attention, invariant_rows=invariant_rows, eos_token_ids=ENDS if ends == "varied" else (VE,))
    eager = generate(model, batch, params(cuda_graphs=False, static_shapes=True, **kw), seeds=seeds, device=CUDA,
                     dtype=torch.bfloat16)
    graphed = generate(model, batch, params(cuda_graphs=True, **kw), seeds=seeds, device=CUDA, dtype=torch.bfloat16)
    assert graphed.stats["cuda_graphs"] and graphed.stats["graph_replays"] > 0, graphed.stats
    assert graphed.stats["attention"] == attention
    lengths = graphed.completion_mask.sum(-1)
    if ends == "none":
        assert lengths.tolist() == [14] * len(lengths)
    else:
        assert len(set(lengths.tolist())) > 1
    assert torch.equal(graphed.completion_ids, eager.completion_ids)
    assert torch.equal(graphed.completion_mask, eager.completion_mask)
    assert torch.equal(graphed.logprobs, eager.logprobs)
    assert graphed.stats["free_blocks_end"] == graphed.stats["cache_blocks"]


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_rows_tokens_ignore_its_neighbours_and_match_a_full_forward(models, kind):
    """invariant_rows (the default): every step at exactly that many rows, so a row decoded alone,
    or among other rows, or with fewer slots, gets the same bits. fp32 (TF32 off): the
    log-probs are a full forward's of the sampled sequence."""
    model = models(kind, torch.float32)
    batch, seeds = batch_and_seeds()
    B = batch["input_ids"].shape[0]
    ref = generate(model, batch, params(), seeds=seeds, device=CUDA)
    assert ref.stats["graph_replays"] > 0
    for rows, slots in (([0], 0), ([B - 1, 2, 5], 2), (list(range(B))[::-1], 3)):
        got = generate(model, select_rows(batch, rows), params(batch_size=slots), seeds=seeds[rows], device=CUDA)
        for i, r in enumerate(rows):
            n = int(ref.completion_mask[r].sum())
            assert int(got.completion_mask[i].sum()) == n, (rows, slots, r)
            assert torch.equal(got.completion_ids[i, :n], ref.completion_ids[r, :n]), (rows, slots, r)
            assert torch.equal(got.logprobs[i, :n], ref.logprobs[r, :n]), (rows, slots, r)
    on_device = dataclasses.replace(ref, **{f: getattr(ref, f).to(CUDA) for f in (
        "prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "position_ids")})
    full = full_forward_logprobs(model, on_device, {k: (v.to(CUDA) if isinstance(v, torch.Tensor) else v)
                                                    for k, v in batch.items()})
    m = on_device.completion_mask.bool()
    torch.testing.assert_close(on_device.logprobs[m], full[m], atol=1e-4, rtol=0)


def test_a_batch_already_on_the_gpu_gives_the_host_batchs_completions(models):
    """A processor's output moved with ``.to("cuda")`` (as for transformers' generate()): taken
    as it is, the same completions as the host batch."""
    model = models("qwen2_5_vl", torch.bfloat16)
    batch, seeds = batch_and_seeds(group=2)
    host = generate(model, batch, params(), seeds=seeds, device=CUDA, dtype=torch.bfloat16)
    on_gpu = {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    got = generate(model, on_gpu, params(), seeds=seeds.to(CUDA), device=CUDA, dtype=torch.bfloat16)
    assert torch.equal(got.completion_ids, host.completion_ids)
    assert torch.equal(got.logprobs, host.logprobs)
