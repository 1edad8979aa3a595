"""The paged KV cache: one preallocated pool of fixed-size blocks per layer, a block table per
row, blocks shared by reference and returned to the pool when their last user finishes.

  keys[l], values[l]  [num_blocks, block_size, kv_heads, head_dim]  (the layout flash-attn's
                      paged ``flash_attn_with_kvcache`` reads; the torch path gathers from it)

Tokens are written in place (``write``), never concatenated. A prompt's full blocks are shared
by its G rows; its last, partly filled block is copied into each row's first own block when the
row is admitted (copy on write: the rows' next tokens land in different blocks). The pool is
sized from a token budget, not from rows x max length; the scheduler (staged.rollout.engine)
admits a row only when the blocks it can still need are free, so decoding never runs out.

Block bookkeeping is host-side Python (ints and lists): the host knows every row's length
without asking the device, so allocation needs no sync.
"""
from __future__ import annotations

import torch


def host_longs(values: list[int], device) -> torch.Tensor:
    """``values`` as a host int64 tensor for a copy to ``device``: pinned where that is CUDA, so
    that ``.to(device, non_blocking=True)`` is asynchronous (from pageable memory it waits)."""
    host = torch.tensor(values, dtype=torch.long)
    return host.pin_memory() if torch.device(device).type == "cuda" else host


class KVCacheTooSmall(ValueError):
    """The KV-cache budget cannot hold one row (its prompt and max_new_tokens): a setting to raise,
    so the trainer prints it as one message, without a traceback (``staged.parallel.fail``)."""

    one_message = True


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def own_blocks(prompt_len: int, max_new: int, block_size: int) -> int:
    """Blocks a row owns at most: its prompt's partial last block (copied on write into the row's
    first own block) and up to ``max_new`` tokens after it."""
    return blocks_for(prompt_len % block_size + max_new, block_size)


def row_blocks(prompt_len: int, max_new: int, block_size: int) -> int:
    """Blocks one row needs at most, alone in the cache: its prompt's and its own."""
    return blocks_for(prompt_len, block_size) + own_blocks(prompt_len, max_new, block_size)


class BlockPool:
    """Free list and reference counts of ``num_blocks`` blocks (host ints)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"KV cache: {n} blocks asked, {len(self.free)} free (the scheduler's reservation "
                               f"should have prevented this)")
        out = [self.free.pop() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)
            elif self.refs[b] < 0:
                raise RuntimeError(f"KV cache: block {b} released more often than taken")


class PagedKVCache:
    """K and V pools of every decoder layer, and the block pool that hands their blocks out."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        # One block past the pool's: the scratch block that static-shape decode steps' padding
        # rows write into (staged.rollout.graphs); never handed out.
        shape = (num_blocks + 1, block_size, kv_heads, head_dim)
        self.scratch_block = num_blocks
        # Zeros, not empty: the torch path reads whole blocks and masks the scores of unused slots,
        # but a NaN in uninitialised memory would survive as 0 * NaN in the weighted sum of V.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size, self.pool = block_size, BlockPool(num_blocks)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def prompt_slots(self, blocks: list[int], n: int, device) -> torch.Tensor:
        """[n] int64: block * block_size + offset of a prompt's n tokens in ``blocks`` (in order);
        built once per prompt, one host-to-device copy for all its layers."""
        bs = self.block_size
        return host_longs([blocks[t // bs] * bs + t % bs for t in range(n)], device).to(device, non_blocking=True)

    def copy_block(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` tokens of block ``src`` into ``dst`` in every layer (copy on write)."""
        for k, v in zip(self.keys, self.values):
            k[dst, :n] = k[src, :n]
            v[dst, :n] = v[src, :n]

    def write_token(self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens at ``slot`` [S] = block * block_size + offset; k, v [S, kv_heads, head_dim]:
        one token per decode row, or a prompt's tokens at its ``prompt_slots``."""
        self.keys[layer].view(-1, *k.shape[1:]).index_copy_(0, slot, k)
        self.values[layer].view(-1, *v.shape[1:]).index_copy_(0, slot, v)
