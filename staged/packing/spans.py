"""Span tables: what the packing kernels need to know about a packed micro-batch, built on the host.

A packed micro-batch concatenates the token rows of its samples, [T] in all. Each sample is cut
into **spans**: maximal runs of text tokens, and vision spans (one image, one video, or for
Qwen3-VL one video frame) whose tokens are replaced by rows of the vision encoder's output. The
span table is built here from sizes the host already knows at collate time -- each sample's
length and prompt length, and for each vision span its token offset in the sample and its patch
grid (t, h, w) -- never from token values on the device. The packing kernels
(``staged.kernels.packing``) find a row's span by binary search over the span table and derive
everything else (embedding source, 4-row position ids, shifted labels) from it.

Per micro-batch (``SpanTable``; B samples, S spans, T rows):

    spans        int64 [S, 9]  one row per span, in row order; columns SPAN_* below:
                   SAMPLE  slot of the sample in the micro-batch (0..B-1)
                   KIND    KIND_TEXT / KIND_IMAGE / KIND_VIDEO
                   ROW     first packed row;  LEN rows
                   POS     mrope position base (``current_pos`` of transformers' get_rope_index)
                   T, H, W the span's LLM grid: (t, h / merge, w / merge); 0 for text
                   VROW    first row in the micro-batch's vision features; -1 for text
    time_scale   float32 [S]   temporal position step (tokens_per_second * seconds_per_grid for
                               Qwen2.5-VL videos, 1.0 otherwise); t positions are
                               POS + trunc(float32(i) * time_scale), computed in float32
                               exactly as transformers computes them from a float32 tensor
    cu_seqlens   int32 [B+1]   sample boundaries (flash-attn's varlen convention)
    max_seqlen   int           longest sample
    sample_index int64 [B]     the global sample index of each slot; -1 for padding
    prompt_lens  int32 [B]     tokens before the completion (the loss mask starts there)
    rope_deltas  int64 [B]     max mrope position + 1 - length (get_rope_index's second output)
    vision_spans int64 [V]     the global vision-span ids, in the order of the micro-batch's
                               vision feature rows (run the vision tower on them in this order)
    num_rows T, num_vision_rows

mrope positions (transformers 5.x ``get_rope_index`` for Qwen2-VL / Qwen2.5-VL / Qwen3-VL,
pinned here and tested against it): ``pos`` starts at 0 in each sample; a text span of L tokens
gets pos..pos+L-1 on all three rows and advances pos by L; a vision span with LLM grid (t, h, w)
gets rows (pos + trunc(i_t * scale), pos + i_h, pos + i_w) in (t, h, w) raster order and
advances pos by max(h, w) (``advance="spatial"``, transformers >= 5) or to the largest position
so far + 1 (``advance="max"``: transformers 4.x, vLLM and the original Qwen code; the two differ
only for videos whose scaled time exceeds their spatial size). Row 0 of the 4-row position ids
is the per-sample arange (what transformers uses to build packed masks and flash-attn's
position ids). Known version differences: transformers 5.17 truncates ``second_per_grid_ts`` to
an integer before scaling (5.2x does not); both agree for whole seconds.

Padding: an empty micro-batch (the planner pads ranks with ``[]``) becomes one padding sample of
one token, and with ``pad_multiple`` > 1 the rows are rounded up to a multiple by one padding
sample: padding samples are text, have sample_index -1 and no loss (prompt_len = length).

Two implementations give IDENTICAL output and identical ``ValueError`` messages: the C++
``staged._C.build_span_tables`` (used when built) and ``build_python`` below, its line-by-line
twin (used when the extension is missing or ``STAGED_NO_EXT=1``). Change one, change the other:
tests/packing/test_spans.py compares them. Cost: O(samples + spans) on the host, no per-token
work; the outputs are bytearrays wrapped zero-copy by ``torch.frombuffer``.
"""
from __future__ import annotations

import operator
import struct
from array import array
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from staged.packing.extension import load_native

# Span-table columns and kinds (shared with csrc/span_table.cpp and the kernels).
SPAN_SAMPLE, SPAN_KIND, SPAN_ROW, SPAN_LEN, SPAN_POS, SPAN_T, SPAN_H, SPAN_W, SPAN_VROW = range(9)
SPAN_FIELDS = 9
KIND_TEXT, KIND_IMAGE, KIND_VIDEO = 0, 1, 2

