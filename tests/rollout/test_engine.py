"""The paged rollout engine against the plain decode loop and a full forward, on tiny random
Qwen2-VL / Qwen2.5-VL / Qwen3-VL models (built from configs): the same completions and
log-probs for the same seeds, whatever the slot count, row order, block size or cache budget;
each distinct prompt prefilled once; decode steps spent on live rows only; every block back in
the pool at the end; a cache too small for one row is an error naming the numbers."""
import dataclasses

import pytest
import torch

from staged.rollout import SamplingParams, generate, row_seed
from staged.rollout.cache import KVCacheTooSmall

IMG, VS, VE, EOS, PAD = 90, 92, 93, 2, 0
PATCH_DIM = 3 * 2 * 2 * 2
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters=MROPE, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
            tie_word_embeddings=False)
IDS = dict(image_token_id=IMG, video_token_id=91, vision_start_token_id=VS, vision_end_token_id=VE)
KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def build(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(text_config=TEXT, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1], out_hidden_size=64), **IDS)
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
    elif kind == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(text_config=TEXT, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2), **IDS)
        model = tf.Qwen2VLForConditionalGeneration(cfg)
    else:
        text = dict(TEXT, head_dim=16, rope_parameters=dict(MROPE, mrope_interleaved=True))
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, out_hidden_size=64,
            num_position_embeddings=16, deepstack_visual_indexes=[0, 1]), **IDS)  # deepstack into 2 layers
        model = tf.Qwen3VLForConditionalGeneration(cfg)
    model.config.get_text_config()._attn_implementation_internal = "sdpa"
    return model.eval()


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = build(kind)
        return cache[kind]

    return get


def make_batch(prompts, group: int, gen: torch.Generator) -> dict:
    """prompts: list of (text tokens, image grids [(t, h, w)]); each repeated ``group`` times,
    left-padded; images as random patches."""
    rows, pix, grids, per_row = [], [], [], []
    for text, imgs in prompts:
        ids, p, g = [], [], []
        for (t, h, w) in imgs:
            ids += [VS] + [IMG] * (t * h * w // 4) + [VE]
            p.append(torch.randn(t * h * w, PATCH_DIM, generator=gen))
            g.append([t, h, w])
        ids += text
        for _ in range(group):
            rows.append(ids)
            pix += p
            grids += g
            per_row.append(len(imgs))
    T = max(len(r) for r in rows)
    batch = {"input_ids": torch.tensor([[PAD] * (T - len(r)) + r for r in rows]),
             "attention_mask": torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]),
             "images_per_row": per_row}
    if pix:
        batch["pixel_values"] = torch.cat(pix)
        batch["image_grid_thw"] = torch.tensor(grids)
    return batch


def prompts_for(gen):
    def text(n):
        return torch.randint(3, 89, (n,), generator=gen).tolist()

    return [(text(5), [(1, 4, 4)]), (text(11), []), (text(3), [(1, 4, 8), (1, 4, 4)]), (text(19), [])]


# Several end tokens (~6% of the tiny vocabulary): rows end at varied lengths, some past a block.
ENDS = (EOS, 11, 23, 37, 51, 64)


def params(**kw):
    return SamplingParams(**dict(dict(max_new_tokens=14, eos_token_ids=ENDS, pad_token_id=PAD, block_size=4,
                                      suppress_token_ids=(IMG, 91, VS, VE)), **kw))


def seeds_for(n, step=0):
    return torch.tensor([row_seed(7, step, i) for i in range(n)])


