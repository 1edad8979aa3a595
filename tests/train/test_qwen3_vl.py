"""Qwen3-VL end to end: a tiny Qwen3-VL checkpoint (built from config, ``save_pretrained``) trains
a short staged run with packing -- GRPO with a KL reference model, a frozen-vision dapo stage
under a small token budget (several packed micro-batches), an SFT stage -- through the paged
rollout engine, and each stage's HF export loads back as a Qwen3-VL with its processor files.
(Before: the first packed step crashed in transformers' create_causal_mask.) Also: a mixed
image/text stage on 2 ranks (the dummy tower term carries the deepstack features), the reused
vision features (merged + deepstack) against the tower in transformers' forward, model ids
resolved from the local HF cache (paper_qwen3_vl), and a processor of another patch size refused."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import read_records, run_header, run_train

QWEN3_TOML = run_header(seed=3, checkpoint_every=0) + """
[packing]
enabled = true

[[stages]]
name = "perception"
data = {{ synthetic = "perception", num_samples = 32 }}
steps = 2
lr = 1e-4
batch = {{ prompts_per_step = 4, group_size = 2, micro_batch_size = 4, mini_batch_prompts = 2 }}
grpo = {{ max_response_tokens = 6, beta = 0.02, dual_clip = 3.0 }}

[[stages]]
name = "textual"
data = {{ synthetic = "perception", num_samples = 32, seed = 11 }}
freeze = ["vision"]
steps = 1
lr = 1e-4
batch = {{ prompts_per_step = 4, group_size = 2, micro_batch_size = 8 }}
grpo = {{ max_response_tokens = 6, loss_type = "dapo" }}

[[stages]]
name = "sft"
type = "sft"
data = {{ synthetic = "perception", num_samples = 32, seed = 5 }}
steps = 1
lr = 1e-3
batch = {{ prompts_per_step = 4, group_size = 1, micro_batch_size = 2 }}
"""


def test_qwen3_vl_staged_run_with_packing_and_export(tmp_path, qwen3_dir):
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    out = tmp_path / "out"
    cfg = tmp_path / "qwen3.toml"
    cfg.write_text(QWEN3_TOML.format(model=qwen3_dir, out=out))
    run_train(["--config", str(cfg), "packing.token_budget=160"], cwd=tmp_path)

    recs = read_records(out)
    assert len(recs) == 4
    for r in recs:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    # perception: packing, two mini-batches (two optimizer updates per rollout) and dual-clip
    assert [r["updates"] for r in recs[:3]] == [2, 2, 1]
    for r in recs[:3]:
        assert math.isfinite(r["entropy"]), r
    # the packed forward reproduces the sampler's log-probs (the first update of a step is on-policy;
    # with mini-batches the step's figure also averages the later update, taken after the first moved
    # the weights)
    assert recs[2]["sampler_logp_diff"] < 1e-5, recs[2]

    initial = dict(Qwen3VLForConditionalGeneration.from_pretrained(qwen3_dir).named_parameters())
    prev = None
    for stage in ("stage0-perception", "stage1-textual", "stage2-sft"):
        export = out / "hf" / stage
        assert json.loads((export / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
        assert AutoConfig.from_pretrained(export).model_type == "qwen3_vl"
        model, info = Qwen3VLForConditionalGeneration.from_pretrained(export, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        params = dict(model.named_parameters())
        if stage == "stage1-textual":  # the frozen stage left the tower (deepstack mergers too) alone
            for k in params:
                if k.startswith("model.visual."):
                    assert torch.equal(params[k], prev[k]), k
        prev = params
    assert any(not torch.equal(prev[k], initial[k]) for k in prev), "the run should move the weights"


def test_a_model_id_resolves_to_its_local_hf_cache_snapshot(tmp_path, monkeypatch):
    """paper_qwen3_vl names the model by its id: a local directory of that name first, else the
    id's snapshot in the local HF cache (never a download), else an error saying what to do."""
    import huggingface_hub

    from staged.train import local_checkpoint

    calls = []

    def fake_snapshot(repo_id, local_files_only=False, **kw):
        calls.append((repo_id, local_files_only))
        if repo_id != "Qwen/Qwen3-VL-8B-Instruct":
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in cache")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.chdir(tmp_path)
    assert local_checkpoint("Qwen/Qwen3-VL-8B-Instruct") == tmp_path / "snap"
    assert calls == [("Qwen/Qwen3-VL-8B-Instruct", True)]
    (tmp_path / "Qwen" / "Qwen3-VL-8B-Instruct").mkdir(parents=True)  # a local directory wins
    assert local_checkpoint("Qwen/Qwen3-VL-8B-Instruct").resolve() == tmp_path / "Qwen" / "Qwen3-VL-8B-Instruct"
    assert local_checkpoint("/ckpt/x") == Path("/ckpt/x") and local_checkpoint("ckpt") == Path("ckpt")
    with pytest.raises(FileNotFoundError, match=r"'Org/Missing'.*hf download Org/Missing"):
        local_checkpoint("Org/Missing")


