"""Decode attention over the paged KV cache, as a transformers attention function.

The engine runs the model's own decoder layers for a decode step (so every Qwen-VL variant's
q/k norms, rotary embedding and GQA stay transformers' code) with the text model's attention
implementation switched to ``staged_paged`` for the step. The layer hands this function the new
token's query / key / value (rotary applied); the function writes the key and value into the
pool in place and attends over the row's blocks:

  flash   flash-attn's ``flash_attn_with_kvcache`` with ``block_table`` (CUDA, fp16/bf16, block
          size a multiple of 256): appends and attends in one kernel, reading the pool directly.
  triton  our kernel (staged.kernels.paged_decode; CUDA, or a CPU under TRITON_INTERPRET=1):
          writes the token, then reads each row's own blocks in place through its table. A
          row's output is the same bits whatever rows share the step. Checked once per process
          and geometry against the torch path on the device before first use; a kernel that
          fails or disagrees leaves the torch path in its place, with a warning.
  torch   gathers the rows' blocks into [S, kv_heads, L, head_dim] and calls
          ``scaled_dot_product_attention`` (GQA native) with a length mask: exact, any device.
          Eager steps (a CPU) call it once per distinct row length instead, over exactly that
          many keys: a row's result is then the same bits whatever rows share its step. The
          step's rows come grouped by length, and each layer gathers every row's keys / values
          with one ``index_select`` over a token index built once per step (``token_index``).

query [S, heads, 1, head_dim], key / value [S, kv_heads, 1, head_dim]; returns [S, 1, heads, head_dim].
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from staged.config import ATTENTION_BACKENDS
from staged.rollout.cache import PagedKVCache

ATTN_NAME = "staged_paged"
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclass
class DecodeStep:
    """What one decode step's attention needs, shared by all layers."""

    cache: PagedKVCache
    slot: torch.Tensor          # [S] int64: block * block_size + offset where the new token goes
    block_table: torch.Tensor   # [S, MB] int32: the rows' blocks (trimmed to the longest row)
    seqlens: torch.Tensor       # [S] int32: tokens in the cache after this step's write
    backend: str                # "flash" | "triton" | "torch"
    mask: torch.Tensor | None = None  # [S, 1, 1, MB * block_size] bool (torch backend)
    # torch backend, eager steps: rows of equal length attend together over exactly that many
    # keys, [(first row, end row, length)] (rows grouped by length), and the cache slots of every
    # row's keys in row order (token_index); see paged_attention.
    by_length: list | None = None
    token_index: torch.Tensor | None = None


