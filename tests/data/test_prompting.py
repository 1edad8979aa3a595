"""Batch building: chat template, left-padded generation batches, right-padded SFT batches."""
import pytest
import torch

from staged.data import Sample, make_synthetic_dataset
from staged.data.prompting import IGNORE_INDEX, build_generation_batch, build_messages, build_sft_batch, prompt_text


@pytest.fixture(scope="module")
def proc(embedded):
    return embedded[1]


def _mixed():
    return make_synthetic_dataset("perception", 2, seed=0) + make_synthetic_dataset("textual", 2, seed=0)


def test_generation_batch_left_padded_mixed(proc):
    ss = _mixed()
    b = build_generation_batch(proc, ss)
    ids, am = b["input_ids"], b["attention_mask"]
    assert ids.dtype == torch.long and ids.shape == am.shape
    assert torch.equal(b["prompt_lengths"], am.sum(1))
    for i in range(len(ss)):  # left padding: the real tokens end at the last column
        L = int(b["prompt_lengths"][i])
        assert am[i, -L:].all() and not am[i, :-L].any()
        assert (ids[i, :-L] == proc.tokenizer.pad_token_id).all()
        assert ids[i, -1] == proc.tokenizer.convert_tokens_to_ids("\u010a")  # ends "assistant\n"
    n_img = (ids == proc.image_token_id).sum(1)
    assert n_img.tolist() == [4, 4, 0, 0]
    assert torch.equal(b["mm_token_type_ids"], (ids == proc.image_token_id).long())
    assert b["pixel_values"].shape[0] == 2 * 16 and b["image_grid_thw"].tolist() == [[1, 4, 4]] * 2


def test_text_only_batch_has_no_vision_keys(proc):
    b = build_generation_batch(proc, make_synthetic_dataset("textual", 3, seed=0))
    assert "pixel_values" not in b and "image_grid_thw" not in b


def test_image_markers_and_system_prompt(proc):
    img = make_synthetic_dataset("perception", 1, seed=0)[0].images[0]
    s = Sample("Look: <image> How many circles?", "A", "mcq", images=[img])
    msgs = build_messages(s, system_prompt="Be brief.")
    assert [p["type"] for p in msgs[1]["content"]] == ["text", "image", "text"]
    text = prompt_text(proc, s, system_prompt="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "Look: <|vision_start|><|image_pad|><|vision_end|> How many circles?" in text
    with pytest.raises(ValueError, match="1 <image> markers but the sample has 0 images"):
        build_messages(Sample("<image> hi", "A", "mcq"))


def test_sft_batch_labels_cover_only_the_response(proc):
    ss = _mixed()
    responses = [s.reference_response for s in ss]
    b = build_sft_batch(proc, ss, responses)
    gen = build_generation_batch(proc, ss)
    tok = proc.tokenizer
    for i, r in enumerate(responses):
        P, R = int(b["prompt_lengths"][i]), int(b["response_lengths"][i])
        assert P == int(gen["prompt_lengths"][i])
        # the prompt part is the generation prompt, token for token
        assert torch.equal(b["input_ids"][i, :P], gen["input_ids"][i, -P:])
        lab = b["labels"][i]
        assert (lab[:P] == IGNORE_INDEX).all() and (lab[P + R:] == IGNORE_INDEX).all()
        assert torch.equal(lab[P:P + R], b["input_ids"][i, P:P + R])
        assert tok.decode(lab[P:P + R]) == r + "<|im_end|>"
        assert b["attention_mask"][i, :P + R].all() and not b["attention_mask"][i, P + R:].any()
    assert torch.equal(b["pixel_values"], gen["pixel_values"])


def test_sft_batch_runs_through_the_model(embedded):
    from staged.models.loading import forward_hidden, lm_head_weight

    model, proc = embedded
    ss = make_synthetic_dataset("visual", 3, seed=0)
    b = build_sft_batch(proc, ss, [s.reference_response for s in ss])
    h = forward_hidden(model, **b)
    logits = h[:, :-1] @ lm_head_weight(model).T
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    assert torch.isfinite(loss) and model.model.visual.patch_embed.proj.weight.grad is not None


def test_length_mismatch(proc):
    with pytest.raises(ValueError, match="2 samples but 1 responses"):
        build_sft_batch(proc, _mixed()[:2], ["x"])
