"""Decode attention over the paged KV cache, as a transformers attention function.

The engine runs the model's own decoder layers for a decode step (so every Qwen-VL variant's
q/k norms, rotary embedding and GQA stay transformers' code) with the text model's attention
implementation switched to ``staged_paged`` for the step. The layer hands this function the new
token's query / key / value (rotary applied); the function writes the key and value into the
pool in place and attends over the row's blocks:

  flash   flash-attn's ``flash_attn_with_kvcache`` with ``block_table`` (CUDA, fp16/bf16, block
          size a multiple of 256): appends and attends in one kernel, reading the pool directly.
  torch   gathers the rows' blocks into [S, kv_heads, L, head_dim] and calls
          ``scaled_dot_product_attention`` (GQA native) with a length mask: exact, any device.
          Eager steps (a CPU) call it once per distinct row length instead, over exactly that
          many keys: a row's result is then the same bits whatever rows share its step.

query [S, heads, 1, head_dim], key / value [S, kv_heads, 1, head_dim]; returns [S, 1, heads, head_dim].
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from staged.rollout.cache import PagedKVCache

ATTN_NAME = "staged_paged"
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@dataclass
class DecodeStep:
    """What one decode step's attention needs, shared by all layers."""

    cache: PagedKVCache
    slot: torch.Tensor          # [S] int64: block * block_size + offset where the new token goes
    block_table: torch.Tensor   # [S, MB] int32: the rows' blocks (trimmed to the longest row)
    seqlens: torch.Tensor       # [S] int32: tokens in the cache after this step's write
    backend: str                # "flash" | "torch"
    mask: torch.Tensor | None = None  # [S, 1, 1, MB * block_size] bool (torch backend)
    # torch backend, eager steps: rows of equal length attend together over exactly that many
    # keys, [(row positions [k] int64, length)]; see paged_attention.
    by_length: list | None = None


def choose_backend(device: torch.device, dtype: torch.dtype, block_size: int) -> str:
    if (HAS_FLASH_ATTN and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and block_size % 256 == 0):
        return "flash"
    return "torch"


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, paged=None, **kwargs):
    if paged is None:
        raise RuntimeError("staged_paged attention called outside a paged decode step")
    layer = module.layer_idx
    c = paged.cache
    if paged.backend == "flash":
        from flash_attn import flash_attn_with_kvcache

        out = flash_attn_with_kvcache(query.transpose(1, 2), c.keys[layer], c.values[layer],
                                     k=key.transpose(1, 2), v=value.transpose(1, 2),
                                     cache_seqlens=paged.seqlens - 1, block_table=paged.block_table,
                                     softmax_scale=scaling, causal=True)
        return out, None
    c.write_token(layer, paged.slot, key[:, :, 0], value[:, :, 0])
    bt = paged.block_table.long()
    if paged.by_length is not None:
        # Each row over exactly its own keys, no mask: its numbers then do not depend on the
        # longest row beside it (SDPA's CPU kernel sums a row's keys in an order set by the key
        # count, so padding to the batch's width moves the rounding: enough to flip a sampled
        # token among 152k near-equal probabilities). Rows of one prompt share a length.
        out = query.new_empty(query.shape)
        for rows, L in paged.by_length:
            nb = -(-L // c.block_size)
            k = c.keys[layer][bt[rows, :nb]].flatten(1, 2)[:, :L].transpose(1, 2)
            v = c.values[layer][bt[rows, :nb]].flatten(1, 2)[:, :L].transpose(1, 2)
            out[rows] = F.scaled_dot_product_attention(query[rows], k, v, scale=scaling,
                                                       enable_gqa=k.shape[1] != query.shape[1])
        return out.transpose(1, 2), None
    S, MB = paged.block_table.shape
    k = c.keys[layer][bt].view(S, MB * c.block_size, *c.keys[layer].shape[2:]).transpose(1, 2)
    v = c.values[layer][bt].view(S, MB * c.block_size, *c.values[layer].shape[2:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=paged.mask, scale=scaling,
                                         enable_gqa=k.shape[1] != query.shape[1])
    return out.transpose(1, 2), None


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, paged_attention)
        _registered = True


@contextlib.contextmanager
def paged_attention_enabled(text_config):
    """The text model's layers call ``paged_attention`` while this is open (the vision tower keeps
    its own). Set on the config object the attention modules read; restored on exit."""
    register()
    old = text_config._attn_implementation_internal
    text_config._attn_implementation_internal = ATTN_NAME
    try:
        yield
    finally:
        text_config._attn_implementation_internal = old
