"""Samples -> model inputs: the chat template, image placeholders, tokenization and padding.

Two batch builders, both going through the processor's public API (apply_chat_template, __call__):
  build_generation_batch  prompts only, LEFT-padded, for batched generation (rollouts)
  build_sft_batch         prompt + response, RIGHT-padded, labels masked to the response (warm-up / caption SFT)

Images: one {"type": "image"} part per image, in order, before the text; or, when the prompt holds
`<image>` markers (EasyR1's convention), exactly where they are (one marker per image, else an error).
The processor expands each image part into its <|image_pad|> tokens.

Prompt template (a stage's ``prompt_template``): a jinja template rendered over the prompt text,
``{{ content }}`` = the row's prompt, before the images are placed: the instruction goes into the
user turn, as EasyR1's ``format_prompt`` puts it (verl/utils/dataset.py: ``Template(text.strip())
.render(content=prompt)``), and the chat template's default system message stays.

Images: an ImageRef (file-backed rows) is decoded here, on use, through the per-process LRU;
``min_pixels`` / ``max_pixels`` resize it the way EasyR1 does (staged.data.images) before the
processor, so the rollout, the training forward (which reuses the rollout's pixel values) and SFT
see the same pixels.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import torch

from .images import materialize
from .sample import Sample

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100
MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def model_inputs(batch: dict) -> dict:
    """The keys of a batch that the model's forward / generate take (drops prompt_lengths, labels, ...)."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


# ------------------------------------------------------------------------------------------
# prompt templates


def template_path(name: str) -> Path:
    """A shipped template (staged/configs/templates/NAME.jinja)."""
    return Path(str(resources.files("staged") / "configs" / "templates" / f"{name.removesuffix('.jinja')}.jinja"))


def load_template(value: str) -> str:
    """A stage's prompt_template -> the template text: inline (it contains ``{{``), a .jinja file
    path, or a shipped template's name. Checked: it parses and uses ``content`` and nothing else."""
    if "{{" not in value:
        p = Path(value)
        if not p.is_file():
            shipped = template_path(value)
            if not shipped.is_file():
                names = sorted(q.stem for q in shipped.parent.glob("*.jinja"))
                raise ValueError(f"prompt_template: {value!r} is neither a template (no {{{{ content }}}}), "
                                 f"a file, nor a shipped template (shipped: {names})")
            p = shipped
        value = p.read_text(encoding="utf-8")
    import jinja2
    from jinja2 import meta

    try:
        names = meta.find_undeclared_variables(jinja2.Environment().parse(value))
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"prompt_template: jinja syntax error on line {e.lineno}: {e.message}") from None
    if names != {"content"}:
        raise ValueError(f"prompt_template: must use {{{{ content }}}} (the row's prompt) and no other variable, "
                         f"uses {sorted(names) or 'none'}")
    return value


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    import jinja2

    return jinja2.Template(template.strip())  # EasyR1 strips the template text before rendering


def apply_template(text: str, template: str | None) -> str:
    """The prompt text rendered through the template (``{{ content }}`` = text); None: unchanged."""
    if template is None:
        return text
    out = _compiled(template).render(content=text)
    if out.count(IMAGE_MARKER) != text.count(IMAGE_MARKER):
        raise ValueError(f"prompt_template changed the number of {IMAGE_MARKER} markers "
                         f"({text.count(IMAGE_MARKER)} -> {out.count(IMAGE_MARKER)}): {text[:80]!r}")
    return out


# ------------------------------------------------------------------------------------------
# messages and batches


