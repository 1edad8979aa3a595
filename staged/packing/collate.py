"""Collate: samples of one rank -> packed micro-batches (host tensors + span tables).

A packed micro-batch holds its samples' token ids back to back in one row [T] (no padding
except an optional padding sample at the end, see staged.packing.spans), their vision inputs
in span order, and the span table from which the packing kernels build, on the device and
without a host sync, the input embeddings, the 4-row position ids and the shifted labels /
completion loss mask. Host work is O(samples + spans) Python plus memcpy-speed concatenation
(and, only for samples whose vision-span offsets are not given, one vectorised numpy scan of
their ids: ``find_vision_spans``).

    plan = plan_micro_batches(lengths, group_ids, token_budget, world_size)
    batches = collate_packed(samples, plan.micro_batches[rank], PackingConfig.from_model(model))
    for mb in batches:
        mb = mb.to(device, non_blocking=True)
        hidden = staged.attention.packed_forward(model, mb)       # [T, H]
        labels, loss_mask = mb.labels()                          # [T], [T]
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from staged.packing.spans import (KIND_IMAGE, KIND_VIDEO, ROPE_MODES, SpanTable,
                                  build_span_tables)


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class PackingConfig:
    """What packing needs to know about the model.

    spatial_merge_size: the vision tower's patch merge (2 for the Qwen-VL family).
    tokens_per_second: Qwen2.5-VL's temporal rope scale (vision_config.tokens_per_second).
    rope: "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" (see staged.packing.spans).
    advance: "spatial" (transformers >= 5) | "max" (transformers 4.x / vLLM).
    image_token_id, video_token_id: the placeholder ids (checked on the device by pack_embed,
        and used by find_vision_spans).
    pad_token_id: the id of padding rows.
    pad_multiple: round each micro-batch's rows up to a multiple (1 = no padding).
    """

    spatial_merge_size: int = 2
    tokens_per_second: float = 2.0
    rope: str = "qwen2_5_vl"
    advance: str = "spatial"
    image_token_id: int | None = None
    video_token_id: int | None = None
    pad_token_id: int = 0
    pad_multiple: int = 1

    def __post_init__(self):
        if self.rope not in ROPE_MODES:
            raise ValueError(f"PackingConfig.rope must be one of {sorted(ROPE_MODES)}, "
                             f"got {self.rope!r}")
        if self.spatial_merge_size < 1:
            raise ValueError(f"PackingConfig.spatial_merge_size must be >= 1, got "
                             f"{self.spatial_merge_size}")
        if self.pad_multiple < 1:
            raise ValueError(f"PackingConfig.pad_multiple must be >= 1, got {self.pad_multiple}")

    @classmethod
    def from_model(cls, model_or_config, **overrides) -> "PackingConfig":
        """From a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model or config (``model_type`` picks rope)."""
        cfg = getattr(model_or_config, "config", model_or_config)
        vision = getattr(cfg, "vision_config", None)
        text = getattr(cfg, "text_config", cfg)
        model_type = getattr(cfg, "model_type", "")
        rope = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}.get(
            model_type, "qwen3_vl" if model_type.startswith("qwen3") else "qwen2_5_vl")
        pad = getattr(text, "pad_token_id", None)
        if pad is None:
            pad = getattr(cfg, "pad_token_id", None)
        kw = dict(
            spatial_merge_size=int(getattr(vision, "spatial_merge_size", 2)),
            tokens_per_second=float(getattr(vision, "tokens_per_second", 2) or 0),
            rope=rope, image_token_id=getattr(cfg, "image_token_id", None),
            video_token_id=getattr(cfg, "video_token_id", None),
            pad_token_id=0 if pad is None else int(pad))
        kw.update(overrides)
        return cls(**kw)


@dataclass
class PackSample:
    """One sample (prompt + completion) as the rollout produced it; all host data.

    input_ids: [L] token ids with the vision placeholders already expanded (list, numpy, tensor).
    prompt_len: tokens before the completion; the loss mask covers the completion only.
    image_grid_thw, pixel_values: the processor's outputs for this sample's images ([n, 3] and
        [sum of t*h*w, D]), or None.
    video_grid_thw, pixel_values_videos, second_per_grid_ts: the same for videos.
    vision_offsets: token offset of each vision span (images and videos in token order; for
        Qwen3-VL one span per video frame), or None to find them in input_ids on the host.
    vision_kinds: KIND_IMAGE / KIND_VIDEO per offset; may be omitted when the sample has only
        images or only videos.
    """

    input_ids: Any
    prompt_len: int
    image_grid_thw: Any = None
    pixel_values: torch.Tensor | None = None
    video_grid_thw: Any = None
    pixel_values_videos: torch.Tensor | None = None
    second_per_grid_ts: Any = None
    vision_offsets: Sequence[int] | None = None
    vision_kinds: Sequence[int] | None = None


def _grid_rows(grid: Any) -> list[list[int]]:
    """[n, 3] grid (tensor, array or nested sequence) -> list of [t, h, w] int lists."""
    if grid is None:
        return []
    if hasattr(grid, "tolist"):
        return grid.tolist()
    return [[int(x) for x in r] for r in grid]


def find_vision_spans(input_ids: Any, kinds_grids: Sequence[tuple[int, int, int, int]],
                      cfg: PackingConfig, *, sample: int = 0) -> list[int]:
    """Offsets of the vision spans in a sample's host ids: one vectorised scan for the runs of
    image/video placeholder ids, then O(runs + spans) Python assigning spans to runs in order
    (a run may hold several spans, e.g. Qwen3-VL frames). ``kinds_grids``: (kind, t, h, w) of
    each span in token order within its kind. Raises ValueError naming the sample, span and
    token counts when the ids and the grids disagree."""
    ids = np.asarray(input_ids.numpy() if isinstance(input_ids, torch.Tensor) else input_ids)
    m = cfg.spatial_merge_size
    tok = {KIND_IMAGE: cfg.image_token_id, KIND_VIDEO: cfg.video_token_id}
    kind_of = np.zeros(ids.shape[0], dtype=np.int8)
    for k, t in tok.items():
        if t is not None:
            kind_of[ids == t] = k
    change = np.flatnonzero(np.diff(kind_of, prepend=0, append=0))
    # runs: [start, end) of equal non-zero kind
    runs = []
    for a, b in zip(change[:-1], change[1:]):
        if kind_of[a] != 0:
            runs.append((int(a), int(b), int(kind_of[a])))
    queues: dict[int, list[tuple[int, int]]] = {KIND_IMAGE: [], KIND_VIDEO: []}
    for j, (k, t, h, w) in enumerate(kinds_grids):
        queues[k].append((j, t * (h // m) * (w // m)))
    offsets = [0] * len(kinds_grids)
    names = {KIND_IMAGE: "image", KIND_VIDEO: "video"}
    for a, b, k in runs:
        at = a
        while at < b:
            if not queues[k]:
                raise ValueError(f"sample {sample}: {names[k]} placeholder tokens at "
                                 f"{at}..{b - 1} but no {names[k]} grid is left for them "
                                 f"({sum(1 for x in kinds_grids if x[0] == k)} {names[k]} "
                                 f"grids in all)")
            j, n = queues[k].pop(0)
            if at + n > b:
                raise ValueError(f"sample {sample}: the {names[k]} placeholder run at token {a} "
                                 f"has {b - a} tokens but span {j}'s grid {kinds_grids[j][1:]} "
                                 f"needs {n} from token {at} (spatial_merge_size {m})")
            offsets[j] = at
            at += n
    for k, q in queues.items():
        if q:
            j, n = q[0]
            raise ValueError(f"sample {sample}: {len(q)} {names[k]} grid(s) have no placeholder "
                             f"tokens (span {j} needs {n} tokens)")
    return offsets


# ---------------------------------------------------------------------------------------------
# Output


@dataclass
class PackedMicroBatch:
    """One packed micro-batch. Tensors live on one device (``to``); host ints stay host ints.

    input_ids: [T] int64; table: the SpanTable; pixel_values: [P, D] vision inputs of the
    micro-batch's vision spans in span order (images and videos alike; the Qwen-VL towers take
    both through the same patch embedding) or None; vision_grid_thw: [Nv_spans, 3] int64, the
    tower's grid per vision input, in the same order; seqlens: host list of sample lengths
    (for the attention backends that need them on the host: no device sync).
    """

    input_ids: torch.Tensor
    table: SpanTable
    pixel_values: torch.Tensor | None
    vision_grid_thw: torch.Tensor | None
    seqlens: list[int]
    config: PackingConfig = field(default_factory=PackingConfig)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def max_seqlen(self) -> int:
        return self.table.max_seqlen

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return self.table.cu_seqlens

    def to(self, device, non_blocking: bool = False) -> "PackedMicroBatch":
        mv = lambda x: None if x is None else x.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, input_ids=mv(self.input_ids),
                       table=self.table.to(device, non_blocking), pixel_values=mv(self.pixel_values), vision_grid_thw=mv(self.vision_grid_thw))

    # The device-side products (Triton kernels; no host sync).
    def position_ids(self) -> torch.Tensor:
        """[4, T] int64: row 0 per-sample arange, rows 1-3 mrope."""
        from staged.kernels.packing import packed_position_ids

        t = self.table
        return packed_position_ids(t.spans, t.time_scale, t.cu_seqlens, t.num_rows)

    def labels(self, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted labels [T] int64 and the completion loss mask [T] bool."""
        from staged.kernels.packing import packed_labels

        return packed_labels(self.input_ids, self.table.cu_seqlens, self.table.prompt_lens,
                             ignore_index=ignore_index)

    def embed(self, weight: torch.Tensor, vision: torch.Tensor | None,
              padding_idx: int | None = None) -> torch.Tensor:
        """[T, H] packed input embeddings: text rows from ``weight``, vision rows from
        ``vision`` (the micro-batch's vision features in span order)."""
        from staged.kernels.packing import pack_embed

        return pack_embed(self.input_ids, weight, vision, self.table.spans,
                          num_vision_rows=self.table.num_vision_rows,
                          image_token_id=self.config.image_token_id,
                          video_token_id=self.config.video_token_id, padding_idx=padding_idx)


