"""Qwen3-VL end to end: a tiny Qwen3-VL checkpoint (built from config, ``save_pretrained``) trains
a short staged run with packing -- GRPO with a KL reference model, a frozen-vision dapo stage
under a small token budget (several packed micro-batches), an SFT stage -- through the paged
rollout engine, and each stage's HF export loads back as a Qwen3-VL with its processor files.
(Before: the first packed step crashed in transformers' create_causal_mask.)"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import read_records, run_train

QWEN3_TOML = """
model = "{model}"
output_dir = "{out}"
seed = 3
checkpoint_every = 0
keep_checkpoints = 0
tensorboard = false
plot = false
progress = false

[packing]
enabled = true

[[stages]]
name = "perception"
data = {{ synthetic = "perception", num_samples = 32 }}
steps = 2
lr = 1e-4
batch = {{ prompts_per_step = 4, group_size = 2, micro_batch_size = 4 }}
grpo = {{ max_response_tokens = 6, beta = 0.02 }}

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
    for r in recs[:3]:  # GRPO: the packed forward reproduces the sampler's log-probs
        assert math.isfinite(r["entropy"]) and r["sampler_logp_diff"] < 1e-5, r

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


MIXED_TOML = """
model = "{model}"
output_dir = "{out}"
seed = 1
checkpoint_every = 0
keep_checkpoints = 0
tensorboard = false
plot = false
progress = false

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
