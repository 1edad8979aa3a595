"""Rollout: per-row seeded sampling independent of the batch, EOS handling, top-p, and the
sampler's log-probs equal to the trainer's recomputation (same positions, same model)."""
import pytest
import torch

from staged.data.prompting import build_generation_batch
from staged.data.synthetic import make_synthetic_dataset
from staged.grpo import VocabMask, group_advantages, token_logprobs
from staged.models.loading import load_model_and_processor
from staged.rollout import (SamplingParams, extend_positions, generate, model_inputs, position_ids, row_seed,
                            sample_tokens, select_rows, uniform_from_seed)


@pytest.fixture(scope="module")
def model_and_processor(embedded_dir):
    torch.manual_seed(0)
    return load_model_and_processor(embedded_dir)


def _batch(processor, samples):
    b = build_generation_batch(processor, samples)
    b["images_per_row"] = [len(s.images) for s in samples]
    return b


def _params(processor, **kw):
    tok = processor.tokenizer
    return SamplingParams(**dict(dict(max_new_tokens=12, eos_token_ids=(tok.eos_token_id,),
                                      pad_token_id=tok.pad_token_id, check_every=4), **kw))


def test_uniforms_are_uniform_and_row_independent():
    seeds = torch.tensor([row_seed(0, 1, i) for i in range(20000)])
    u = uniform_from_seed(seeds, 3)
    assert ((u > 0) & (u < 1)).all()
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / len(u)
    assert (hist - 0.1).abs().max() < 0.01
    assert torch.equal(uniform_from_seed(seeds[5:9], 3), u[5:9])
    assert not torch.equal(uniform_from_seed(seeds, 4), u)


def test_sample_tokens_follows_the_distribution_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 7) * 2
    n = 40000
    seeds = torch.tensor([row_seed(9, i) for i in range(n)])
    tokens, logp = sample_tokens(logits.expand(n, -1), uniform_from_seed(seeds, 0), 1.5, 1.0)
    probs = torch.softmax(logits[0] / 1.5, -1)
    freq = torch.bincount(tokens, minlength=7).float() / n
    assert (freq - probs).abs().max() < 0.01
    assert torch.allclose(logp, probs.log()[tokens], atol=1e-6)
    # top_p below the largest probability keeps only the argmax
    tokens, _ = sample_tokens(logits.expand(100, -1), uniform_from_seed(seeds[:100], 0), 1.0, 1e-3)
    assert (tokens == logits.argmax()).all()
    # suppressed tokens are never drawn
    sup = torch.zeros(7, dtype=torch.bool)
    sup[logits.argmax()] = True
    tokens, _ = sample_tokens(logits.expand(1000, -1), uniform_from_seed(seeds[:1000], 0), 1.0, 1.0, sup)
    assert not (tokens == logits.argmax()).any()


def test_generation_is_independent_of_batch_composition(model_and_processor):
    model, processor = model_and_processor
    samples = make_synthetic_dataset("perception", 3, seed=1) + make_synthetic_dataset("textual", 3, seed=1)
    batch = _batch(processor, samples)
    seeds = torch.tensor([row_seed(0, 5, i) for i in range(6)])
    full = generate(model, batch, _params(processor), seeds=seeds)
    rows = [4, 1]
    part = generate(model, _batch(processor, [samples[r] for r in rows]), _params(processor), seeds=seeds[rows])
    chunked = generate(model, batch, _params(processor, batch_size=4), seeds=seeds)
    for i, r in enumerate(rows):
        n = int(part.completion_mask[i].sum())
        assert torch.equal(part.completion_ids[i, :n], full.completion_ids[r, :n])
        assert int(full.completion_mask[r].sum()) == n
        torch.testing.assert_close(part.logprobs[i, :n], full.logprobs[r, :n], atol=1e-5, rtol=0)
    assert torch.equal(chunked.completion_ids, full.completion_ids)


def test_eos_ends_a_completion(model_and_processor):
    model, processor = model_and_processor
    samples = make_synthetic_dataset("textual", 8, seed=2)
    batch = _batch(processor, samples)
    seeds = torch.tensor([row_seed(1, 0, i) for i in range(8)])
    # Treat a frequent token as EOS so that rows stop at different lengths.
    probe = generate(model, batch, _params(processor), seeds=seeds)
    eos = int(torch.mode(probe.completion_ids[:, 0]).values)
    ro = generate(model, batch, _params(processor, eos_token_ids=(eos,)), seeds=seeds)
    pad = processor.tokenizer.pad_token_id
    for ids, mask in zip(ro.completion_ids, ro.completion_mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()          # one contiguous run from the start
        assert (ids[n:] == pad).all()
        hits = (ids[:n] == eos).nonzero()
        if len(hits):                                          # stops right at the first EOS
            assert int(hits[0]) == n - 1
        else:
            assert n == 12


def test_sampler_logprobs_match_the_trainer(model_and_processor):
    """Positions and inputs of the training forward reproduce the sampler's log-probs, with the
    trainer's suppressed tokens (a sampled image placeholder would not even fit the training
    forward: its features would not match its tokens) and its log-probs over the rest."""
    from staged.config import load_config
    from staged.train import sampling_params

    model, processor = model_and_processor
    samples = make_synthetic_dataset("perception", 3, seed=4) + make_synthetic_dataset("textual", 2, seed=4)
    batch = _batch(processor, samples)
    seeds = torch.tensor([row_seed(2, 0, i) for i in range(5)])
    cfg = load_config(None, [])
    suppress = sampling_params(cfg.stages[0], cfg, model, processor.tokenizer).suppress_token_ids
    assert suppress  # the vision placeholders at least
    ro = generate(model, batch, _params(processor, suppress_token_ids=suppress), seeds=seeds)
    Tp = ro.prompt_ids.shape[1]
    seq = select_rows(batch, list(range(5)))
    seq.update(input_ids=torch.cat([ro.prompt_ids, ro.completion_ids], 1),
               attention_mask=torch.cat([ro.prompt_mask, ro.completion_mask], 1),
               position_ids=ro.position_ids)
    inputs = model_inputs(seq, torch.device("cpu"), torch.float32)
    vocab = VocabMask.build(suppress, model.config.get_text_config().vocab_size, torch.device("cpu"))
    with torch.no_grad():
        logp = token_logprobs(model, inputs, inputs["input_ids"][:, Tp:], Tp, vocab=vocab)
    m = ro.completion_mask.bool()
    torch.testing.assert_close(logp[m], ro.logprobs[m], atol=2e-5, rtol=0)
    # the positions are those the model itself computes for the prompt, then one per token
    pos = position_ids(model, batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"))
    assert torch.equal(ro.position_ids, extend_positions(pos, ro.completion_ids.shape[1]))


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4, std_normalize=False)
    torch.testing.assert_close(a, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    a = group_advantages(r, 4)
    torch.testing.assert_close(a[:4], (r[:4] - 0.25) / (r[:4].std() + 1e-4))
    assert (a[4:] == 0).all()
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)
