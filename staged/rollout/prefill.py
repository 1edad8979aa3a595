"""The paged engine's prefill of several distinct prompts as ONE packed forward (varlen).

The prompts are concatenated without padding into one [1, T] sequence; the text model runs with
``staged_varlen`` attention (each prompt attends within itself: staged.attention) and a
DynamicCache that collects every layer's keys / values, which the engine then cuts per prompt
into its paged cache. The vision tower runs once over the prompts' images (the caller's job; its
linears on reordered weights make an image's features independent of the images beside it) and
the features are scattered into the image tokens' rows.

Why packed: a padded batch makes a prompt's numbers depend on its neighbours' lengths (the pad
changes the attention's key count and, through the rows count, the GEMM kernels), and one
forward per prompt pays the model's whole Python overhead per prompt and a memory-bound
one-row lm_head each. Packed, every op is per row (oneDNN linears on a CPU give a row the same
bits whatever the row count: staged.rollout.cpu_linear) or per prompt (attention), so a prompt's
K/V and logits are the same bits whichever prompts share the forward, at one forward's cost.

Under FSDP2 the trainer binds ``packed_prefill`` as a root forward method (``PREFILL_METHOD``):
the embeddings, final norm and lm_head are gathered the FSDP way before it runs.
"""
from __future__ import annotations

import contextlib

import torch

from staged import attention
from staged.models.loading import base_model
from staged.rollout.interface import uses_sliding_window
from staged.vision_reuse import split_features, supports_reuse

PREFILL_METHOD = "staged_packed_prefill"


def supports_packed_prefill(model) -> bool:
    """A Qwen-VL model whose image features can be computed apart and injected (staged.vision_reuse)
    and whose text layers all attend fully (``staged_varlen`` has no sliding window) -- the models
    the packed training forward runs."""
    return supports_reuse(model) and not uses_sliding_window(model)


@contextlib.contextmanager
def varlen_attention_enabled(text_config):
    """The text model's layers call ``staged_varlen`` while this is open (restored on exit)."""
    attention.register_attention()
    old = text_config._attn_implementation_internal
    text_config._attn_implementation_internal = attention.ATTN_NAME
    try:
        yield
    finally:
        text_config._attn_implementation_internal = old


def packed_prefill(model, input_ids: list[torch.Tensor], position_ids: list[torch.Tensor],
                   features: list[torch.Tensor | None], cache) -> torch.Tensor:
    """Prompts ``input_ids`` (each [L] int64, unpadded), their mrope ``position_ids`` ([3, L]) and
    image ``features`` (``tower_features``' layout, [Nv, H * (1 + deepstack)], or None), all on the
    model's device, through the text model as one packed sequence. ``cache``: a DynamicCache that
    receives every layer's keys / values [1, kv_heads, sum L, head_dim], the prompts in order.
    Returns the logits after each prompt's last token [P, V] fp32."""
    inner = base_model(model)
    text = inner.language_model
    lengths = [int(x.shape[0]) for x in input_ids]
    ids = torch.cat(input_ids)
    rows = [torch.arange(n, device=ids.device) for n in lengths]
    pos = torch.cat([torch.cat([r[None], p]) for r, p in zip(rows, position_ids)], dim=1)  # [4, T]: row 0 text
    embeds = text.embed_tokens(ids)
    feats = [f for f in features if f is not None]
    deepstack, vision_rows = (), None
    if feats:
        merged, deepstack = split_features(model, torch.cat(feats))
        vision_rows = ids == model.config.image_token_id  # counts checked against the images by generate()
        embeds = embeds.masked_scatter(vision_rows[:, None], merged.to(embeds.dtype))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=ids.device)
    with varlen_attention_enabled(text.config):
        hidden = attention.text_forward_varlen(model, embeds, pos, cu, lengths, max(lengths),
                                               deepstack=deepstack, vision_rows=vision_rows, cache=cache)
    last = hidden[cu[1:].long() - 1]
    return model.get_output_embeddings()(last).float()


def run_packed_prefill(model, *args) -> torch.Tensor:
    """``packed_prefill`` through the root's FSDP forward method when the trainer bound one."""
    fn = getattr(model, PREFILL_METHOD, None)
    return fn(*args) if fn is not None else packed_prefill(model, *args)
