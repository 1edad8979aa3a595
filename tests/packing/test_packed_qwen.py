"""Packed micro-batches against transformers' own Qwen2-VL / Qwen2.5-VL / Qwen3-VL code, on tiny
random models built from configs (hidden 64, 2 layers):

- position ids == ``get_rope_index`` run per sample (text-only, image first, several images,
  video with a time scale, image + video, Qwen3-VL per-frame videos), and the mrope deltas;
- packed embeddings == ``embedding(ids).masked_scatter(mask, features)`` bit for bit;
- the packed forward's logits == per-sample forwards within 1e-5 (fp32, CPU), gradients too,
  with text-only, image and video samples mixed in one micro-batch; for Qwen3-VL with its
  deepstack features (two tower blocks feeding two decoder layers);
- the hook leaves unpacked (padded) forwards on sdpa; the attention backends never read
  cu_seqlens back; ``varlen_attention``'s sdpa loop == dense masked attention.
"""
import inspect

import pytest
import torch

import staged.attention as attention
from staged.attention import (packed_forward, register_seqlens, use_packed_attention,
                              varlen_attention)
from staged.packing.collate import PackingConfig, PackSample, collate_packed

transformers = pytest.importorskip("transformers")

IMG, VID, VS, VE = 90, 91, 92, 93
PATCH_DIM = 3 * 2 * 2 * 2  # channels * temporal_patch * patch * patch
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_parameters=MROPE,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
           vision_end_token_id=VE)


def build(kind: str):
    torch.manual_seed(0)
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        cfg = Qwen2_5_VLConfig(text_config=TEXT, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1],
            out_hidden_size=64, tokens_per_second=2), tie_word_embeddings=False, **IDS)
        return Qwen2_5_VLForConditionalGeneration(cfg).eval()
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        cfg = Qwen2VLConfig(text_config=TEXT, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2), tie_word_embeddings=False, **IDS)
        return Qwen2VLForConditionalGeneration(cfg).eval()
    import transformers as tf

    # deepstack: tower blocks 0 and 1 feed decoder layers 0 and 1 (Qwen3-VL-8B: 3 of 36)
    text = dict(TEXT, head_dim=16, rope_parameters=dict(MROPE, mrope_interleaved=True))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                  out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    if kind == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        cfg = tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **IDS)
        return tf.Qwen3VLMoeForConditionalGeneration(cfg).eval()
    cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **IDS)
    return tf.Qwen3VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = build(kind)
        return cache[kind]

    return get


# ---------------------------------------------------------------------------------------------
# Samples: lists of parts -- an int n (n random text tokens), ("image", t, h, w),
# ("video", t, h, w, seconds) -- then a completion of random text tokens.