ROPE_MODES = {"qwen2_vl": 0, "qwen2_5_vl": 1, "qwen3_vl": 2}
ADVANCE_MODES = {"spatial": 0, "max": 1}

MAX_COUNT = 2**31 - 1  # tokens per sample, rows per micro-batch (cu_seqlens is int32), grid sizes
MAX_RATE = 1e6  # tokens_per_second and seconds per grid step: float32 products stay finite


# ---------------------------------------------------------------------------------------------
# Backends


_build_cpp, _EXT_MISSING_REASON = load_native("build_span_tables")
HAS_EXT: bool = _build_cpp is not None


def backend_name() -> str:
    """The backend ``backend="auto"`` uses: "cpp" when staged._C is usable, else "python"."""
    return "cpp" if HAS_EXT else "python"


# ---------------------------------------------------------------------------------------------
# The pure-Python twin of csrc/span_table.cpp: same steps, same order, same messages.

_F32 = struct.Struct("f")


def f32(x: float) -> float:
    """Round a double to the nearest float32 (IEEE round-to-nearest-even), as a C++ cast does."""
    return _F32.unpack(_F32.pack(x))[0]


def _as_float(x: Any) -> float:
    """float(x) as CPython's PyFloat_AsDouble reads it (no parsing of strings)."""
    if isinstance(x, (str, bytes, bytearray)):
        raise TypeError(f"must be real number, not {type(x).__name__}")
    return float(x)


def scaled_time(i: int, scale: float) -> int:
    """trunc(float32(i) * scale) in float32 arithmetic: the product of two float32 values is exact
    in a double, so one rounding to float32 gives the correctly rounded float32 product."""
    return int(f32(f32(float(i)) * scale))