def token_index(block_table: torch.Tensor, seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """[sum(seqlens)] int64: block * block_size + offset of each row's tokens, row after row;
    block_table [S, MB] int64, seqlens [S]."""
    S, MB = block_table.shape
    offsets = torch.arange(block_size, device=block_table.device)
    slots = (block_table[:, :, None] * block_size + offsets).view(S, MB * block_size)
    return slots[torch.arange(MB * block_size, device=block_table.device) < seqlens[:, None]]


def choose_backend(device: torch.device, dtype: torch.dtype, block_size: int, want: str = "auto") -> str:
    """The decode attention for a cache of ``dtype`` with ``block_size``-token blocks on ``device``:
    ``want`` when it can run there (else a ValueError saying why), or for "auto" the fastest that can."""
    if want not in ATTENTION_BACKENDS:
        raise ValueError(f"rollout attention: expected one of {', '.join(ATTENTION_BACKENDS)}, got {want!r}")
    flash = (HAS_FLASH_ATTN and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
             and block_size % 256 == 0)
    triton = HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    if want == "flash" and not flash:
        raise ValueError(f"rollout attention 'flash' needs flash-attn installed, CUDA, fp16/bf16 and a block size "
                         f"that is a multiple of 256 (have: flash-attn {'yes' if HAS_FLASH_ATTN else 'no'}, "
                         f"{device.type}, {dtype}, block size {block_size})")
    if want == "triton" and not triton:
        raise ValueError(f"rollout attention 'triton' needs triton and CUDA (or TRITON_INTERPRET=1 on a CPU, "
                         f"for tests); have {device.type}, triton {'yes' if HAS_TRITON else 'no'}")
    if want != "auto":
        return want
    if flash:
        return "flash"
    return "triton" if triton and device.type == "cuda" else "torch"


@functools.cache
def triton_decode_agrees(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                         block_size: int) -> bool:
    """Whether the Triton decode kernel compiles and runs for this geometry on ``device`` and
    matches the torch path on random inputs (rows of awkward lengths); warns once if not."""
    try:
        from staged.kernels.paged_decode import SPLIT, dot_precision, paged_decode_attention

        gen = torch.Generator(device="cpu").manual_seed(0)
        # ... and a row of three splits, so that the split-KV partials and their combine run too
        lens = sorted({1, max(1, block_size - 1), block_size + 3, 3 * block_size + 5, 2 * SPLIT + 7})
        nb = sum(-(-n // block_size) for n in lens) + 1
        keys = torch.randn(nb, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
        values = torch.randn(nb, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
        q = torch.randn(len(lens), heads, head_dim, generator=gen).to(device, dtype)
        order = torch.randperm(nb, generator=gen).tolist()
        mb = max(-(-n // block_size) for n in lens)
        table, at = [], 0
        for n in lens:
            own = order[at:at + -(-n // block_size)]
            at += len(own)
            table.append(own + [order[-1]] * (mb - len(own)))
        table = torch.tensor(table, dtype=torch.int32, device=device)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        scale = head_dim ** -0.5
        got = paged_decode_attention(q, keys, values, table, seqlens, scale).float()
        if not torch.isfinite(got).all():
            raise RuntimeError("non-finite outputs")
        worst = 0.0
        for r, n in enumerate(lens):
            k = keys[table[r].long()].flatten(0, 1)[:n].float().transpose(0, 1)    # [kv, n, D]
            v = values[table[r].long()].flatten(0, 1)[:n].float().transpose(0, 1)
            want = F.scaled_dot_product_attention(q[r].float()[:, None], k, v, scale=scale,
                                                  enable_gqa=heads != kv_heads)[:, 0]
            worst = max(worst, float((got[r] - want).abs().max()))
        # half: P is rounded for the P.V dot (real error ~5e-3); tf32 dots truncate their operands
        tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 5e-3 if dot_precision(dtype) == "tf32" else 1e-3
        if not worst <= tol:
            raise RuntimeError(f"max |difference| {worst:.3g} from the torch path (tolerance {tol})")
        return True
    except Exception as exc:  # noqa: BLE001 - a fast path is never a reason for a rollout to fail
        warnings.warn(f"rollout: the Triton decode attention is unusable here ({type(exc).__name__}: "
                      f"{str(exc)[:300]}); using the torch path", RuntimeWarning, stacklevel=2)
        return False


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
    if paged.backend == "triton":
        from staged.kernels.paged_decode import paged_decode_attention

        out = paged_decode_attention(query[:, :, 0], c.keys[layer], c.values[layer], paged.block_table,
                                     paged.seqlens, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out[:, None], None
    if paged.by_length is not None:
        return _attend_by_length(query, c.keys[layer], c.values[layer], paged, scaling), None
    bt = paged.block_table.long()
    S, MB = paged.block_table.shape
    k = c.keys[layer][bt].view(S, MB * c.block_size, *c.keys[layer].shape[2:]).transpose(1, 2)
    v = c.values[layer][bt].view(S, MB * c.block_size, *c.values[layer].shape[2:]).transpose(1, 2)
    # On a CPU on one thread, as _attend_by_length: else a row's bits follow its place in the call
    with one_thread() if query.device.type == "cpu" else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=paged.mask, scale=scaling,
                                             enable_gqa=k.shape[1] != query.shape[1])
    return out.transpose(1, 2), None


@contextlib.contextmanager
def one_thread():
    """torch's intra-op threads set to 1 inside the block (restored after; ~0.2 us a switch)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _attend_by_length(query, keys, values, paged: DecodeStep, scaling):
    """Each row over exactly its own keys, no mask: its numbers then do not depend on the longest
    row beside it (SDPA's CPU kernel sums a row's keys in an order set by the key count, so padding
    to the batch's width moves the rounding: enough to flip a sampled token among 152k near-equal
    probabilities). One gather per pool for all rows; each length group attends over its slice.

    On one thread: with several, torch's CPU flash attention shares a one-query call's work out
    differently by how many (row, head) pairs it holds, and a row's output bits then follow the
    rows of its length group (measured: 2 threads, an AVX-512 EPYC, 255+ keys: 4 rows of 5 differ
    from the same rows alone). One thread costs ~25% of these calls' time (~1-2% of a step)."""
    kv = keys.shape[2:]
    k_all = keys.view(-1, *kv).index_select(0, paged.token_index)
    v_all = values.view(-1, *kv).index_select(0, paged.token_index)
    outs, at = [], 0
    with one_thread():
        for start, stop, L in paged.by_length:
            n = stop - start
            k = k_all[at:at + n * L].view(n, L, *kv).transpose(1, 2)
            v = v_all[at:at + n * L].view(n, L, *kv).transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(query[start:stop], k, v, scale=scaling,
                                                       enable_gqa=k.shape[1] != query.shape[1]))
            at += n * L
    return torch.cat(outs).transpose(1, 2)


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