def make_sample(parts, completion, gen, qwen3=False):
    ids, img, vid, secs, pix, pixv = [], [], [], [], [], []
    for p in parts:
        if isinstance(p, int):
            ids += torch.randint(3, 80, (p,), generator=gen).tolist()
        elif p[0] == "image":
            _, t, h, w = p
            ids += [IMG] * (t * h * w // 4)
            img.append([t, h, w])
            pix.append(torch.randn(t * h * w, PATCH_DIM, generator=gen))
        else:
            _, t, h, w, s = p
            if qwen3:  # <timestamp> <vision_start> frame <vision_end>, per frame
                for _ in range(t):
                    ids += [50, 51, VS] + [VID] * (h * w // 4) + [VE]
            else:
                ids += [VID] * (t * h * w // 4)
            vid.append([t, h, w])
            secs.append(s)
            pixv.append(torch.randn(t * h * w, PATCH_DIM, generator=gen))
    prompt = len(ids)
    ids += torch.randint(3, 80, (completion,), generator=gen).tolist()
    return PackSample(
        input_ids=ids, prompt_len=prompt, image_grid_thw=img or None,
        pixel_values=torch.cat(pix) if pix else None, video_grid_thw=vid or None,
        pixel_values_videos=torch.cat(pixv) if pixv else None,
        second_per_grid_ts=torch.tensor(secs, dtype=torch.float32) if secs else None)


def samples_for(kind, gen, fractional_seconds=False):
    s = 0.5 if fractional_seconds else 2.0
    specs = [
        ([7], 5),                                                      # text only
        ([("image", 1, 4, 4), 3], 4),                                  # image first, at offset 0
        ([2, ("image", 1, 4, 6), 3, ("image", 1, 2, 4), 1], 6),       # several images
        ([1, ("video", 3, 2, 4, s), 2], 3),                            # video, time-scaled
        ([2, ("image", 1, 2, 2), 1, ("video", 2, 4, 4, 1.0), 1], 2),   # image + video
    ]
    out = []
    for parts, completion in specs:
        out.append(make_sample(parts, completion, gen, qwen3=kind.startswith("qwen3")))
    return out


def hf_inputs(sample, kind):
    ids = torch.tensor(sample.input_ids)[None]
    kw = dict(input_ids=ids, mm_token_type_ids=((ids == IMG).int() + 2 * (ids == VID).int()))
    if sample.image_grid_thw is not None:
        kw.update(pixel_values=sample.pixel_values,
                  image_grid_thw=torch.tensor(sample.image_grid_thw))
    if sample.video_grid_thw is not None:
        kw.update(pixel_values_videos=sample.pixel_values_videos,
                  video_grid_thw=torch.tensor(sample.video_grid_thw))
        if kind == "qwen2_5_vl":
            kw["second_per_grid_ts"] = sample.second_per_grid_ts
    return kw


def rope_index(model, sample, kind):
    inner = getattr(model, "model", model)
    kw = hf_inputs(sample, kind)
    accepted = inspect.signature(inner.get_rope_index).parameters
    args = {k: v for k, v in kw.items() if k in accepted}
    return inner.get_rope_index(**args)


def truncates_seconds() -> bool:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    return "int(next(second_per_grid_ts))" in inspect.getsource(m.Qwen2_5_VLModel.get_rope_index)


# ---------------------------------------------------------------------------------------------
# Positions


@pytest.mark.parametrize("kind,fractional", [("qwen2_5_vl", False), ("qwen2_5_vl", True),
                                             ("qwen2_vl", False), ("qwen3_vl", False)])
def test_positions_match_get_rope_index(models, kind, fractional):
    if fractional and truncates_seconds():
        pytest.skip("this transformers truncates second_per_grid_ts to int (5.17); staged pins "
                    "the float32 rule of later versions (tested in test_spans.py)")
    model = models(kind)
    samples = samples_for(kind, torch.Generator().manual_seed(1), fractional)
    cfg = PackingConfig.from_model(model)
    assert cfg.rope == kind
    [mb] = collate_packed(samples, [[4, 0, 3, 1, 2]], cfg)
    pos = mb.position_ids()
    cu = mb.cu_seqlens.tolist()
    for slot, i in enumerate(mb.table.sample_index.tolist()):
        want, delta = rope_index(model, samples[i], kind)
        a, b = cu[slot], cu[slot + 1]
        assert torch.equal(pos[1:, a:b], want[:, 0]), f"sample {i}"
        assert pos[0, a:b].tolist() == list(range(b - a))
        assert int(mb.table.rope_deltas[slot]) == int(delta.reshape(-1)[0])


# ---------------------------------------------------------------------------------------------
# Embeddings, logits, gradients


def test_embeddings_bit_exact_vs_masked_scatter(models):
    model = models("qwen2_5_vl")
    samples = samples_for("qwen2_5_vl", torch.Generator().manual_seed(2))
    cfg = PackingConfig.from_model(model)
    [mb] = collate_packed(samples, [[2, 0, 4, 3, 1]], cfg)
    inner = model.model
    emb = inner.get_input_embeddings()
    feats, want = {}, []
    with torch.no_grad():
        for i, s in enumerate(samples):  # transformers' path, per sample
            kw = hf_inputs(s, "qwen2_5_vl")
            x = emb(kw["input_ids"])
            f = []
            if s.image_grid_thw is not None:
                f_img = torch.cat(inner.get_image_features(kw["pixel_values"], kw["image_grid_thw"],
                                                           return_dict=True).pooler_output)
                mask, _ = inner.get_placeholder_mask(kw["input_ids"], x, image_features=f_img)
                x = x.masked_scatter(mask, f_img)
                f.append(("image", f_img))
            if s.video_grid_thw is not None:
                f_vid = torch.cat(inner.get_video_features(kw["pixel_values_videos"],
                                                           kw["video_grid_thw"],
                                                           return_dict=True).pooler_output)
                _, mask = inner.get_placeholder_mask(kw["input_ids"], x, video_features=f_vid)
                x = x.masked_scatter(mask, f_vid)
                f.append(("video", f_vid))
            feats[i] = dict(f)
            want.append(x[0])
        # the same feature rows, in the micro-batch's order: its samples in slot order, each
        # sample's vision rows in token order (per token here: this is the test's oracle)
        order = []
        for i in mb.table.sample_index.tolist():
            taken = {IMG: 0, VID: 0}
            for tok in samples[i].input_ids:
                if tok in taken:
                    order.append(feats[i]["image" if tok == IMG else "video"][taken[tok]])
                    taken[tok] += 1
        vision = torch.stack(order)
        out = mb.embed(emb.weight, vision, padding_idx=emb.padding_idx)
    got = torch.split(out, mb.seqlens)
    for slot, i in enumerate(mb.table.sample_index.tolist()):
        assert torch.equal(got[slot], want[i]), f"sample {i}"


def per_sample_logits(model, samples, kind):
    return [model(**hf_inputs(s, kind)).logits[0] for s in samples]


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_packed_logits_match_per_sample(models, kind):
    model = models(kind)
    samples = samples_for(kind, torch.Generator().manual_seed(3))
    cfg = PackingConfig.from_model(model, pad_multiple=8)
    [mb] = collate_packed(samples, [[3, 0, 1, 4, 2]], cfg)
    misses = attention.registry_misses
    with torch.no_grad():
        want = per_sample_logits(model, samples, kind)
        logits = packed_forward(model, mb, return_logits=True)
    assert attention.registry_misses == misses  # no layer read cu_seqlens back
    assert logits.shape[0] == mb.num_rows and mb.num_rows % 8 == 0
    got = torch.split(logits, mb.seqlens)
    for slot, i in enumerate(mb.table.sample_index.tolist()):
        if i >= 0:
            torch.testing.assert_close(got[slot], want[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_gradients_match_per_sample(models, kind):
    model = models(kind)
    gen = torch.Generator().manual_seed(4)
    samples = samples_for(kind, gen)[:4]  # text-only, image, images, video
    cfg = PackingConfig.from_model(model)
    [mb] = collate_packed(samples, [[1, 3, 0, 2]], cfg)
    weights = [torch.randn(len(s.input_ids), 100, generator=gen) for s in samples]
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    loss = sum((lg * w).sum() for lg, w in zip(per_sample_logits(model, samples, kind), weights))
    loss.backward()
    want = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    model.zero_grad()
    logits = packed_forward(model, mb, return_logits=True)
    got_l = torch.split(logits, mb.seqlens)
    loss_p = sum((got_l[slot] * weights[i]).sum()
                 for slot, i in enumerate(mb.table.sample_index.tolist()))
    loss_p.backward()
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    torch.testing.assert_close(loss_p, loss, atol=1e-4, rtol=1e-5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, g, w in zip(names, got, want):
        scale = w.abs().max().clamp(min=1.0)
        assert (g - w).abs().max() <= 1e-5 * scale, n
    assert any(n.startswith("model.visual") and w.abs().sum() > 0 for n, w in zip(names, want))
    if kind == "qwen3_vl":  # every deepstack merger reaches the loss
        for j in range(2):
            assert any(n.startswith(f"model.visual.deepstack_merger_list.{j}.") and w.abs().sum() > 0
                       for n, w in zip(names, want)), j
    model.zero_grad()


def test_qwen3_deepstack_is_what_makes_packed_match(models):
    """The Qwen3-VL comparison is sensitive to deepstack: packed without it (zero deepstack
    features) is far from transformers' per-sample logits; with it, equal."""
    model = models("qwen3_vl")
    samples = samples_for("qwen3_vl", torch.Generator().manual_seed(8))
    [mb] = collate_packed(samples, [[1, 4, 0, 2, 3]], PackingConfig.from_model(model))
    with torch.no_grad():
        want = torch.cat([want_i for want_i in per_sample_logits(
            model, [samples[i] for i in mb.table.sample_index.tolist()], "qwen3_vl")])
        vision, deep = attention.vision_outputs(model, mb.pixel_values, mb.vision_grid_thw)
        assert len(deep) == 2 and all(d.shape == vision.shape for d in deep)
        with_ds = packed_forward(model, mb, vision=vision, deepstack=deep, return_logits=True)
        without = packed_forward(model, mb, vision=vision, deepstack=[torch.zeros_like(d) for d in deep],
                                 return_logits=True)
        with pytest.raises(ValueError, match="deepstack"):
            packed_forward(model, mb, vision=vision)
    torch.testing.assert_close(with_ds, want, atol=1e-5, rtol=1e-5)
    vis = attention.vision_row_mask(mb)
    assert (without - want)[~vis].abs().max() > 1e-3  # text rows after a vision row see it too
    assert (without - want)[vis].abs().max() > 1e-3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_packed_qwen3_matches_per_sample_on_device(device):
    """Qwen3-VL packed on ``device`` (CUDA: the Triton packing kernels, the GPU attention backend,
    deepstack's boolean row mask on the device) == per-sample forwards there, fp32; and the
    trainer's packed_hidden (plain-torch fallbacks off CUDA) gives the same hidden states."""
    from staged.packed_step import packed_hidden

    model = build("qwen3_vl").to(device)
    samples = samples_for("qwen3_vl", torch.Generator().manual_seed(9))
    [mb] = collate_packed(samples, [[2, 4, 0, 3, 1]], PackingConfig.from_model(model))
    mb = mb.to(device)
    with torch.no_grad():
        want = [model(**{k: v.to(device) for k, v in hf_inputs(s, "qwen3_vl").items()}).logits[0]
                for s in samples]
        logits = packed_forward(model, mb, return_logits=True)
        hidden = packed_hidden(model, mb)
    torch.testing.assert_close(model.lm_head(hidden), logits, atol=1e-5, rtol=1e-5)
    got = torch.split(logits, mb.seqlens)
    for slot, i in enumerate(mb.table.sample_index.tolist()):
        torch.testing.assert_close(got[slot], want[i], atol=2e-5, rtol=1e-5)


def test_unpacked_forward_still_uses_sdpa(models):
    model = models("qwen2_5_vl")
    use_packed_attention(model)
    assert model.config.text_config._attn_implementation == "staged_varlen"
    assert model.config.vision_config._attn_implementation != "staged_varlen"
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 80, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        packed_impl = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation({"text_config": "sdpa"})
        sdpa = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(packed_impl[mask.bool()], sdpa[mask.bool()], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# varlen attention


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_sdpa_matches_dense(causal):
    gen = torch.Generator().manual_seed(6)
    lens = [5, 1, 9, 0, 4]
    T, Hq, Hkv, D = sum(lens), 4, 2, 8
    q = torch.randn(T, Hq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(T, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(T, Hkv, D, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    register_seqlens(cu, lens)
    out = varlen_attention(q, k, v, cu, max(lens), causal=causal, backend="sdpa")
    # dense reference: block-diagonal (causal) mask over all T rows
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    s = torch.einsum("qhd,khd->hqk", q, kr) * D**-0.5
    s = s.masked_fill(~allowed, float("-inf"))
    want = torch.einsum("hqk,khd->qhd", s.softmax(-1), vr)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_empty_micro_batch_runs(models):
    """The planner pads ranks with [] micro-batches: they must still run forward and backward."""
    model = models("qwen2_5_vl")
    [mb] = collate_packed([], [[]], PackingConfig.from_model(model, pad_multiple=4))
    assert mb.num_rows == 4 and mb.table.sample_index.tolist() == [-1]
    hidden = packed_forward(model, mb)
    _, mask = mb.labels()
    (hidden.sum() * 0).backward()
    assert hidden.shape == (4, 64) and not mask.any()
    model.zero_grad()


def _dense(q, k, v, lens, causal, scale=None):
    """Block-diagonal (causal) attention over all T rows, materialised: the oracle."""
    T, Hq, D = q.shape
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    rep = Hq // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, kr) * (D ** -0.5 if scale is None else scale)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vr)


def _qkv(lens, Hq=4, Hkv=2, D=8, dtype=torch.float32, seed=6):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, generator=gen, dtype=dtype) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    register_seqlens(cu, lens)
    return q, k, v, cu


@pytest.mark.parametrize("torch_varlen,flex,dropout,want", [
    (True, True, 0.0, "torch_varlen"), (False, True, 0.0, "flex"), (False, False, 0.0, "sdpa"),
    (True, True, 0.1, "sdpa")])
def test_auto_backend_on_a_gpu_without_flash_attn(monkeypatch, torch_varlen, flex, dropout, want):
    """The lent GPUs (torch 2.11, no flash-attn / xformers): torch's varlen kernel, then
    FlexAttention, and the SDPA loop only when torch has neither (or for dropout)."""
    monkeypatch.setattr(attention, "HAS_FLASH_ATTN", False)
    monkeypatch.setattr(attention, "HAS_XFORMERS", False)
    monkeypatch.setattr(attention, "HAS_TORCH_VARLEN", torch_varlen)
    monkeypatch.setattr(attention, "HAS_FLEX", flex)
    assert attention.attention_backend("cuda", torch.bfloat16, dropout) == want
    assert attention.attention_backend("cpu", torch.bfloat16) == "sdpa"
    if torch_varlen:   # fp32 is not a flash-attention dtype
        assert attention.attention_backend("cuda", torch.float32) == ("flex" if flex else "sdpa")


def test_this_torch_has_the_backends_it_claims():
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert attention.HAS_FLEX == ((major, minor) >= (2, 5))
    assert attention.HAS_TORCH_VARLEN == ((major, minor) >= (2, 10))


@pytest.mark.skipif(not attention.HAS_FLEX, reason="this torch has no FlexAttention")
@pytest.mark.parametrize("causal,Hkv,scale", [(True, 2, None), (False, 4, None), (True, 1, 0.3)])
def test_varlen_flex_matches_dense(causal, Hkv, scale):
    lens = [5, 1, 9, 0, 4, 13]
    q, k, v, cu = _qkv(lens, Hkv=Hkv)
    out = varlen_attention(q, k, v, cu, max(lens), causal=causal, scale=scale, backend="flex")
    want = _dense(q.double(), k.double(), v.double(), lens, causal, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=2e-6)


def _fake_varlen(kind):
    """varlen_attn with the keywords of torch 2.10 / 2.11 / 2.12+, computing dense attention
    (CPU stand-in for the flash kernel): checks the call we build for each signature."""
    def core(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale=None):
        assert cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k
        assert k.shape[1] == q.shape[1] or kind == "2.12", "kv heads expanded without enable_gqa"
        lens = (cu_q[1:] - cu_q[:-1]).tolist()
        return _dense(q, k, v, lens, causal, scale)

    if kind == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                        return_aux=None):
            return core(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal)
    elif kind == "2.11":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                        scale=None, window_size=(-1, -1)):
            return core(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                        tuple(window_size) == (-1, 0), scale)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                        scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                        block_table=None, num_splits=None):
            assert enable_gqa == (key.shape[1] != query.shape[1])
            return core(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                        tuple(window_size) == (-1, 0), scale)
    return varlen_attn


@pytest.mark.parametrize("kind", ["2.10", "2.11", "2.12"])
@pytest.mark.parametrize("causal,scale", [(True, None), (False, 0.3)])
def test_torch_varlen_call_fits_each_torch_signature(monkeypatch, kind, causal, scale):
    fake = _fake_varlen(kind)
    monkeypatch.setattr(attention, "_torch_varlen_fn", lambda: fake)
    monkeypatch.setattr(attention, "HAS_TORCH_VARLEN", True)
    lens = [5, 1, 9, 0, 4]
    q, k, v, cu = _qkv(lens, dtype=torch.float64)
    out = varlen_attention(q, k, v, cu, max(lens), causal=causal, scale=scale,
                           backend="torch_varlen")
    torch.testing.assert_close(out, _dense(q, k, v, lens, causal, scale), atol=1e-12, rtol=1e-12)


def test_the_installed_varlen_attn_signature_is_one_we_handle():
    if not attention.HAS_TORCH_VARLEN:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    params = inspect.signature(attention._torch_varlen_fn()).parameters
    assert "window_size" in params or "is_causal" in params, list(params)


@pytest.mark.skipif(not attention.HAS_FLEX, reason="this torch has no FlexAttention")
def test_packed_logits_match_per_sample_with_flex(models, monkeypatch):
    """The transformers hook on the flex backend == per-sample forwards (what a GPU without
    flash-attn and without torch's varlen kernel would run)."""
    monkeypatch.setattr(attention, "hook_backend", "flex")
    model = models("qwen2_5_vl")
    samples = samples_for("qwen2_5_vl", torch.Generator().manual_seed(3))
    [mb] = collate_packed(samples, [[3, 0, 1, 4, 2]], PackingConfig.from_model(model))
    with torch.no_grad():
        want = per_sample_logits(model, samples, "qwen2_5_vl")
        logits = packed_forward(model, mb, return_logits=True)
    got = torch.split(logits, mb.seqlens)
    for slot, i in enumerate(mb.table.sample_index.tolist()):
        if i >= 0:
            torch.testing.assert_close(got[slot], want[i], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flash_attn", "xformers", "torch_varlen", "flex"])
def test_varlen_gpu_backends_match_sdpa_loop(backend):
    if backend == "flash_attn" and not attention.HAS_FLASH_ATTN:
        pytest.skip("flash-attn is not installed")
    if backend == "xformers" and not attention.HAS_XFORMERS:
        pytest.skip("xformers is not installed")
    if backend == "torch_varlen" and not attention.HAS_TORCH_VARLEN:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    if backend == "flex" and not attention.HAS_FLEX:
        pytest.skip(f"torch {torch.__version__} has no FlexAttention")
    gen = torch.Generator().manual_seed(7)
    lens = [37, 1, 129, 64, 5]
    T, Hq, Hkv, D = sum(lens), 8, 2, 64
    q, k, v = (torch.randn(T, h, D, generator=gen).cuda() for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32).cuda()
    register_seqlens(cu, lens)
    ref = varlen_attention(q.double(), k.double(), v.double(), cu, max(lens), backend="sdpa")
    ref_bf16 = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, max(lens),
                                backend="sdpa")
    out = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, max(lens),
                           backend=backend)
    err = (out.double() - ref).abs().max()
    err_ref = (ref_bf16.double() - ref).abs().max()
    assert err <= 2 * err_ref + 1e-3, (err, err_ref)  # flash-attention's test criterion


@pytest.mark.cuda
def test_packed_step_has_no_host_sync():
    """The packed step's device work -- pack_embed, 4-row position ids, varlen attention through
    the text model, fused lm_head log-probs, the GRPO loss and the whole backward -- runs under
    ``torch.cuda.set_sync_debug_mode("error")``. The vision tower runs first: its host syncs are
    transformers' (grid bookkeeping), and its features are passed in."""
    from staged.attention import vision_features
    from staged.kernels import fused_linear_logprob, grpo_loss

    model = build("qwen2_5_vl").cuda().train()
    gen = torch.Generator().manual_seed(5)
    samples = samples_for("qwen2_5_vl", gen)[:4]  # text-only, image, images, video
    [mb] = collate_packed(samples, [[2, 0, 3, 1]], PackingConfig.from_model(model))
    mb = mb.to("cuda")
    vision = vision_features(model, mb.pixel_values, mb.vision_grid_thw).detach().requires_grad_(True)
    T, B = mb.input_ids.numel(), len(mb.seqlens)
    targets = torch.randint(0, 100, (T,), generator=gen).cuda()
    mask = (torch.rand(T, generator=gen) > 0.3).cuda()
    adv = torch.randn(B, generator=gen).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hidden = packed_forward(model, mb, vision=vision)
        logp = fused_linear_logprob(hidden, model.lm_head.weight, targets)
        loss, metrics = grpo_loss(logp, None, None, adv, mask, cu_seqlens=mb.cu_seqlens, loss_type="dapo")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all().item()