def full_forward_logprobs(model, ro, batch):
    """Log-probs of the sampled tokens from one forward over prompt + completion (fp32), over
    the tokens the sampler may draw (the vision placeholders are suppressed)."""
    seq = {"input_ids": torch.cat([ro.prompt_ids, ro.completion_ids], 1),
           "attention_mask": torch.cat([ro.prompt_mask, ro.completion_mask], 1),
           "position_ids": ro.position_ids}
    if "pixel_values" in batch:
        seq.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    with torch.no_grad():
        logits = model(**seq).logits.float()
    logits[..., [IMG, 91, VS, VE]] = float("-inf")
    Tp = ro.prompt_ids.shape[1]
    lp = torch.log_softmax(logits[:, Tp - 1:-1], -1)
    return lp.gather(-1, ro.completion_ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_paged_equals_simple_and_a_full_forward(models, kind):
    model = models(kind)
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(prompts_for(gen), 3, gen)
    B = batch["input_ids"].shape[0]
    simple = generate(model, batch, params(engine="simple"), seeds=seeds_for(B))
    paged = generate(model, batch, params(), seeds=seeds_for(B))
    lengths = paged.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1, "rows should end at different lengths"
    assert (lengths > 4).any(), "some rows should be longer than a cache block"
    assert torch.equal(paged.completion_ids, simple.completion_ids)
    assert torch.equal(paged.completion_mask, simple.completion_mask)
    m = paged.completion_mask.bool()
    torch.testing.assert_close(paged.logprobs[m], simple.logprobs[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(paged.logprobs[m], full_forward_logprobs(model, paged, batch)[m], atol=1e-5, rtol=0)
    # the prefill ran the tower once per distinct prompt and kept the features for training
    # (Qwen3-VL: merged + 2 deepstack sets, [Nv, 3H]); the same rollout without reuse is identical
    width = 64 * (3 if kind == "qwen3_vl" else 1)
    assert paged.vision_features is not None and len(paged.vision_features) == B // 3
    assert all(f is None or f.shape[-1] == width for f in paged.vision_features)
    assert any(f is not None for f in paged.vision_features)
    plain = generate(model, batch, params(reuse_vision_features=False), seeds=seeds_for(B))
    assert plain.vision_features is None and torch.equal(plain.completion_ids, paged.completion_ids)
    torch.testing.assert_close(plain.logprobs, paged.logprobs, atol=1e-6, rtol=0)
    # each distinct prompt went through the model once; decode ran on live rows only
    st = paged.stats
    assert st["prefill_tokens"] == sum(len(r) for r in [batch["attention_mask"][i].nonzero() for i in range(0, B, 3)])
    assert st["decode_row_steps"] == int((lengths - 1).sum())
    assert st["free_blocks_end"] == st["cache_blocks"]


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_completions_do_not_depend_on_slots_order_block_size_or_budget(models, kind):
    """On a CPU the same bits: tokens and log-probs (prompts prefilled packed, whichever prompts
    share the forward; linears through reordered weights, attention per row length:
    staged.rollout.prefill, .cpu_linear, .paged_attention)."""
    model = models(kind)
    gen = torch.Generator().manual_seed(2)
    batch = make_batch(prompts_for(gen), 4, gen)
    B = batch["input_ids"].shape[0]
    seeds = seeds_for(B, 3)
    ref = generate(model, batch, params(), seeds=seeds)
    longest = int(batch["attention_mask"].sum(-1).max())
    one_row_tokens = (-(-longest // 4) + -(-(longest % 4 + 14) // 4)) * 4
    variants = [dict(batch_size=1), dict(batch_size=3), dict(batch_size=5, block_size=16),
                dict(kv_cache_tokens=one_row_tokens), dict(batch_size=2, block_size=1, check_every=3),
                dict(prefill_tokens=1), dict(prefill_tokens=2 * longest)]  # 1, 2 prompts per prefill forward
    for kw in variants:
        ro = generate(model, batch, params(**kw), seeds=seeds)
        assert torch.equal(ro.completion_ids, ref.completion_ids), kw
        assert torch.equal(ro.logprobs, ref.logprobs), kw
        assert ro.stats["free_blocks_end"] == ro.stats["cache_blocks"]
        if "kv_cache_tokens" in kw:
            assert ro.stats["peak_blocks"] <= ro.stats["cache_blocks"] == one_row_tokens // 4
    # rows in another order (each with its own seed), and a sub-batch: the same completions per row
    perm = torch.randperm(B, generator=gen).tolist()
    from staged.rollout import select_rows

    shuffled = generate(model, select_rows(batch, perm), params(batch_size=4), seeds=seeds[perm])
    for i, r in enumerate(perm):
        n = int(ref.completion_mask[r].sum())
        assert int(shuffled.completion_mask[i].sum()) == n
        assert torch.equal(shuffled.completion_ids[i, :n], ref.completion_ids[r, :n])
        assert torch.equal(shuffled.logprobs[i, :n], ref.logprobs[r, :n])
    sub = perm[:5]  # fewer rows, other prompts beside them
    few = generate(model, select_rows(batch, sub), params(batch_size=2), seeds=seeds[sub])
    for i, r in enumerate(sub):
        n = int(ref.completion_mask[r].sum())
        assert torch.equal(few.completion_ids[i, :n], ref.completion_ids[r, :n])
        assert torch.equal(few.logprobs[i, :n], ref.logprobs[r, :n])
    assert ref.stats["prefill_forwards"] == 1  # the 4 prompts packed into one forward
    # prompt_index given by the caller == rows compared by content
    given = dict(batch, prompt_index=[r // 4 for r in range(B)])
    ro = generate(model, given, params(), seeds=seeds)
    assert torch.equal(ro.completion_ids, ref.completion_ids)
    assert ro.stats["prefill_tokens"] == ref.stats["prefill_tokens"]


def test_cache_too_small_for_one_row_is_an_error(models):
    model = models("qwen2_5_vl")
    gen = torch.Generator().manual_seed(3)
    batch = make_batch(prompts_for(gen), 2, gen)
    with pytest.raises(KVCacheTooSmall, match=r"too small for one row: a prompt of \d+ tokens \+ max_new_tokens 14 "
                                              r"needs \d+ blocks of 4 tokens .* the cache has 3 blocks \(12 tokens\)") as e:
        generate(model, batch, params(kv_cache_tokens=12), seeds=seeds_for(batch["input_ids"].shape[0]))
    assert isinstance(e.value, ValueError) and e.value.one_message  # the trainer's CLI: one line, no traceback


def test_eos_on_the_first_token_and_max_new_tokens_one(models):
    model = models("qwen2_vl")
    gen = torch.Generator().manual_seed(4)
    batch = make_batch(prompts_for(gen), 2, gen)
    B = batch["input_ids"].shape[0]
    ro = generate(model, batch, params(max_new_tokens=1), seeds=seeds_for(B))
    assert ro.completion_ids.shape == (B, 1) and ro.completion_mask.all()
    simple = generate(model, batch, params(max_new_tokens=1, engine="simple"), seeds=seeds_for(B))
    assert torch.equal(ro.completion_ids, simple.completion_ids)
    # every token an EOS: each row is its first token
    ro = generate(model, batch, params(eos_token_ids=tuple(range(100))), seeds=seeds_for(B))
    assert ro.completion_mask.sum(-1).tolist() == [1] * B


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_static_shape_decode_equals_dynamic(models, kind):
    """The CUDA-graph path's decode steps (rows padded to a bucket, block tables to a width
    bucket, padding rows writing into the scratch block / row / slot), run eagerly: the same
    completions and log-probs as the dynamic steps, for slot counts whose live-row counts fall
    between buckets; and with invariant_rows (every step and first-token draw at exactly that many
    rows, more live rows in several passes, one prompt per prefill -- CUDA's default): the same."""
    model = models(kind)
    gen = torch.Generator().manual_seed(5)
    batch = make_batch(prompts_for(gen), 3, gen)
    B = batch["input_ids"].shape[0]
    seeds = seeds_for(B, 9)
    ref = generate(model, batch, params(), seeds=seeds)
    m = ref.completion_mask.bool()
    fixed = [dict(invariant_rows=5), dict(batch_size=7, invariant_rows=2), dict(invariant_rows=16)]
    for kw in [dict(invariant_rows=0), dict(batch_size=5, invariant_rows=0),
               dict(batch_size=3, block_size=2, invariant_rows=0)] + (fixed if kind == "qwen2_5_vl" else []):
        ro = generate(model, batch, params(static_shapes=True, **kw), seeds=seeds)
        assert torch.equal(ro.completion_ids, ref.completion_ids), kw
        assert torch.equal(ro.completion_mask, ref.completion_mask), kw
        torch.testing.assert_close(ro.logprobs[m], ref.logprobs[m], atol=1e-5, rtol=0)
        st = ro.stats
        assert st["free_blocks_end"] == st["cache_blocks"]
        assert st["decode_row_steps"] == ref.stats["decode_row_steps"]
        assert st["graph_captures"] == 0 and st["cuda_graphs"] is False  # nothing captured on a CPU


def test_static_step_shapes_and_padding():
    from staged.rollout.graphs import DecodeGraphs, buckets

    assert buckets(1) == [1] and buckets(5) == [1, 2, 4, 5] and buckets(8) == [1, 2, 4, 8]
    g = DecodeGraphs(lambda *a: None, slots=5, max_blocks=6, pad_row=[70, 1, 0, 9, 0, 5], scratch_block=7,
                     device=torch.device("cpu"), capture=True, fixed_width=False)
    assert not g.capture  # never on a CPU
    assert g.shape(3, 3) == (4, 4) and g.shape(5, 6) == (5, 6) and g.shape(1, 1) == (1, 1)
    with pytest.raises(ValueError, match="exceeds 5 slots x 6 blocks"):
        g.shape(6, 1)
    host = g.pack([[1, 2], [3, 4], [5, 6], [7, 8], [0, 1], [2, 3]], [[0, 1], [2]], (4, 2))
    cols, table = host[:24].view(6, 4), host[24:].view(4, 2)
    assert cols.tolist() == [[1, 2, 70, 70], [3, 4, 1, 1], [5, 6, 0, 0], [7, 8, 9, 9], [0, 1, 0, 0], [2, 3, 5, 5]]
    assert table.tolist() == [[0, 1], [2, 7], [7, 7], [7, 7]]
    fixed = DecodeGraphs(lambda *a: None, slots=5, max_blocks=6, pad_row=[70, 1, 0, 9, 0, 5], scratch_block=7,
                         device=torch.device("cpu"), capture=False, fixed_width=True)
    assert fixed.shape(2, 1) == (2, 6) and fixed.pass_rows == 5
    rows = DecodeGraphs(lambda *a: None, slots=5, max_blocks=6, pad_row=[70, 1, 0, 9, 0, 5], scratch_block=7,
                        device=torch.device("cpu"), capture=False, fixed_width=True, rows=4)
    assert rows.pass_rows == 4 and rows.shape(1, 1) == rows.shape(4, 5) == (4, 6)


def test_a_processor_batch_as_it_is_right_padded_without_images_per_row(models):
    """What a transformers processor returns (right padding, no images_per_row) samples the same
    completions as the left-padded batch with images_per_row given."""
    model = models("qwen2_5_vl")
    gen = torch.Generator().manual_seed(6)
    batch = make_batch(prompts_for(gen), 2, gen)
    B = batch["input_ids"].shape[0]
    ref = generate(model, batch, params(), seeds=seeds_for(B))
    attn = batch["attention_mask"]
    shift = attn.shape[1] - attn.sum(-1)
    src = (torch.arange(attn.shape[1])[None] + shift[:, None]) % attn.shape[1]
    raw = {"input_ids": batch["input_ids"].gather(-1, src), "attention_mask": attn.gather(-1, src),
           "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    assert (raw["attention_mask"][:, 0] == 1).all() and (raw["attention_mask"][:, -1] == 0).any()
    ro = generate(model, raw, params(), seeds=seeds_for(B))
    assert torch.equal(ro.completion_ids, ref.completion_ids)
    assert torch.equal(ro.prompt_ids, batch["input_ids"])  # the rollout's prompts are the left-padded rows
    bad = dict(raw, image_grid_thw=raw["image_grid_thw"][:-1], pixel_values=raw["pixel_values"][:-16])
    with pytest.raises(ValueError, match="pass images_per_row"):
        generate(model, bad, params(), seeds=seeds_for(B))
    holes = dict(raw, attention_mask=raw["attention_mask"].clone())
    holes["attention_mask"][0, 1] = 0
    with pytest.raises(ValueError, match="one contiguous run"):
        generate(model, holes, params(), seeds=seeds_for(B))


def test_end_tokens_default_to_the_models_generation_config(models):
    model = models("qwen2_vl")
    gen = torch.Generator().manual_seed(7)
    batch = make_batch(prompts_for(gen), 2, gen)
    B = batch["input_ids"].shape[0]
    model.generation_config.eos_token_id = list(ENDS)
    try:
        ro = generate(model, batch, params(eos_token_ids=()), seeds=seeds_for(B))
        assert torch.equal(ro.completion_ids, generate(model, batch, params(), seeds=seeds_for(B)).completion_ids)
        model.generation_config.eos_token_id = None
        with pytest.raises(ValueError, match="never stop early"):
            generate(model, batch, params(eos_token_ids=()), seeds=seeds_for(B))
    finally:
        model.generation_config.eos_token_id = EOS


@pytest.mark.parametrize("V,hidden", [(151_936, 64), (32_768, 1152)])
def test_a_rows_completion_ignores_its_neighbours_at_the_real_vocabulary(V, hidden):
    """At 151,936 tokens a random model's distribution is nearly flat: an inverse-CDF draw moves to
    another token for a logit wobble of ~1e-6 at a few percent of the steps, so any dependence of a
    row's numbers on the rows beside it shows up as other tokens here (it did before the decode
    step became batch invariant on a CPU). Hidden 1,152: oneDNN runs a lone row of a fan-in over
    1,024 through another kernel (the last live row of a rollout, a single-row sub-batch)."""
    import transformers as tf

    torch.manual_seed(0)
    text = dict(TEXT, vocab_size=V, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=hidden // 16)  # head_dim 16: the mrope sections' size
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
        temporal_patch_size=2, window_size=8, fullatt_block_indexes=[0], out_hidden_size=hidden), **IDS)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.config.get_text_config()._attn_implementation_internal = "sdpa"
    gen = torch.Generator().manual_seed(11)
    batch = make_batch(prompts_for(gen), 3, gen)
    B = batch["input_ids"].shape[0]
    seeds = seeds_for(B, 1)
    p = params(max_new_tokens=12, eos_token_ids=(EOS,))
    ref = generate(model, batch, p, seeds=seeds)
    from staged.rollout import select_rows

    for rows, slots in ((list(range(B)), 5), ([7, 2, 10], 2), ([4], 1)):
        ro = generate(model, select_rows(batch, rows), dataclasses.replace(p, batch_size=slots), seeds=seeds[rows])
        assert torch.equal(ro.completion_ids, ref.completion_ids[rows]), (rows, slots)
        assert torch.equal(ro.logprobs, ref.logprobs[rows]), (rows, slots)


def test_image_tokens_that_do_not_match_the_images_are_an_error_naming_the_row(models):
    model = models("qwen2_5_vl")
    gen = torch.Generator().manual_seed(4)
    batch = make_batch(prompts_for(gen), 2, gen)
    col = int((batch["input_ids"][0] == IMG).nonzero()[0])
    batch["input_ids"][0, col] = 5  # one of row 0's 4 image tokens turned into text
    with pytest.raises(ValueError, match=r"row 0: 3 image tokens in its input_ids but its 1 image\(s\) give 4 features"):
        generate(model, batch, params(), seeds=seeds_for(batch["input_ids"].shape[0]))


def test_an_empty_prompt_is_an_error_naming_the_row(models):
    model = models("qwen2_5_vl")
    gen = torch.Generator().manual_seed(5)
    batch = make_batch([(p[0], []) for p in prompts_for(gen)], 2, gen)
    batch["attention_mask"][3] = 0
    with pytest.raises(ValueError, match=r"row 3: an empty prompt"):
        generate(model, batch, params(), seeds=seeds_for(batch["input_ids"].shape[0]))


def test_a_sliding_window_text_model_runs_the_simple_engine():
    """The paged decode attention has no sliding window: such a model (not a shipped Qwen-VL
    config) is decoded by the simple engine, with a warning, and its log-probs are a full forward's
    (the paged engine's were up to 0.24 off past the window)."""
    import transformers as tf

    from staged.rollout.prefill import supports_packed_prefill

    torch.manual_seed(0)
    cfg = tf.Qwen2_5_VLConfig(text_config=dict(TEXT, use_sliding_window=True, sliding_window=6, max_window_layers=0),
                              vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                                 patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                                                 window_size=8, fullatt_block_indexes=[0], out_hidden_size=64), **IDS)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.config.get_text_config()._attn_implementation_internal = "sdpa"
    assert not supports_packed_prefill(model)
    gen = torch.Generator().manual_seed(6)
    batch = make_batch(prompts_for(gen), 2, gen)
    with pytest.warns(RuntimeWarning, match="sliding-window"):
        ro = generate(model, batch, params(), seeds=seeds_for(batch["input_ids"].shape[0]))
    assert ro.stats is None  # the simple engine's
    m = ro.completion_mask.bool()
    assert (ro.completion_mask.sum(-1) > 6).any(), "some rows should decode past the window"
    torch.testing.assert_close(ro.logprobs[m], full_forward_logprobs(model, ro, batch)[m], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2_5_vl"])  # the kernel's own tests cover other head layouts
def test_triton_attention_matches_a_full_forward_and_ignores_the_neighbours(models, kind):
    """attention="triton" (staged.kernels.paged_decode, interpreted on a CPU): the log-probs are a
    full forward's, and a row's completion is the same bits in the whole batch, at the CUDA-graph
    path's static shapes (padding rows, padded tables), among a few rows with two slots, and
    alone (the kernel walks each row's own blocks, whatever the table width)."""
    from staged.rollout import select_rows

    model = models(kind)
    gen = torch.Generator().manual_seed(3)
    batch = make_batch(prompts_for(gen), 3, gen)
    B = batch["input_ids"].shape[0]
    p = params(attention="triton")
    ref = generate(model, batch, p, seeds=seeds_for(B))
    assert ref.stats["attention"] == "triton"
    assert (ref.completion_mask.sum(-1) > 4).any(), "some rows should be longer than a cache block"
    m = ref.completion_mask.bool()
    torch.testing.assert_close(ref.logprobs[m], full_forward_logprobs(model, ref, batch)[m], atol=1e-5, rtol=0)
    # the CUDA-graph path's static shapes, run eagerly: padding rows, tables padded to the widest
    static = generate(model, batch, dataclasses.replace(p, static_shapes=True, batch_size=4, invariant_rows=3),
                      seeds=seeds_for(B))
    assert torch.equal(static.completion_ids, ref.completion_ids) and torch.equal(static.logprobs, ref.logprobs)
    for rows, slots in (([9, 1, 5], 2), ([10], 1)):
        ro = generate(model, select_rows(batch, rows), dataclasses.replace(p, batch_size=slots),
                      seeds=seeds_for(B)[rows])
        T = ro.completion_ids.shape[1]  # completions are cut to the longest row of the call
        assert not ref.completion_mask[rows][:, T:].any()
        assert torch.equal(ro.completion_ids, ref.completion_ids[rows][:, :T]), (rows, slots)
        assert torch.equal(ro.logprobs, ref.logprobs[rows][:, :T]), (rows, slots)


def test_an_attention_backend_that_cannot_run_here_is_an_error():
    from staged.rollout.paged_attention import choose_backend

    with pytest.raises(ValueError, match="flash-attn"):
        choose_backend(torch.device("cpu"), torch.float32, 16, "flash")
    with pytest.raises(ValueError, match="expected one of"):
        choose_backend(torch.device("cpu"), torch.float32, 16, "xformers")
    assert choose_backend(torch.device("cpu"), torch.float32, 16) == "torch"


def test_the_triton_attention_check_passes_and_catches_a_wrong_kernel(monkeypatch):
    """Before its first use on a device the engine checks the kernel against the torch path (the
    check runs on CUDA; here it runs interpreted): a kernel that disagrees is refused, with a warning."""
    import staged.kernels.paged_decode as kernel
    from staged.rollout.paged_attention import triton_decode_agrees

    check = triton_decode_agrees.__wrapped__  # uncached
    assert check(torch.device("cpu"), torch.float32, 7, 1, 64, 16)
    assert check(torch.device("cpu"), torch.bfloat16, 4, 2, 32, 4)
    real = kernel.paged_decode_attention
    assert check(torch.device("cpu"), torch.float32, 4, 2, 16, 1)  # one-token blocks: no empty row
    for wrong in (lambda q, *a: real(q, *a) * 1.01, lambda q, *a: real(q, *a) * float("nan")):
        monkeypatch.setattr(kernel, "paged_decode_attention", wrong)
        with pytest.warns(RuntimeWarning, match="Triton decode attention is unusable"):
            assert not check(torch.device("cpu"), torch.float32, 4, 2, 64, 16)


def test_the_same_pixels_in_another_grid_are_another_prompt(models):
    """Rows with the same tokens and pixel bytes but grids (1, 4, 8) and (1, 8, 4) are other images
    (other positions, other features): prefilled apart, each row's completion its own alone."""
    from staged.rollout import select_rows
    from staged.rollout.engine import prompt_groups

    model = models("qwen2_5_vl")
    gen = torch.Generator().manual_seed(0)
    ids = [VS] + [IMG] * 8 + [VE] + torch.randint(3, 89, (6,), generator=gen).tolist()
    pix = torch.randn(32, PATCH_DIM, generator=gen)
    both = {"input_ids": torch.tensor([ids, ids]), "attention_mask": torch.ones(2, len(ids), dtype=torch.long),
            "pixel_values": torch.cat([pix, pix]), "image_grid_thw": torch.tensor([[1, 4, 8], [1, 8, 4]]),
            "images_per_row": [1, 1]}
    assert prompt_groups(both) == [0, 1]
    assert prompt_groups(dict(both, image_grid_thw=torch.tensor([[1, 4, 8], [1, 4, 8]]))) == [0, 0]
    assert prompt_groups(dict(both, prompt_index=torch.tensor([3, 3]))) == [0, 0]  # a tensor groups as a list
    p = params(max_new_tokens=8, eos_token_ids=(EOS,))
    ro = generate(model, both, p, seeds=seeds_for(2, 1))
    alone = generate(model, select_rows(both, [1]), p, seeds=seeds_for(2, 1)[[1]])
    assert torch.equal(ro.logprobs[1, :alone.logprobs.shape[1]], alone.logprobs[0])


def test_a_prompts_rows_apart_under_a_tight_budget_do_not_deadlock(models):
    """Rows [A, B, A] with a cache for one row at a time: A's prefix is held until its last row is
    admitted, so B must not wait ahead of it (rows are taken prompt by prompt); the tokens are the
    default budget's."""
    model = models("qwen2_5_vl")
    gen = torch.Generator().manual_seed(0)
    A, Bp = torch.randint(3, 89, (19,), generator=gen).tolist(), torch.randint(3, 89, (17,), generator=gen).tolist()
    rows = [A, Bp, A]
    batch = {"input_ids": torch.tensor([[PAD] * (19 - len(r)) + r for r in rows]),
             "attention_mask": torch.tensor([[0] * (19 - len(r)) + [1] * len(r) for r in rows])}
    one_row = (-(-19 // 4) + -(-(19 % 4 + 14) // 4)) * 4  # the longest row's blocks, block size 4
    ref = generate(model, batch, params(), seeds=seeds_for(3))
    tight = generate(model, batch, params(kv_cache_tokens=one_row), seeds=seeds_for(3))
    assert torch.equal(tight.completion_ids, ref.completion_ids)


@pytest.mark.parametrize("kw,field", [(dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
                                      (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                      (dict(batch_size=-1), "batch_size"), (dict(block_size=-4), "block_size"),
                                      (dict(max_new_tokens=0), "max_new_tokens"), (dict(engine="vllm"), "engine")])
def test_bad_sampling_params_are_one_clear_error(kw, field):
    with pytest.raises(ValueError, match=f"^SamplingParams.{field}:"):
        params(**kw)


def test_bad_batches_are_one_clear_error(models):
    model = models("qwen2_5_vl")
    gen = torch.Generator().manual_seed(2)
    batch = make_batch(prompts_for(gen), 1, gen)
    p, s = params(max_new_tokens=2), seeds_for(4)
    cases = [(dict(input_ids=batch["input_ids"][:0], attention_mask=batch["attention_mask"][:0]), "no rows"),
             (dict(pixel_values=None), "come together"),
             (dict(pixel_values=batch["pixel_values"][:-4]), "patches"),
             (dict(images_per_row=[1, 0, 2]), "images_per_row has 3 entries for 4 rows"),
             (dict(images_per_row=[1, 0, 1, 0]), "images_per_row counts 2 images, image_grid_thw has 3"),
             (dict(input_ids=batch["input_ids"][:, :0], attention_mask=batch["attention_mask"][:, :0]),
              r"no prompt tokens \(input_ids \(4, 0\)\)"),
             (dict(input_ids=torch.where(torch.arange(batch["input_ids"].shape[1]) == batch["input_ids"].shape[1] - 1,
                                         100, batch["input_ids"])),
              "row 0: token id 100 outside the model's vocabulary of 100"),
             (dict(pixel_values_videos=torch.zeros(4, PATCH_DIM)), "video inputs are not supported")]
    for change, msg in cases:
        bad = dict(batch, **change)
        with pytest.raises(ValueError, match=msg):
            generate(model, bad, p, seeds=s[:bad["input_ids"].shape[0]])
    # what callers make (int32 ids, a float or bool mask) is taken as it is
    ref = generate(model, batch, p, seeds=s)
    for change in (dict(input_ids=batch["input_ids"].int()), dict(attention_mask=batch["attention_mask"].float()),
                   dict(attention_mask=batch["attention_mask"].bool()),
                   dict(image_grid_thw=batch["image_grid_thw"].tolist())):
        assert torch.equal(generate(model, dict(batch, **change), p, seeds=s).completion_ids, ref.completion_ids)
    # one end token as an int, ids as lists: as transformers' generate() takes them
    one = params(max_new_tokens=2, eos_token_ids=EOS, suppress_token_ids=[IMG, 91, VS, VE])
    assert one.eos_token_ids == (EOS,) and one.suppress_token_ids == (IMG, 91, VS, VE)


def test_a_model_made_in_inference_mode_runs():
    """Weights created under torch.inference_mode() have no version counter (the CPU linears'
    reordered-weight cache keys on it)."""
    with torch.inference_mode():
        model = build("qwen2_5_vl")
    gen = torch.Generator().manual_seed(2)
    batch = make_batch(prompts_for(gen), 2, gen)
    ro = generate(model, batch, params(max_new_tokens=3), seeds=seeds_for(8))
    assert int(ro.completion_mask.sum()) > 0


@pytest.mark.parametrize("static", [False, True])
def test_host_checks_every_few_steps_as_on_cuda(models, monkeypatch, static):
    """CUDA looks at the finished flags every ``check_every`` steps only (a host sync each), so a
    row keeps its slot for a few steps after it ends. A row that has drawn all max_new_tokens must
    not be decoded again: its next token index is past the output buffers (an index out of range:
    a device-side assert on CUDA) and its next write past its reserved blocks. Run here on a CPU
    with CUDA's cadence: the same completions as looking every step."""
    from staged.rollout import plan

    model = models("qwen2_5_vl")
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(prompts_for(gen), 3, gen)
    B = batch["input_ids"].shape[0]
    kw = dict(static_shapes=True, invariant_rows=4) if static else {}
    ref = generate(model, batch, params(**kw), seeds=seeds_for(B))
    assert (ref.completion_mask.sum(-1) == 14).any(), "some rows should reach max_new_tokens"
    # the CPU's kernels (bit-exact), CUDA's cadence (staged.rollout.plan)
    monkeypatch.setitem(plan.PLANS, "cpu", dataclasses.replace(plan.CPU, host_syncs=True))
    for every, slots in ((8, 0), (3, 2), (5, 4)):
        ro = generate(model, batch, params(check_every=every, batch_size=slots, **kw), seeds=seeds_for(B))
        assert torch.equal(ro.completion_ids, ref.completion_ids), (every, slots)
        assert torch.equal(ro.completion_mask, ref.completion_mask), (every, slots)
        assert torch.equal(ro.logprobs, ref.logprobs), (every, slots)
        assert ro.stats["free_blocks_end"] == ro.stats["cache_blocks"]
    # no early end at all (the end token is a suppressed one): every row runs to max_new_tokens
    ro = generate(model, batch, params(eos_token_ids=(VE,), check_every=8, **kw), seeds=seeds_for(B))  # suppressed
    assert ro.completion_mask.sum(-1).tolist() == [14] * B


def test_seeds_of_any_integer_type_draw_as_int64_and_others_are_refused(models):
    """int32 seeds (a caller's ``torch.arange(B, dtype=torch.int32)``) once drew every uniform
    from [0, 0.5): the sampler's arithmetic assumes int64. Integer seeds of any type or a list
    now draw what the same int64 seeds draw; float seeds are an error naming the dtype."""
    model = models("qwen2_5_vl")
    gen = torch.Generator().manual_seed(5)
    batch = make_batch(prompts_for(gen), 2, gen)
    B = batch["input_ids"].shape[0]
    want = generate(model, batch, params(), seeds=torch.arange(B) * 7919)
    for seeds in ((torch.arange(B) * 7919).int(), (torch.arange(B) * 7919).tolist()):
        got = generate(model, batch, params(), seeds=seeds)
        assert torch.equal(got.completion_ids, want.completion_ids)
        assert torch.equal(got.logprobs, want.logprobs)
    with pytest.raises(ValueError, match=r"^seeds: expected integers \(int64\), got torch.float64"):
        generate(model, batch, params(), seeds=torch.arange(B, dtype=torch.float64))


@pytest.mark.parametrize("engine", ["paged", "simple"])
def test_non_finite_logits_are_reported(engine):
    """A diverged policy (NaN in its lm_head): the rollout still returns (the trainer skips the
    step as non-finite), and says so once, naming the rows."""
    model = build("qwen2_5_vl")
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    gen = torch.Generator().manual_seed(3)
    batch = make_batch(prompts_for(gen), 2, gen)
    with pytest.warns(RuntimeWarning, match=r"rollout: 8 of 8 rows drew from non-finite logits"):
        ro = generate(model, batch, params(engine=engine), seeds=seeds_for(8))
    assert not torch.isfinite(ro.logprobs[ro.completion_mask.bool()]).any()


def test_qwen3_vl_deepstack_sets_past_the_decoders_layers_are_ignored_as_its_forward_does():
    """A Qwen3-VL whose tower feeds more deepstack sets than the decoder has layers (a small
    config): the model's own forward adds set i after layer i for the layers it has; the paged
    engine's packed prefill does the same (it once refused such a model)."""
    import transformers as tf

    text = dict(TEXT, head_dim=16, num_hidden_layers=1, rope_parameters=dict(MROPE, mrope_interleaved=True))
    cfg = tf.Qwen3VLConfig(text_config=text, vision_config=dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, out_hidden_size=64,
        num_position_embeddings=16, deepstack_visual_indexes=[0, 1]), **IDS)
    torch.manual_seed(0)
    model = tf.Qwen3VLForConditionalGeneration(cfg).eval()
    model.config.get_text_config()._attn_implementation_internal = "sdpa"
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(prompts_for(gen), 2, gen)
    simple = generate(model, batch, params(engine="simple"), seeds=seeds_for(8))
    paged = generate(model, batch, params(), seeds=seeds_for(8))
    assert torch.equal(paged.completion_ids, simple.completion_ids)
    m = paged.completion_mask.bool()
    torch.testing.assert_close(paged.logprobs[m], full_forward_logprobs(model, paged, batch)[m], atol=1e-5, rtol=0)


def test_end_and_suppressed_ids_in_the_forms_transformers_takes():
    """eos_token_ids=None is transformers' "unset" (the model's own end tokens, as generate()
    reads them when the tuple is empty); one id may be an int of any kind or a tensor."""
    import numpy as np

    for ids, want in ((None, ()), (EOS, (EOS,)), (np.int64(EOS), (EOS,)), (torch.tensor(EOS), (EOS,)),
                      (torch.tensor([EOS, 11]), (EOS, 11)), ([EOS, 11], (EOS, 11))):
        p = params(eos_token_ids=ids, suppress_token_ids=ids)
        assert p.eos_token_ids == want and p.suppress_token_ids == want, (ids, p.eos_token_ids)
        assert all(type(i) is int for i in p.eos_token_ids)
    model = build("qwen2_5_vl")
    model.generation_config.eos_token_id = [EOS, 11]
    gen = torch.Generator().manual_seed(3)
    batch = make_batch(prompts_for(gen), 1, gen)
    s = seeds_for(batch["input_ids"].shape[0])
    unset = generate(model, batch, params(eos_token_ids=None), seeds=s)
    given = generate(model, batch, params(eos_token_ids=(EOS, 11)), seeds=s)
    assert torch.equal(unset.completion_ids, given.completion_ids)