def _ids_tensor(ids: Any) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).to(torch.int64)
    if isinstance(ids, np.ndarray):
        return torch.from_numpy(ids.reshape(-1).astype(np.int64, copy=False))
    return torch.tensor(ids, dtype=torch.int64)


def _sample_spans(i: int, s: PackSample, ids: torch.Tensor, cfg: PackingConfig) -> list[tuple]:
    """One sample's vision spans in token order: (offset, kind, (t, h, w), seconds, first pixel
    row, pixel rows, tower grid). Videos are split per frame for Qwen3-VL."""
    qwen3 = cfg.rope == "qwen3_vl"
    img = [tuple(g) for g in _grid_rows(s.image_grid_thw)]
    vid = [tuple(g) for g in _grid_rows(s.video_grid_thw)]
    secs = [] if s.second_per_grid_ts is None else \
        [float(x) for x in (s.second_per_grid_ts.tolist()
                            if hasattr(s.second_per_grid_ts, "tolist") else s.second_per_grid_ts)]
    if vid and secs and len(secs) != len(vid):
        raise ValueError(f"sample {i}: {len(vid)} videos but {len(secs)} second_per_grid_ts values")
    per_kind = {KIND_IMAGE: [], KIND_VIDEO: []}
    row = 0
    for (t, h, w) in img:
        per_kind[KIND_IMAGE].append(((t, h, w), 1.0, row, t * h * w, (t, h, w)))
        row += t * h * w
    row = 0
    for v, (t, h, w) in enumerate(vid):
        sec = secs[v] if secs else 1.0
        if qwen3:
            for f in range(t):
                per_kind[KIND_VIDEO].append(((1, h, w), sec, row + f * h * w, h * w, (1, h, w)))
        else:
            per_kind[KIND_VIDEO].append(((t, h, w), sec, row, t * h * w, (t, h, w)))
        row += t * h * w
    n_img, n_vid = len(per_kind[KIND_IMAGE]), len(per_kind[KIND_VIDEO])
    for name, src, need in (("pixel_values", s.pixel_values, sum(t * h * w for t, h, w in img)),
                            ("pixel_values_videos", s.pixel_values_videos,
                             sum(t * h * w for t, h, w in vid))):
        if src is not None and src.shape[0] != need:
            raise ValueError(f"sample {i}: its grids hold {need} patches but {name} has "
                             f"{src.shape[0]} rows")
    if s.vision_offsets is not None:
        offs = [int(x) for x in s.vision_offsets]
        if s.vision_kinds is not None:
            ks = [int(x) for x in s.vision_kinds]
        elif n_vid == 0 or n_img == 0:
            ks = [KIND_IMAGE if n_vid == 0 else KIND_VIDEO] * len(offs)
        else:
            raise ValueError(f"sample {i} has images and videos: give vision_kinds with "
                             f"vision_offsets")
        if len(offs) != n_img + n_vid or len(ks) != len(offs) or ks.count(KIND_IMAGE) != n_img:
            raise ValueError(f"sample {i}: {len(offs)} vision offsets / {len(ks)} kinds for "
                             f"{n_img} image and {n_vid} video spans")
        order = list(zip(offs, ks))
    else:
        spans_kg = [(KIND_IMAGE, *x[0]) for x in per_kind[KIND_IMAGE]] + \
                   [(KIND_VIDEO, *x[0]) for x in per_kind[KIND_VIDEO]]
        found = find_vision_spans(ids.numpy(), spans_kg, cfg, sample=i) if spans_kg else []
        order = sorted(zip(found, [k for k, *_ in spans_kg]))
    taken = {KIND_IMAGE: 0, KIND_VIDEO: 0}
    out = []
    for off, k in order:
        grid, sec, prow, nrows, tower = per_kind[k][taken[k]]
        taken[k] += 1
        out.append((off, k, grid, sec, prow, nrows, tower))
    return out


