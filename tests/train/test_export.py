"""The HF checkpoint exported at each stage end loads with from_pretrained, with its processor
files, and holds the trained (not the initial) weights."""
import json

import pytest
import torch

from staged.models.loading import load_model_and_processor


@pytest.mark.slow
def test_stage_export_loads_with_from_pretrained(reference_run, warm_model):
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    export = reference_run / "hf" / "stage1-frozen-vision"
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "preprocessor_config.json", "chat_template.jinja"):
        assert (export / f).is_file(), f
    assert json.loads((export / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert AutoConfig.from_pretrained(export).model_type == "qwen2_5_vl"
    assert AutoTokenizer.from_pretrained(export).eos_token == "<|im_end|>"

    # through the trainer's own loader too; the weights moved away from the initial checkpoint
    trained, processor = load_model_and_processor(export)
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(warm_model)
    a, b = dict(trained.named_parameters()), dict(initial.named_parameters())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the frozen-vision stage left the vision tower exactly as the previous stage exported it
    prev = Qwen2_5_VLForConditionalGeneration.from_pretrained(reference_run / "hf" / "stage0-perception")
    p = dict(prev.named_parameters())
    for k in a:
        if ".visual." in f".{k}":
            assert torch.equal(a[k], p[k]), k
    assert processor.tokenizer.pad_token_id is not None
