"""The embedded default: builds offline, round-trips through load_model_and_processor, generates."""
import json

import pytest
import torch
from PIL import Image

from staged.data.prompting import build_generation_batch
from staged.data.sample import Sample
from staged.models import embedded as E
from staged.models.loading import (
    decoder_layers,
    forward_hidden,
    lm_head_weight,
    load_model_and_processor,
    vision_module,
)


def test_checkpoint_is_a_normal_hf_dir(embedded_dir):
    for f in E._REQUIRED:
        assert (embedded_dir / f).is_file(), f
    cfg = json.loads((embedded_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"
    assert cfg["vision_config"]["patch_size"] == 14 and cfg["vision_config"]["spatial_merge_size"] == 2


def test_reuse_is_idempotent(embedded_dir):
    before = (embedded_dir / "model.safetensors").stat().st_mtime_ns
    assert E.build_embedded_checkpoint(embedded_dir, seed=0) == embedded_dir
    assert (embedded_dir / "model.safetensors").stat().st_mtime_ns == before


def test_deterministic_per_seed(embedded_dir, tmp_path):
    from safetensors.torch import load_file

    ref = load_file(embedded_dir / "model.safetensors")
    same = load_file(E.build_embedded_checkpoint(tmp_path / "same", seed=0) / "model.safetensors")
    assert ref.keys() == same.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    other = load_file(E.build_embedded_checkpoint(tmp_path / "other", seed=1) / "model.safetensors")
    assert not torch.equal(ref["lm_head.weight"], other["lm_head.weight"])


def test_stale_build_is_replaced(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text("{}")  # a partial build: no stamp, no weights
    out = E.build_embedded_checkpoint(d, seed=0)
    assert json.loads((out / E.STAMP_FILE).read_text())["version"] == E.EMBEDDED_VERSION


def test_unknown_size_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="size"):
        E.build_embedded_checkpoint(tmp_path / "x", size="huge")


def test_tokenizer(embedded):
    _, proc = embedded
    tok = proc.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in E.SPECIAL_TOKENS + E.PLAIN_ADDED_TOKENS:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id, t
    for w in E.WORDS:  # whole words are single tokens, with or without a leading space
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    resp = "<think>3+4=7</think>\\boxed{7}"
    ids = tok(resp, add_special_tokens=False)["input_ids"]
    assert len(ids) == 10
    # <think>, </think> and \boxed{ are not special: they survive skip_special_tokens.
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == resp
    assert len(tok) < 512


def test_chat_template_renders_qwen_format(embedded):
    _, proc = embedded
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is 3 + 4?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is 3 + 4?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    assert proc.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n")


def test_image_token_counts(embedded):
    _, proc = embedded
    for size, n_tokens in (((56, 56), 4), ((112, 112), 16), ((300, 200), None)):
        enc = proc(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[Image.new("RGB", size)],
                   return_tensors="pt")
        got = int((enc["input_ids"] == proc.image_token_id).sum())
        grid = enc["image_grid_thw"][0]
        assert got == int(grid.prod()) // 4 == enc["pixel_values"].shape[0] // 4
        assert got == n_tokens if n_tokens else 1 <= got <= 16


def test_model_parts(embedded):
    model, _ = embedded
    assert vision_module(model) is model.model.visual
    layers = decoder_layers(model)
    assert len(layers) == E.SIZES["tiny"]["layers"]
    w = lm_head_weight(model)
    assert w.shape == (model.config.text_config.vocab_size, E.SIZES["tiny"]["hidden"])
    assert w.data_ptr() != model.get_input_embeddings().weight.data_ptr()  # untied


def _mixed_samples():
    img = Image.new("RGB", (56, 56), (255, 255, 255))
    img.paste((220, 30, 30), (5, 5, 25, 25))
    return [Sample("How many circles are in the image?", "A", "mcq", images=[img]),
            Sample("What is 3 + 4?", "7", "number"),
            Sample("What is 12 - 5 and why?", "7", "number"),
            Sample("Count the squares in the image and add 3.", "4", "number", images=[img.rotate(90)])]


def test_mixed_batch_forward_matches_single_rows(embedded):
    """Left padding and a text-only row next to image rows change nothing for any row."""
    model, proc = embedded
    samples = _mixed_samples()
    batch = build_generation_batch(proc, samples)
    with torch.no_grad():
        h = forward_hidden(model, **batch)
        assert h.shape == (*batch["input_ids"].shape, model.config.text_config.hidden_size)
        assert torch.isfinite(h).all()
        for i, s in enumerate(samples):
            one = build_generation_batch(proc, [s])
            h1 = forward_hidden(model, **one)[0]
            L = int(batch["prompt_lengths"][i])
            torch.testing.assert_close(h[i, -L:], h1, atol=1e-4, rtol=1e-4)


def test_generate_agrees_with_forward(embedded):
    """Greedy generation with the KV cache == argmax of one full forward (mrope positions agree)."""
    model, proc = embedded
    batch = build_generation_batch(proc, _mixed_samples())
    inputs = {k: v for k, v in batch.items() if k != "prompt_lengths"}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        T = inputs["input_ids"].shape[1]
        new = out.shape[1] - T
        assert new == 6
        pad = lambda x, v: torch.cat([x, torch.full((x.shape[0], new), v, dtype=x.dtype)], 1)  # noqa: E731
        h = forward_hidden(model, input_ids=out, attention_mask=pad(inputs["attention_mask"], 1),
                           mm_token_type_ids=pad(inputs["mm_token_type_ids"], 0),
                           pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        pred = (h[:, T - 1:-1] @ lm_head_weight(model).T).argmax(-1)
    assert torch.equal(pred, out[:, T:])
    assert len(proc.batch_decode(out[:, T:], skip_special_tokens=True)) == 4


def test_unsupported_checkpoint_errors_name_the_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_model_and_processor(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=f"{tmp_path}.*llama"):
        load_model_and_processor(tmp_path)


def test_runs_of_two_seeds_keep_their_own_checkpoints(tmp_path):
    """The embedded weights follow the run seed. Two runs of different seeds with one embedded_dir
    (an ablation's, or two shells) once rebuilt the same directory in turn: the second replaced the
    first's weights under it (or failed renaming its build into place while the first held it)."""
    from staged import parallel
    from staged.config import load_config
    from staged.train import resolve_model_path

    single = parallel.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    paths = {}
    for seed in (0, 1, 0):
        cfg = load_config("default", [f"seed={seed}", f"embedded_dir={tmp_path / 'model'}"])
        paths.setdefault(seed, []).append(resolve_model_path(cfg, single))
    assert paths[0][0] == paths[0][1] == tmp_path / "model" and paths[1][0] != paths[0][0]
    stamps = {s: json.loads((p[0] / E.STAMP_FILE).read_text()) for s, p in paths.items()}
    assert stamps[0]["seed"] == 0 and stamps[1]["seed"] == 1