def collate_packed(samples: Sequence[PackSample], micro_batches: Sequence[Sequence[int]],
                   cfg: PackingConfig = PackingConfig(), *, with_pixels: bool = True,
                   backend: str = "auto") -> list[PackedMicroBatch]:
    """Pack ``samples`` into the given micro-batches (lists of indices into ``samples``, e.g.
    ``plan.micro_batches[rank]``; ``[]`` becomes one padding token). Host tensors out; call
    ``.to(device)`` on each. ``with_pixels=False`` skips gathering pixel values (when the vision
    features come from elsewhere, or to time the metadata alone)."""
    m = cfg.spatial_merge_size
    seq_lens, prompt_lens, ptr = [], [], [0]
    offsets, kinds, grids, seconds = [], [], [], []
    any_seconds = False
    # Per vision span: (sample, kind, first pixel row, pixel rows, tower grid).
    pixel_src: list[tuple[int, int, int, int, tuple[int, int, int]]] = []
    ids_t: list[torch.Tensor] = []
    for i, s in enumerate(samples):
        ids = s.input_ids
        if not (isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.dim() == 1):
            ids = _ids_tensor(ids)
        ids_t.append(ids)
        seq_lens.append(ids.shape[0])
        prompt_lens.append(s.prompt_len)
        if s.image_grid_thw is None and s.video_grid_thw is None:  # text only
            ptr.append(len(offsets))
            continue
        if s.video_grid_thw is None and s.vision_offsets is not None and s.vision_kinds is None:
            # Fast path (images with known offsets, the common case): no per-span tuples.
            img = _grid_rows(s.image_grid_thw)
            offs = s.vision_offsets.tolist() if hasattr(s.vision_offsets, "tolist") \
                else s.vision_offsets
            if len(offs) != len(img):
                raise ValueError(f"sample {i}: {len(offs)} vision offsets for {len(img)} image "
                                 f"spans")
            row = 0
            for off, g in zip(offs, img):
                t, h, w = g
                offsets.append(off)
                kinds.append(KIND_IMAGE)
                grids.extend(g)
                seconds.append(1.0)
                pixel_src.append((i, KIND_IMAGE, row, t * h * w, g))
                row += t * h * w
            if s.pixel_values is not None and s.pixel_values.shape[0] != row:
                raise ValueError(f"sample {i}: its grids hold {row} patches but pixel_values "
                                 f"has {s.pixel_values.shape[0]} rows")
            ptr.append(len(offsets))
            continue
        for off, k, grid, sec, prow, nrows, tower in _sample_spans(i, s, ids, cfg):
            any_seconds |= k == KIND_VIDEO and s.second_per_grid_ts is not None
            offsets.append(off)
            kinds.append(k)
            grids.extend(grid)
            seconds.append(sec)
            pixel_src.append((i, k, prow, nrows, tower))
        ptr.append(len(offsets))

    tables = build_span_tables(
        micro_batches, seq_lens, prompt_lens, vision_ptr=ptr, vision_offsets=offsets,
        vision_kinds=kinds, vision_grids=grids, vision_seconds=seconds if any_seconds else None,
        spatial_merge_size=m, tokens_per_second=cfg.tokens_per_second, rope=cfg.rope,
        advance=cfg.advance, pad_multiple=cfg.pad_multiple, backend=backend)

    out = []
    for mb, table in zip(micro_batches, tables):
        parts = [ids_t[i] for i in mb]
        real = sum(seq_lens[i] for i in mb)
        if table.num_rows > real:
            parts.append(torch.full((table.num_rows - real,), cfg.pad_token_id, dtype=torch.int64))
        input_ids = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        pixels = grid_thw = None
        vspans = table.vision_spans.tolist()
        if vspans:
            grid_thw = torch.tensor([pixel_src[j][4] for j in vspans], dtype=torch.int64)
            if with_pixels:
                chunks = []
                for j in vspans:
                    i, k, prow, nrows, _ = pixel_src[j]
                    src = samples[i].pixel_values if k == KIND_IMAGE else \
                        samples[i].pixel_values_videos
                    if src is None:
                        raise ValueError(f"sample {i} has {'image' if k == KIND_IMAGE else 'video'}"
                                         f" spans but no pixel values")
                    if prow + nrows > src.shape[0]:
                        raise ValueError(f"sample {i}: its grids need {prow + nrows} pixel rows "
                                         f"but its pixel values have {src.shape[0]}")
                    chunks.append(src[prow:prow + nrows])
                pixels = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        out.append(PackedMicroBatch(input_ids=input_ids, table=table, pixel_values=pixels,
                                    vision_grid_thw=grid_thw, seqlens=table.seqlens(), config=cfg))
    return out
