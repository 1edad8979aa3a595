"""Decode steps at static shapes, replayed as CUDA graphs.

A decode step at 7B is ~30 layers x a dozen small kernels for a handful of tokens per row: on a
GPU its launch overhead rivals its work. With static shapes the step can be captured once and
replayed (gpt-fast, vLLM and transformers' continuous batching do the same):

  rows      padded up to a bucket (1, 2, 4, ... the slot count), or with ``rows`` always to
            exactly that many (the engine's invariant_rows: a step of more live rows goes in
            several passes): the padding rows decode a dummy token into a scratch cache block and
            a scratch output row, so they never touch a real row's cache, tokens or log-probs;
  blocks    every row's block table padded with the scratch block: to the longest a row of this
            call can reach (prompt + max_new_tokens) when the attention kernel reads only each
            row's own length (flash-attn), else to a power-of-two bucket of the longest live row
            (the torch path gathers and masks every table entry, so its work follows the width);
  inputs    one int64 device buffer per shape (write slots, lengths, positions, rows, token
            index, slot index, block table), filled by one host-to-device copy before replay.

``DecodeGraphs.run`` copies the inputs of a shape in and replays its graph (captured on first
use, after one warm-up run on a side stream; all shapes in one memory pool). On a CPU, or
with graphs off, the same padded step runs eagerly (``capture=False``): that is how the padding is
tested without a GPU. A capture that fails falls back to eager for the rest of the call, with one
warning: a graph is a speed-up, never a reason for a rollout to fail.

Graphs are captured per ``generate()`` call: they hold the addresses of that call's KV pool and
output buffers.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from staged.rollout.cache import host_longs


def buckets(slots: int) -> list[int]:
    """Row counts a step is padded to: powers of two below ``slots``, then ``slots``."""
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


class DecodeGraphs:
    """Static-shape decode steps for one generate() call.

    ``step(buf, n, mb)`` runs one decode step of ``n`` rows with block tables ``mb`` wide, reading
    its inputs from the int64 device tensor ``buf`` laid out as ``pack`` writes it; it must only
    touch tensors that live as long as this object (the cache pool, the output buffers).
    ``fixed_width``: tables always ``max_blocks`` wide (one graph per row bucket). ``rows`` > 0:
    every step exactly that many rows (``pass_rows``), whatever the slot count."""

    def __init__(self, step: Callable[[torch.Tensor, int, int], None], slots: int, max_blocks: int,
                 pad_row: list[int], scratch_block: int, device: torch.device, capture: bool,
                 fixed_width: bool, rows: int = 0):
        self.step, self.max_blocks, self.device = step, max_blocks, device
        self.buckets = [rows] if rows else buckets(slots)
        self.pass_rows = rows or slots  # the most rows one step takes
        self.widths = [max_blocks] if fixed_width else buckets(max_blocks)
        self.pad_row = pad_row              # (write, seqlen, pos, row, t, slot) of a padding row
        self.scratch_block = scratch_block
        self.capture = capture and device.type == "cuda"
        self.bufs: dict[tuple[int, int], torch.Tensor] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.replays = 0
        self.captures = 0

    def shape(self, n: int, widest: int) -> tuple[int, int]:
        """(rows, table width) of the static step that runs ``n`` live rows whose longest table
        has ``widest`` blocks."""
        nb = next((b for b in self.buckets if b >= n), None)
        mb = next((w for w in self.widths if w >= widest), None)
        if nb is None or mb is None:
            raise ValueError(f"decode step of {n} rows x {widest} blocks exceeds {self.buckets[-1]} slots x "
                             f"{self.widths[-1]} blocks (this is a bug)")
        return nb, mb

    def pack(self, cols: list[list[int]], tables: list[list[int]], shape: tuple[int, int]) -> torch.Tensor:
        """The host buffer of a static step: six per-row columns, then the padded tables."""
        nb, mb = shape
        n = len(tables)
        body: list[int] = []
        for c, pad in zip(cols, self.pad_row):
            body += c + [pad] * (nb - n)
        for b in tables:
            body += b + [self.scratch_block] * (mb - len(b))
        body += [self.scratch_block] * (mb * (nb - n))
        return host_longs(body, self.device)

    def run(self, host: torch.Tensor, shape: tuple[int, int]) -> None:
        nb, mb = shape
        buf = self.bufs.get(shape)
        if buf is None:
            buf = self.bufs[shape] = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        buf.copy_(host, non_blocking=True)
        if not self.capture:
            self.step(buf, nb, mb)
            return
        g = self.graphs.get(shape)
        if g is not None:
            g.replay()
            self.replays += 1
            return
        # First step of this bucket: run it for real on a side stream (the warm-up capture needs:
        # lazy library handles, allocator state), then record it -- a capture executes nothing, so
        # recording has no effect on this step's results -- and replay it from the next step on.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.step(buf, nb, mb)
        torch.cuda.current_stream(self.device).wait_stream(side)
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.step(buf, nb, mb)
        except Exception as exc:  # noqa: BLE001 - any capture failure: eager for the rest of the call
            warnings.warn(f"rollout: CUDA graph capture of the decode step failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); decoding eagerly", RuntimeWarning, stacklevel=2)
            self.capture = False
            torch.cuda.synchronize(self.device)
            return
        self.graphs[shape] = g
        self.captures += 1
