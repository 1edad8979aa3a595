"""Load a local Qwen-VL-family checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and its processor, and
name the parts of the model the trainer needs (vision tower, decoder blocks, lm_head, final hidden).

The embedded default goes through the same code: staged.models.embedded builds and saves an
ordinary checkpoint directory, and this module loads it.

Processor. transformers' Qwen-VL processors cannot be constructed without torchvision (their video
processor requires it, even for image-only use), and torchvision is not installable next to every
torch. So `load_model_and_processor` tries AutoProcessor first and, when that fails, builds
`VLProcessor`: the same image-token expansion (each <|image_pad|> becomes grid_t*grid_h*grid_w /
merge_size**2 copies) over the checkpoint's own tokenizer and (slow, PIL) image processor, loaded
with AutoTokenizer / AutoImageProcessor. Only images, no videos.
"""
from __future__ import annotations

import json
import pathlib
import warnings

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

# Keys a processor returns that the base model's forward does not take (or that we carry ourselves).
_NON_MODEL_KEYS = ("prompt_lengths", "response_lengths", "labels", "token_type_ids")


# ----------------------------------------------------------------------------------------------
# Processor without a video processor


class VLProcessor:
    """A Qwen-VL processor for images and text only: `__call__`, `apply_chat_template`, `decode`,
    `batch_decode` and `save_pretrained`/`from_pretrained` behave like transformers' processor."""

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {self.image_token!r} token: not a Qwen-VL tokenizer")

    @property
    def merge_size(self) -> int:
        return int(getattr(self.image_processor, "merge_size", 2))

    def __call__(self, text=None, images=None, videos=None, *, return_tensors=None, **kwargs):
        from transformers import BatchFeature

        if videos is not None:
            raise NotImplementedError("VLProcessor handles images only (no video processor without torchvision)")
        if text is None:
            raise ValueError("VLProcessor needs text (with one image token per image)")
        texts = [text] if isinstance(text, str) else list(text)
        data = {}
        if images is not None:
            flat = _flatten_images(images)
            image_inputs = self.image_processor(images=flat, return_tensors="pt")
            grid = image_inputs["image_grid_thw"]
            data.update(image_inputs)
            per_image = (grid.prod(-1) // self.merge_size**2).tolist()
            n_placeholders = sum(t.count(self.image_token) for t in texts)
            if n_placeholders != len(per_image):
                raise ValueError(f"found {n_placeholders} {self.image_token} placeholders in the text but "
                                 f"{len(per_image)} images")
            it = iter(per_image)
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                out = parts[0]
                for p in parts[1:]:
                    out += "<|placeholder|>" * next(it) + p
                expanded.append(out.replace("<|placeholder|>", self.image_token))
            texts = expanded
        kwargs.pop("images_kwargs", None)
        enc = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        data.update(enc)
        # Like transformers' processor: 1 marks image tokens, 2 video tokens. Qwen-VL models (transformers 5)
        # compute their 3-D (mrope) positions only when given this.
        ids = enc["input_ids"]
        if isinstance(ids, torch.Tensor):
            data["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        else:
            rows = ids if ids and isinstance(ids[0], list) else [ids]
            mm = [[1 if t == self.image_token_id else 2 if t == self.video_token_id else 0 for t in r] for r in rows]
            data["mm_token_type_ids"] = mm if rows is ids else mm[0]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        kwargs.setdefault("tokenize", False)
        return self.tokenizer.apply_chat_template(conversation, chat_template=chat_template or self.chat_template,
                                                  **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def save_pretrained(self, save_directory, processor_class: str | None = None):
        d = pathlib.Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(d)
        self.image_processor.save_pretrained(d)
        if self.chat_template:
            (d / "chat_template.jinja").write_text(self.chat_template)
        if processor_class:  # lets AutoProcessor build the real processor where torchvision exists
            (d / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path):
        from transformers import AutoTokenizer

        d = pathlib.Path(path)
        tokenizer = AutoTokenizer.from_pretrained(d)
        image_processor = _load_pil_image_processor(d)
        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        elif (d / "chat_template.json").is_file():
            template = json.loads((d / "chat_template.json").read_text()).get("chat_template")
        return cls(image_processor, tokenizer, chat_template=template)


def _load_pil_image_processor(d: pathlib.Path):
    """The checkpoint's image processor, PIL backend (no torchvision)."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(d, backend="pil")
    except ImportError:
        pass  # transformers <= 5.17: AutoImageProcessor itself requires torchvision; name the class instead
    cfg_file = d / "preprocessor_config.json"
    name = "Qwen2VLImageProcessor"
    if cfg_file.is_file():
        name = json.loads(cfg_file.read_text()).get("image_processor_type") or name
    base = name[:-len("Fast")] if name.endswith("Fast") else name
    errors = []
    for cand in dict.fromkeys((base + "Pil", name, "Qwen2VLImageProcessorPil")):
        try:
            return getattr(transformers, cand).from_pretrained(d)
        except (AttributeError, ImportError) as e:
            errors.append(f"{cand}: {type(e).__name__}")
    raise ImportError(f"{d}: no PIL image processor class could load {cfg_file.name} ({'; '.join(errors)})")


def _flatten_images(images) -> list:
    if not isinstance(images, (list, tuple)):
        return [images]
    out = []
    for x in images:
        out.extend(_flatten_images(x) if isinstance(x, (list, tuple)) else [x])
    return out


# ----------------------------------------------------------------------------------------------
# Loading


def checkpoint_model_type(path) -> str:
    """The checkpoint's model_type; raises naming the directory when it is not a supported model."""
    d = pathlib.Path(path)
    cfg = d / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{d}: no config.json here, not a Hugging Face checkpoint directory")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except ValueError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from e
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{d}: model_type {model_type!r} is not supported; staged trains "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
    return model_type


def load_processor(path, *, impl: str = "auto"):
    """impl: "auto" (transformers' AutoProcessor, else VLProcessor with a warning saying why),
    "hf" (AutoProcessor or raise), "lite" (VLProcessor)."""
    if impl not in ("auto", "hf", "lite"):
        raise ValueError(f"processor impl must be 'auto', 'hf' or 'lite', got {impl!r}")
    d = pathlib.Path(path)
    hf_error = None
    if impl in ("auto", "hf"):
        try:
            from transformers import AutoProcessor

            with warnings.catch_warnings():  # its torchvision warnings: the failure is said below, once
                warnings.simplefilter("ignore")
                proc = AutoProcessor.from_pretrained(d)
            if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
                raise TypeError(f"AutoProcessor gave {type(proc).__name__}, not a vision-language processor")
            if getattr(proc, "chat_template", None) is None:
                proc.chat_template = getattr(proc.tokenizer, "chat_template", None)
            return proc
        except Exception as e:  # noqa: BLE001 (any failure: fall back below, or re-raise naming the dir)
            if impl == "hf":
                raise RuntimeError(f"{d}: AutoProcessor failed: {type(e).__name__}: {e}") from e
            hf_error = e
    try:
        proc = VLProcessor.from_pretrained(d)
    except Exception as e:  # noqa: BLE001
        why = f"; AutoProcessor failed first: {type(hf_error).__name__}: {hf_error}" if hf_error else ""
        raise RuntimeError(f"{d}: cannot load a processor: {type(e).__name__}: {e}{why}") from e
    if hf_error is not None:
        _say_fallback(d, hf_error)
    return proc


_FALLBACK_SAID: set[str] = set()


def _say_fallback(d: pathlib.Path, hf_error: Exception) -> None:
    """One readable line, once per process and only on rank 0 (every rank and every model load
    of a run falls back for the same reason)."""
    import os
    import re
    import sys

    if os.environ.get("RANK", "0") != "0" or str(d) in _FALLBACK_SAID:
        return
    _FALLBACK_SAID.add(str(d))
    text = " ".join(str(hf_error).split())
    if "torchvision" in text.lower():
        why = "transformers' processor needs torchvision, which is not installed"
    else:  # the error's first sentence, whole
        why = f"AutoProcessor failed: {type(hf_error).__name__}: {re.split(r'(?<=[.!?]) ', text, maxsplit=1)[0]}"
    print(f"[staged] {d.name}: {why}; using staged's image-only VLProcessor (same image tokens, no video)",
          file=sys.stderr)


def load_model_and_processor(path, *, dtype=torch.float32, attn_implementation="sdpa", processor_impl="auto",
                             device=None, meta: bool = False):
    """Load a local Qwen-VL-family checkpoint directory and its processor.

    Returns (model, processor): the model is *ForConditionalGeneration in `dtype`, in eval mode
    (the caller switches to train()), on `device` if given; the processor's tokenizer pads on the left.
    With ``meta=True`` the model comes from :func:`meta_model` (no weights read, ``device`` ignored).
    """
    from transformers import AutoModelForImageTextToText

    d = pathlib.Path(path).expanduser()
    checkpoint_model_type(d)
    processor = load_processor(d, impl=processor_impl)
    if meta:
        model = meta_model(d, dtype=dtype, attn_implementation=attn_implementation)
    else:
        try:
            model = AutoModelForImageTextToText.from_pretrained(d, dtype=dtype,
                                                                attn_implementation=attn_implementation)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"{d}: cannot load the model: {type(e).__name__}: {e}") from e
        if device is not None:
            model.to(device)
    check_processor_fits(d, model.config, processor)
    model.eval()
    processor.tokenizer.padding_side = "left"
    return model, processor


def check_processor_fits(d, config, processor) -> None:
    """The image processor's patch geometry must be the vision tower's (Qwen2.5-VL: patch 14,
    Qwen3-VL: patch 16): a mismatch would fail deep in the tower's patch embedding, or silently
    give the wrong number of image tokens. Raises naming both numbers."""
    vision = getattr(config, "vision_config", None)
    ip = getattr(processor, "image_processor", None)
    if vision is None or ip is None:
        return
    for ours, theirs in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                         ("merge_size", "spatial_merge_size")):
        a, b = getattr(ip, ours, None), getattr(vision, theirs, None)
        if a is not None and b is not None and int(a) != int(b):
            raise ValueError(f"{d}: the image processor's {ours} is {a} but the vision tower's {theirs} is {b} "
                             f"(preprocessor_config.json vs config.json); use the processor that belongs to "
                             f"this model")


def meta_model(path, *, dtype=torch.float32, attn_implementation="sdpa") -> nn.Module:
    """The checkpoint's model built from its config.json on the meta device: every parameter and
    buffer has a shape and dtype but no storage, and no weight file is opened.

    The non-zero ranks of a multi-rank run build this instead of loading the checkpoint (see
    staged.parallel.shard_from_rank0, which fills it from rank 0). generation_config.json is read
    here because from_config would otherwise leave the model's defaults (eos ids) in place."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    d = pathlib.Path(path).expanduser()
    config = AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(d)
    return model


# ----------------------------------------------------------------------------------------------
# Parts of the model


def _first_attr(obj, paths: tuple[str, ...], what: str):
    for p in paths:
        cur = obj
        for name in p.split("."):
            cur = getattr(cur, name, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    raise AttributeError(f"{type(obj).__name__}: cannot find the {what} (looked for {', '.join(paths)})")


def base_model(model) -> nn.Module:
    """The *Model under the *ForConditionalGeneration head (vision + language, no lm_head)."""
    return _first_attr(model, ("model",), "base model")


def vision_module(model) -> nn.Module:
    """The vision tower (patch embed + blocks + merger): frozen in the textual stage, one FSDP unit."""
    return _first_attr(model, ("model.visual", "visual", "vision_tower"), "vision tower")


def language_model(model) -> nn.Module:
    """The text decoder stack (embeddings, blocks, final norm)."""
    return _first_attr(model, ("model.language_model", "language_model", "model"), "language model")


def decoder_layers(model) -> list[nn.Module]:
    """The text decoder blocks, in order (FSDP units)."""
    return list(_first_attr(model, ("model.language_model.layers", "language_model.layers", "model.layers"),
                            "decoder layers"))


def input_embeddings(model) -> nn.Embedding:
    return model.get_input_embeddings()


def lm_head_weight(model) -> torch.Tensor:
    """The output projection weight [V, H] (a DTensor shard under FSDP2: gather it the FSDP way)."""
    head = model.get_output_embeddings()
    if head is None:
        raise AttributeError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head.weight


def forward_hidden(model, **inputs) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the last norm) from the base model, without computing
    logits: the caller multiplies by lm_head_weight inside the fused log-prob kernel.

    Takes what the processor / prompting returns (input_ids, attention_mask, pixel_values,
    image_grid_thw, mm_token_type_ids, position_ids, ...); bookkeeping keys (prompt_lengths, labels)
    are dropped. Without position_ids the model derives its 3-D (mrope) positions itself, which in
    transformers 5 needs mm_token_type_ids (the prompting module always returns it).
    """
    kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    kwargs.setdefault("use_cache", False)
    out = base_model(model)(**kwargs, return_dict=True)
    return out.last_hidden_state


final_hidden_states = forward_hidden  # the name the design sketch used