def build_messages(sample: Sample, *, system_prompt: str | None = None,
                   prompt_template: str | None = None) -> list[dict]:
    """The chat for one sample: [system?, user] with image parts placed as described above; the
    prompt text goes through ``prompt_template`` first (the user turn)."""
    images = list(sample.images or [])
    text = apply_template(sample.prompt, prompt_template)
    content: list[dict] = []
    if IMAGE_MARKER in text:
        pieces = text.split(IMAGE_MARKER)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE_MARKER} markers but the sample has "
                             f"{len(images)} images: {text[:80]!r}")
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
    else:
        content += [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": text})
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    return messages


def prompt_text(processor, sample: Sample, *, system_prompt: str | None = None,
                prompt_template: str | None = None) -> str:
    """The templated prompt string (ends with the assistant header), images still as one placeholder each."""
    out = processor.apply_chat_template(build_messages(sample, system_prompt=system_prompt,
                                                       prompt_template=prompt_template),
                                        add_generation_prompt=True, tokenize=False)
    return out[0] if isinstance(out, list) else out


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


# ------------------------------------------------------------------------------------------
# prompt length without decoding an image (EasyR1's filter_overlong_prompts)


def _smart_resize(image_processor):
    """The processor's own rounding rule (transformers' smart_resize next to its class)."""
    import sys

    fn = getattr(sys.modules.get(type(image_processor).__module__), "smart_resize", None)
    if fn is None:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as fn
    return fn


def vision_tokens(processor, size: tuple[int, int], min_pixels: int | None = None,
                  max_pixels: int | None = None) -> int:
    """<|image_pad|> tokens of an image of ``size`` (width, height): our bounds (staged.data.images),
    then the processor's smart_resize to multiples of patch x merge within its own bounds."""
    from .images import bounded_size

    ip = processor.image_processor
    w, h = bounded_size(size, min_pixels, max_pixels)
    patch, merge = int(ip.patch_size), int(getattr(ip, "merge_size", 2))
    bounds = getattr(ip, "size", None) or {}
    lo = bounds.get("shortest_edge") or getattr(ip, "min_pixels", None) or 56 * 56
    hi = bounds.get("longest_edge") or getattr(ip, "max_pixels", None) or 28 * 28 * 1280
    hb, wb = _smart_resize(ip)(h, w, factor=patch * merge, min_pixels=lo, max_pixels=hi)
    return (hb // (patch * merge)) * (wb // (patch * merge))


def prompt_length(processor, sample: Sample, *, system_prompt: str | None = None, prompt_template: str | None = None,
                  min_pixels: int | None = None, max_pixels: int | None = None) -> int:
    """Tokens of the sample's generation prompt, image tokens included, from the images' sizes
    (no pixel is decoded): what build_generation_batch would give it."""
    text = prompt_text(processor, sample, system_prompt=system_prompt, prompt_template=prompt_template)
    n = len(_tokenizer(processor)(text, add_special_tokens=False)["input_ids"])
    return n + sum(vision_tokens(processor, im.size, min_pixels, max_pixels) - 1 for im in sample.images or [])


def _end_of_turn_id(tok) -> int:
    """<|im_end|> ends an assistant turn in Qwen's template: the SFT target ends with it so the model learns
    to stop (it is the generation eos)."""
    tid = tok.convert_tokens_to_ids("<|im_end|>")
    if tid is None or tid == tok.unk_token_id:
        tid = tok.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos token")
    return int(tid)


def _pad_id(tok) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else _end_of_turn_id(tok))


def _encode_prompt(processor, sample: Sample, system_prompt: str | None, prompt_template: str | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """One prompt through processor.__call__: ids [T] and, with images, pixel_values/image_grid_thw."""
    text = prompt_text(processor, sample, system_prompt=system_prompt, prompt_template=prompt_template)
    images = [materialize(im, min_pixels, max_pixels) for im in sample.images or []]
    enc = processor(text=[text], images=images or None, return_tensors="pt")
    out = {"input_ids": enc["input_ids"][0]}
    if images:
        out["pixel_values"] = enc["pixel_values"]
        out["image_grid_thw"] = enc["image_grid_thw"]
    return out


def mm_token_type_ids(processor, input_ids: torch.Tensor) -> torch.Tensor:
    """1 on image tokens, 2 on video tokens, 0 elsewhere, as transformers' Qwen-VL processors return it:
    Qwen-VL models in transformers 5 compute 3-D (mrope) positions only when they get it."""
    tok = _tokenizer(processor)
    image_id = getattr(processor, "image_token_id", None)
    if image_id is None:
        image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    video_id = getattr(processor, "video_token_id", None)
    if video_id is None:
        video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    out = (input_ids == image_id).long()
    if video_id is not None:
        out += 2 * (input_ids == video_id).long()
    return out


def _stack_vision(encs: list[dict], batch: dict) -> None:
    pv = [e["pixel_values"] for e in encs if "pixel_values" in e]
    if pv:
        batch["pixel_values"] = torch.cat(pv, 0)
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encs if "image_grid_thw" in e], 0)