MIXED_TOML = run_header(seed=1, checkpoint_every=0) + """
[[stages]]
name = "mixed-grpo"
data = {{ synthetic = ["perception", "textual"], num_samples = 32 }}
steps = 3
lr = 1e-5
batch = {{ prompts_per_step = 4, group_size = 2, micro_batch_size = 2 }}
grpo = {{ max_response_tokens = 6, beta = 0.02 }}
"""


@pytest.mark.slow
def test_qwen3_vl_mixed_stage_on_two_ranks(tmp_path, qwen3_dir):
    """Image and text-only samples on 2 ranks, packed: a rank without an image runs the tower on
    a dummy image whose deepstack features reach the loss too (staged.vision_dummy), so both
    ranks reduce-scatter the deepstack mergers' gradients. (Without them in the dummy term the
    ranks' collectives differ and the run dies.)"""
    out = tmp_path / "out"
    cfg = tmp_path / "mixed.toml"
    cfg.write_text(MIXED_TOML.format(model=qwen3_dir, out=out))
    run_train(["--config", str(cfg), "packing.enabled=true"], nproc=2, cwd=tmp_path)
    recs = read_records(out)
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)


@pytest.mark.parametrize("deepstack,tied", [((0, 1), False), ((1,), True), ((8, 16, 24), True)],
                         ids=["two-layers", "one-layer-tied", "indexes-past-the-tower"])
def test_injected_features_equal_the_tower_in_the_forward(deepstack, tied):
    """``injected_image_features`` with ``tower_features``' output (merged + deepstack) gives
    transformers' own forward's logits and gradients, the tower's included, for deepstack from
    two, one or no tower blocks (a config may list blocks past the tower's depth: none run)."""
    from transformers import Qwen3VLForConditionalGeneration

    from staged.models import embedded
    from staged.vision_reuse import injected_image_features, split_features, tower_features

    tok = embedded.build_tokenizer()
    cfg = embedded.build_qwen3_vl_config(tok, deepstack=deepstack)
    cfg.tie_word_embeddings = cfg.text_config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    img = tok.convert_tokens_to_ids("<|image_pad|>")
    gen = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])
    pix = torch.randn(24, 3 * 2 * 16 * 16, generator=gen)
    ids = torch.randint(10, 200, (2, 16), generator=gen)
    ids[0, 2:6] = img  # image 0: 4 x 4 patches = 4 tokens, in row 0
    ids[1, 1:3] = img  # image 1: 2 x 4 patches = 2 tokens, in row 1
    inputs = dict(input_ids=ids, mm_token_type_ids=(ids == img).int(), pixel_values=pix, image_grid_thw=grid)
    n_deep = len([i for i in deepstack if i < cfg.vision_config.depth])

    weights = torch.randn(2, 16, cfg.text_config.vocab_size, generator=gen)
    model.zero_grad()
    want = model(**inputs).logits
    (want * weights).sum().backward()
    want_g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    feats = tower_features(model, pix, grid)
    assert feats.shape == (6, 64 * (1 + n_deep))
    assert len(split_features(model, feats)[1]) == n_deep
    leaf = feats.detach().requires_grad_(True)
    with injected_image_features(model, leaf):
        got = model(**inputs).logits
    (got * weights).sum().backward()
    feats.backward(leaf.grad)  # the deferred tower pass
    got_g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_g.keys() == want_g.keys()
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    merger_grads = [n for n in want_g if "deepstack_merger_list" in n]
    assert bool(merger_grads) == bool(n_deep)
    assert "get_image_features" not in vars(model.model) and "forward" not in vars(model.model.language_model)


def test_a_processor_of_another_patch_size_is_refused(tmp_path, qwen3_dir):
    """The embedded (Qwen2.5-VL, patch 14) processor beside a Qwen3-VL (patch 16) tower: a loud
    error naming both numbers at load time, not a shape error inside the tower."""
    import shutil

    from staged.models.embedded import build_image_processor
    from staged.models.loading import load_model_and_processor

    d = tmp_path / "mixed"
    shutil.copytree(qwen3_dir, d)
    build_image_processor().save_pretrained(d)
    with pytest.raises(ValueError, match=r"image processor's patch_size is 14 but the vision tower's patch_size is 16"):
        load_model_and_processor(d)
    model, processor = load_model_and_processor(qwen3_dir)
    assert processor.image_processor.patch_size == model.config.vision_config.patch_size == 16