def build_python(micro_batches: Sequence[Sequence[int]], seq_lens: Sequence[int],
                 prompt_lens: Sequence[int], vision_ptr: Sequence[int],
                 vision_offsets: Sequence[int], vision_kinds: Sequence[int],
                 vision_grids: Sequence[int], vision_seconds: Sequence[float] | None,
                 spatial_merge_size: int, tokens_per_second: float, rope: int, advance: int,
                 pad_multiple: int) -> list[tuple]:
    """Same arguments and result as ``staged._C.build_span_tables`` (see ``build_span_tables``)."""
    m = operator.index(spatial_merge_size)
    if not 1 <= m <= MAX_COUNT:
        raise ValueError(f"spatial_merge_size must be in [1, {MAX_COUNT}], got {m}")
    tps = _as_float(tokens_per_second)
    if not 0.0 <= tps <= MAX_RATE:
        raise ValueError(f"tokens_per_second must be a finite number in [0, 1e6], got {tps!r}")
    rope = operator.index(rope)
    if rope not in (0, 1, 2):
        raise ValueError(f"rope must be 0 (qwen2_vl), 1 (qwen2_5_vl) or 2 (qwen3_vl), got {rope}")
    advance = operator.index(advance)
    if advance not in (0, 1):
        raise ValueError(f"advance must be 0 (spatial) or 1 (max), got {advance}")
    pad = operator.index(pad_multiple)
    if not 1 <= pad <= MAX_COUNT:
        raise ValueError(f"pad_multiple must be in [1, {MAX_COUNT}], got {pad}")

    seq_lens = tuple(seq_lens)
    prompt_lens = tuple(prompt_lens)
    vision_ptr = tuple(vision_ptr)
    vision_offsets = tuple(vision_offsets)
    vision_kinds = tuple(vision_kinds)
    vision_grids = tuple(vision_grids)
    n = len(seq_lens)
    V = len(vision_offsets)
    if len(prompt_lens) != n:
        raise ValueError(f"prompt_lens has {len(prompt_lens)} entries but seq_lens has {n}")
    if len(vision_ptr) != n + 1:
        raise ValueError(f"vision_ptr has {len(vision_ptr)} entries but needs len(seq_lens) + 1 "
                         f"= {n + 1} (CSR offsets into the vision spans)")
    if len(vision_kinds) != V:
        raise ValueError(f"vision_kinds has {len(vision_kinds)} entries but vision_offsets has {V}")
    if len(vision_grids) != 3 * V:
        raise ValueError(f"vision_grids has {len(vision_grids)} entries but needs 3 * {V} = "
                         f"{3 * V} (t, h, w per vision span)")
    if vision_seconds is not None:
        vision_seconds = tuple(vision_seconds)
        if len(vision_seconds) != V:
            raise ValueError(f"vision_seconds has {len(vision_seconds)} entries but "
                             f"vision_offsets has {V}")
    tps32 = f32(tps)

    # Per sample, in index order: length, prompt length, its vision spans.
    length = [0] * n
    prompt = [0] * n
    ptr = [0] * (n + 1)
    v_off = [0] * V
    v_kind = [0] * V
    v_t = [0] * V
    v_h = [0] * V
    v_w = [0] * V
    v_scale = [1.0] * V
    p = operator.index(vision_ptr[0])
    if p != 0:
        raise ValueError(f"vision_ptr[0] must be 0, got {p}")
    for i in range(n):
        L = operator.index(seq_lens[i])
        if not 0 <= L <= MAX_COUNT:
            raise ValueError(f"seq_lens[{i}] is {L}: token counts must be in [0, {MAX_COUNT}]")
        P = operator.index(prompt_lens[i])
        if not 0 <= P <= L:
            raise ValueError(f"prompt_lens[{i}] is {P} but sample {i} has {L} tokens")
        length[i] = L
        prompt[i] = P
        end = operator.index(vision_ptr[i + 1])
        if not ptr[i] <= end <= V:
            raise ValueError(f"vision_ptr[{i + 1}] is {end}: must be in [vision_ptr[{i}] = "
                             f"{ptr[i]}, {V}]")
        ptr[i + 1] = end
        previous_end = 0
        for j in range(ptr[i], end):
            o = operator.index(vision_offsets[j])
            k = operator.index(vision_kinds[j])
            t = operator.index(vision_grids[3 * j])
            h = operator.index(vision_grids[3 * j + 1])
            w = operator.index(vision_grids[3 * j + 2])
            if k != KIND_IMAGE and k != KIND_VIDEO:
                raise ValueError(f"vision span {j} (sample {i}) has kind {k}: must be 1 (image) "
                                 f"or 2 (video)")
            if not (1 <= t <= MAX_COUNT and 1 <= h <= MAX_COUNT and 1 <= w <= MAX_COUNT
                    and h % m == 0 and w % m == 0):
                raise ValueError(f"vision span {j} (sample {i}) has grid ({t}, {h}, {w}): sizes "
                                 f"must be in [1, {MAX_COUNT}] and h, w divisible by "
                                 f"spatial_merge_size={m}")
            if rope == 2 and k == KIND_VIDEO and t != 1:
                raise ValueError(f"vision span {j} (sample {i}): qwen3_vl video spans are single "
                                 f"frames (t=1, one span per frame between timestamp tokens), "
                                 f"got t={t}")
            if o < previous_end:
                raise ValueError(f"vision span {j} (sample {i}) starts at offset {o}, before the "
                                 f"end of the previous vision span or the sample start "
                                 f"({previous_end})")
            th = t * (h // m)
            if o > L or th > L - o or th * (w // m) > L - o:
                raise ValueError(f"vision span {j} (sample {i}) at offset {o} with grid ({t}, "
                                 f"{h}, {w}) does not fit in the sample's {L} tokens")
            scale = 1.0
            if vision_seconds is not None:
                s = _as_float(vision_seconds[j])
                if not 0.0 <= s <= MAX_RATE:
                    raise ValueError(f"vision_seconds[{j}] is {s!r}: must be a finite number in "
                                     f"[0, 1e6]")
                if rope == 1 and k == KIND_VIDEO:
                    scale = f32(tps32 * f32(s))
            elif rope == 1 and k == KIND_VIDEO:
                scale = tps32
            last = f32(f32(float(t - 1)) * scale)
            if last > MAX_COUNT:
                raise ValueError(f"vision span {j} (sample {i}): its last time position offset "
                                 f"{int(last)} exceeds {MAX_COUNT}")
            previous_end = o + th * (w // m)
            v_off[j], v_kind[j], v_t[j], v_h[j], v_w[j], v_scale[j] = o, k, t, h // m, w // m, scale

    # Micro-batches: indices in range, each sample at most once.
    seen = bytearray(n)
    for b, mb in enumerate(micro_batches):
        for x in mb:
            i = operator.index(x)
            if not 0 <= i < n:
                raise ValueError(f"micro_batches[{b}] holds sample {i}, but there are only {n} "
                                 f"samples")
            if seen[i]:
                raise ValueError(f"sample {i} appears twice (again in micro_batches[{b}])")
            seen[i] = 1

    out = []
    for b, mb in enumerate(micro_batches):
        spans = array("q")
        scales = array("f")
        cu = array("i", [0])
        index = array("q")
        prompts = array("i")
        deltas = array("q")
        vspans = array("q")
        row = 0
        vrow = 0
        max_len = 0
        for slot, x in enumerate(mb):
            i = operator.index(x)
            L = length[i]
            if row + L > MAX_COUNT:
                raise ValueError(f"micro_batches[{b}] holds more than {MAX_COUNT} tokens: "
                                 f"cu_seqlens is int32")
            pos = 0
            top = -1  # largest position so far
            cursor = 0  # token offset in the sample
            for j in range(ptr[i], ptr[i + 1]):
                o = v_off[j]
                if o > cursor:  # the text before this vision span
                    spans.extend((slot, KIND_TEXT, row + cursor, o - cursor, pos, 0, 0, 0, -1))
                    scales.append(1.0)
                    pos += o - cursor
                    top = max(top, pos - 1)
                t, h, w = v_t[j], v_h[j], v_w[j]
                n_rows = t * h * w
                spans.extend((slot, v_kind[j], row + o, n_rows, pos, t, h, w, vrow))
                scales.append(v_scale[j])
                vspans.append(j)
                vrow += n_rows
                last = max(pos + scaled_time(t - 1, v_scale[j]), pos + h - 1, pos + w - 1)
                top = max(top, last)
                pos = pos + max(h, w) if advance == 0 else top + 1
                cursor = o + n_rows
            if L > cursor:  # the text after the last vision span
                spans.extend((slot, KIND_TEXT, row + cursor, L - cursor, pos, 0, 0, 0, -1))
                scales.append(1.0)
                top = max(top, pos + L - cursor - 1)
            row += L
            cu.append(row)
            index.append(i)
            prompts.append(prompt[i])
            deltas.append(top + 1 - L if L > 0 else 0)
            max_len = max(max_len, L)
        target = (max(row, 1) + pad - 1) // pad * pad
        if target > MAX_COUNT:
            raise ValueError(f"micro_batches[{b}] holds more than {MAX_COUNT} tokens: "
                             f"cu_seqlens is int32")
        if target > row:  # one padding sample: text, no loss, its own attention sequence
            L = target - row
            spans.extend((len(index), KIND_TEXT, row, L, 0, 0, 0, 0, -1))
            scales.append(1.0)
            row = target
            cu.append(row)
            index.append(-1)
            prompts.append(L)
            deltas.append(0)
            max_len = max(max_len, L)
        out.append((bytearray(spans), bytearray(scales), bytearray(cu), bytearray(index),
                    bytearray(prompts), bytearray(deltas), bytearray(vspans), row, max_len, vrow))
    return out


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class SpanTable:
    """The host-side description of one packed micro-batch (see the module docstring).
    Tensors are CPU tensors sharing memory with the builder's buffers; ``to(device)`` copies."""

    spans: torch.Tensor         # int64 [S, 9]
    time_scale: torch.Tensor    # float32 [S]
    cu_seqlens: torch.Tensor    # int32 [B+1]
    sample_index: torch.Tensor  # int64 [B], -1 = padding
    prompt_lens: torch.Tensor   # int32 [B]
    rope_deltas: torch.Tensor   # int64 [B]
    vision_spans: torch.Tensor  # int64 [V]
    num_rows: int
    max_seqlen: int
    num_vision_rows: int

    @property
    def num_spans(self) -> int:
        return self.spans.shape[0]

    @property
    def num_samples(self) -> int:
        return self.sample_index.shape[0]

    def seqlens(self) -> list[int]:
        """Host list of sample lengths (no device sync: this table lives on the host)."""
        cu = self.cu_seqlens.tolist()
        return [b - a for a, b in zip(cu, cu[1:])]

    def to(self, device, non_blocking: bool = False) -> "SpanTable":
        mv = lambda x: x.to(device, non_blocking=non_blocking)  # noqa: E731
        return SpanTable(mv(self.spans), mv(self.time_scale), mv(self.cu_seqlens),
                         mv(self.sample_index), mv(self.prompt_lens), mv(self.rope_deltas),
                         mv(self.vision_spans), self.num_rows, self.max_seqlen,
                         self.num_vision_rows)


def _tensor(buf: bytearray, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    if len(buf) == 0:
        return torch.empty(shape if shape else (0,), dtype=dtype)
    t = torch.frombuffer(buf, dtype=dtype)
    return t.view(*shape) if shape else t


def wrap(raw: tuple) -> SpanTable:
    """A raw builder tuple -> SpanTable (zero-copy)."""
    spans, scales, cu, index, prompts, deltas, vspans, rows, max_len, vrows = raw
    return SpanTable(
        spans=_tensor(spans, torch.int64, len(spans) // (8 * SPAN_FIELDS), SPAN_FIELDS),
        time_scale=_tensor(scales, torch.float32), cu_seqlens=_tensor(cu, torch.int32),
        sample_index=_tensor(index, torch.int64), prompt_lens=_tensor(prompts, torch.int32),
        rope_deltas=_tensor(deltas, torch.int64), vision_spans=_tensor(vspans, torch.int64),
        num_rows=rows, max_seqlen=max_len, num_vision_rows=vrows)


def _as_list(values: Any) -> list:
    """A list: numpy arrays and tensors through .tolist() (Python ints, fast), others list()."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def build_span_tables(micro_batches: Sequence[Sequence[int]], seq_lens: Sequence[int],
                      prompt_lens: Sequence[int], *, vision_ptr: Sequence[int] | None = None,
                      vision_offsets: Sequence[int] = (), vision_kinds: Sequence[int] = (),
                      vision_grids: Any = (), vision_seconds: Sequence[float] | None = None,
                      spatial_merge_size: int = 2, tokens_per_second: float = 2.0,
                      rope: str = "qwen2_5_vl", advance: str = "spatial", pad_multiple: int = 1,
                      backend: str = "auto") -> list[SpanTable]:
    """Span tables for the micro-batches of one rank (``plan.micro_batches[rank]``).

    micro_batches: lists of sample indices (``[]`` becomes one padding token).
    seq_lens, prompt_lens: per sample, tokens in all and tokens before the completion.
    vision_ptr: CSR offsets [n+1] into the vision-span arrays (None: no vision spans); the
        spans of sample i are vision_ptr[i]..vision_ptr[i+1]-1, in token order, with
    vision_offsets: the span's first token in its sample; vision_kinds: KIND_IMAGE/KIND_VIDEO;
    vision_grids: (t, h, w) patch grid per span (image_grid_thw / video_grid_thw rows; [V, 3]
        or flat); vision_seconds: seconds per temporal grid step (Qwen2.5-VL's
        ``second_per_grid_ts``; None = 1.0).
    spatial_merge_size, tokens_per_second: from the vision config.
    rope: "qwen2_vl" (no time scale), "qwen2_5_vl" (videos scaled by tokens_per_second *
        seconds), "qwen3_vl" (videos as one span per frame, t=1).
    advance: "spatial" (transformers >= 5) or "max" (transformers 4.x / vLLM), see above.
    pad_multiple: round each micro-batch's rows up to a multiple (one padding sample).
    backend: "auto" | "cpp" | "python" (as ``plan_micro_batches``).
    Raises ValueError with the numbers for inconsistent sizes (a vision span that does not fit
    its sample, overlapping spans, grids not divisible by the merge size, ...).
    """
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'python', got {backend!r}")
    if backend == "cpp" and not HAS_EXT:
        raise RuntimeError(f"backend='cpp' but the C++ span builder is unavailable: "
                           f"{_EXT_MISSING_REASON}")
    if rope not in ROPE_MODES:
        raise ValueError(f"rope must be one of {sorted(ROPE_MODES)}, got {rope!r}")
    if advance not in ADVANCE_MODES:
        raise ValueError(f"advance must be one of {sorted(ADVANCE_MODES)}, got {advance!r}")
    use_cpp = backend == "cpp" or (backend == "auto" and HAS_EXT)
    fn = _build_cpp if use_cpp else build_python
    seq_lens = _as_list(seq_lens)
    if vision_ptr is None:
        vision_ptr = [0] * (len(seq_lens) + 1)
    grids = vision_grids.reshape(-1) if hasattr(vision_grids, "reshape") else vision_grids
    grids = _as_list(grids)
    if grids and isinstance(grids[0], (list, tuple)):
        grids = [x for g in grids for x in g]
    raw = fn([_as_list(mb) for mb in micro_batches], seq_lens, _as_list(prompt_lens),
             _as_list(vision_ptr), _as_list(vision_offsets), _as_list(vision_kinds), grids,
             None if vision_seconds is None else _as_list(vision_seconds),
             spatial_merge_size, float(tokens_per_second), ROPE_MODES[rope],
             ADVANCE_MODES[advance], pad_multiple)
    return [wrap(r) for r in raw]