def build_generation_batch(processor, samples: list[Sample], *, system_prompt: str | None = None,
                           prompt_template: str | None = None, min_pixels: int | None = None,
                           max_pixels: int | None = None) -> dict[str, torch.Tensor]:
    """Prompts for batched generation, LEFT-padded.

    Returns input_ids [B, T] long, attention_mask [B, T] long, mm_token_type_ids [B, T] long (1 on image
    tokens), prompt_lengths [B] long (real tokens per row), and when any row has images pixel_values [sum patches, C*t*p*p] + image_grid_thw [n_images, 3]
    in row order. Rows with and without images mix freely. prompt_template, min_pixels, max_pixels:
    see the module doc (a stage's prompt_template and data.min_pixels / data.max_pixels).
    """
    if not samples:
        raise ValueError("build_generation_batch: no samples")
    tok = _tokenizer(processor)
    encs = [_encode_prompt(processor, s, system_prompt, prompt_template, min_pixels, max_pixels) for s in samples]
    lengths = [int(e["input_ids"].numel()) for e in encs]
    T = max(lengths)
    pad = _pad_id(tok)
    input_ids = torch.full((len(samples), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.long)
    for i, e in enumerate(encs):
        L = lengths[i]
        input_ids[i, T - L:] = e["input_ids"]
        attention_mask[i, T - L:] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "mm_token_type_ids": mm_token_type_ids(processor, input_ids),
             "prompt_lengths": torch.tensor(lengths, dtype=torch.long)}
    _stack_vision(encs, batch)
    return batch


def build_sft_batch(processor, samples: list[Sample], responses: list[str], *,
                    system_prompt: str | None = None, add_end_of_turn: bool = True, prompt_template: str | None = None,
                    min_pixels: int | None = None, max_pixels: int | None = None) -> dict[str, torch.Tensor]:
    """Prompt + response for supervised warm-up, RIGHT-padded.

    The response is tokenized on its own and appended to the prompt ids (so the prompt/response
    boundary is exact, as in a rollout), followed by <|im_end|> when add_end_of_turn.
    Returns input_ids, attention_mask, mm_token_type_ids, labels (-100 on prompt and padding: the loss is on response
    tokens + end of turn only), prompt_lengths, response_lengths, and pixel_values/image_grid_thw
    when any row has images.
    """
    if len(samples) != len(responses):
        raise ValueError(f"build_sft_batch: {len(samples)} samples but {len(responses)} responses")
    if not samples:
        raise ValueError("build_sft_batch: no samples")
    tok = _tokenizer(processor)
    eot = _end_of_turn_id(tok)
    encs = [_encode_prompt(processor, s, system_prompt, prompt_template, min_pixels, max_pixels) for s in samples]
    rows, p_lens, r_lens = [], [], []
    for e, resp in zip(encs, responses):
        r_ids = tok(resp, add_special_tokens=False)["input_ids"]
        if add_end_of_turn:
            r_ids = list(r_ids) + [eot]
        r = torch.tensor(r_ids, dtype=torch.long)
        rows.append(torch.cat([e["input_ids"], r]))
        p_lens.append(int(e["input_ids"].numel()))
        r_lens.append(int(r.numel()))
    T = max(int(r.numel()) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), _pad_id(tok), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        L, P = int(row.numel()), p_lens[i]
        input_ids[i, :L] = row
        attention_mask[i, :L] = 1
        labels[i, P:L] = row[P:]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "mm_token_type_ids": mm_token_type_ids(processor, input_ids),
             "prompt_lengths": torch.tensor(p_lens, dtype=torch.long),
             "response_lengths": torch.tensor(r_lens, dtype=torch.long)}
    _stack_vision(encs, batch)
    return batch
