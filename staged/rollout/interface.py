"""What every rollout engine shares: ``SamplingParams`` in, ``Rollout`` out, and the batch
plumbing (position ids, row selection, model inputs).

Position ids are computed once, on the host copy of the prompt batch (mrope for Qwen-VL: 3 rows
-- temporal, height, width -- that differ on image tokens), and the trainer reuses them for the
policy and reference forwards, so sampling and training see the same positions.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from staged.config import check_engine_settings
from staged.models.loading import base_model

# ------------------------------------------------------------------------------------------
# interface


GREEDY_HINT = "temperature=1e-6"  # staged.eval.GREEDY_TEMPERATURE


@dataclass
class SamplingParams:
    """What the engine needs to know (built from a stage's GRPOConfig)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    check_every: int = 8
    """Decode steps between looks at which rows finished (a host sync on CUDA; on a CPU the
    engine looks every step, which costs nothing there)."""
    batch_size: int = 0
    """Decode slots: rows decoded at once; a finished row's slot takes the next pending row
    (engine "paged"), or rows per decode loop (engine "simple"). 0 = all rows at once."""
    suppress_token_ids: tuple[int, ...] = ()
    """Never sampled: vision placeholders (an <|image_pad|> in a completion would break the
    training forward's image-feature scatter) and vocabulary rows the tokenizer does not use."""
    engine: str = "paged"
    """"paged": shared-prefix prefill, paged KV cache, continuous batching (staged.rollout.engine);
    "simple": the plain decode loop over transformers' DynamicCache (staged.rollout.simple)."""
    block_size: int = 0
    """Tokens per KV-cache block; 0 = 256 with flash-attn on CUDA (its paged kernel's unit), else 16."""
    attention: str = "auto"
    """Engine "paged", decode attention: "flash" | "triton" | "torch" | "auto" (flash where
    installed, else triton on CUDA, torch on a CPU); staged.rollout.paged_attention."""
    kv_cache_tokens: int = 0
    """KV-cache capacity in tokens (all layers); 0 = from kv_cache_memory_fraction on CUDA, or
    what the step's rows can need at most on a CPU (capped at 4 GiB)."""
    kv_cache_memory_fraction: float = 0.3
    """On CUDA with kv_cache_tokens = 0: the share of free device memory the cache may take."""
    prefill_tokens: int = 8192
    """Prompt tokens prefilled per forward, at least one prompt: packed on a CPU (no padding: a
    prompt's K/V do not depend on the prompts beside it; staged.rollout.prefill), left-padded on
    CUDA with invariant_rows = 0 (with invariant_rows > 0, CUDA's default: one prompt per forward)."""
    cuda_graphs: bool = True
    """Engine "paged" on CUDA: decode steps padded to static shapes and replayed as CUDA graphs
    (staged.rollout.graphs); a capture that fails falls back to eager with a warning."""
    invariant_rows: int = 64
    """Engine "paged" on CUDA: every decode step and every first-token draw runs at exactly this
    many rows (padding rows fill a short step; more live rows go in several passes) and prompts
    are prefilled one per forward, so that no kernel sees a shape set by the rows beside a row:
    cuBLAS and torch's reductions pick their kernels, and with them the rounding, by shape. A row's
    completion then depends on its seed and prompt only, as on a CPU (where it is exact anyway)
    -- with the flash or triton attention; the torch one reads block tables as wide as the
    call's longest prompt lets a row grow, and its rounding follows that width.
    0: steps at power-of-two buckets of the live rows instead (one pass at any row count; a
    row's bits then move with the batch: tokens agree only up to flips)."""
    static_shapes: bool = False
    """Pad decode steps to the graphs' static shapes even where nothing is captured (a CPU):
    the graph path's padding, run eagerly; for tests."""
    reuse_vision_features: bool = True
    """Engine "paged", Qwen2-VL / Qwen2.5-VL / Qwen3-VL (deepstack included): keep each distinct
    prompt's image features for the training forward of the same step (staged.vision_reuse)."""

    def __post_init__(self):
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name}: {msg}")

        for name in ("eos_token_ids", "suppress_token_ids"):  # one id, or a list, as generate() takes them
            ids = getattr(self, name)
            if ids is None:  # transformers' "unset": the model's own end tokens (generate()), none suppressed
                ids = ()
            elif isinstance(ids, torch.Tensor) or not hasattr(ids, "__iter__"):  # an int, a numpy / 0-d one
                ids = torch.as_tensor(ids).flatten().tolist()
            setattr(self, name, tuple(int(i) for i in ids))

        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
              f"must be a finite number > 0, got {self.temperature} (greedy decoding: a tiny temperature, as "
              f"staged.eval does with {GREEDY_HINT})")
        check(0.0 < self.top_p <= 1.0, "top_p", f"must lie in (0, 1], got {self.top_p}")
        check(self.batch_size >= 0, "batch_size", f"must be >= 0, got {self.batch_size}")
        check(self.check_every >= 1, "check_every", f"must be >= 1, got {self.check_every}")
        check_engine_settings(self, check)


@dataclass
class Rollout:
    """Completions for B prompt rows (a row = one prompt copy; G rows per GRPO group).

    prompt_ids      [B, Tp] int64  left-padded prompts, as given
    prompt_mask     [B, Tp] int64
    completion_ids  [B, Tc] int64  sampled tokens; ``pad_token_id`` after the end
    completion_mask [B, Tc] int64  1 on sampled tokens, the EOS included
    logprobs        [B, Tc] fp32   log-prob of each sampled token under the sampling policy
                                   (tempered, full distribution); 0 on padding
    position_ids    [3, B, Tp+Tc]  int64 positions of the whole sequence (host tensor)
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    position_ids: torch.Tensor
    stats: dict | None = None
    """Engine counters (prefill / decode time and tokens, cache blocks, ...), for benchmarks."""
    vision_features: list | None = None
    """Per distinct prompt: its images' features [Nv, H] from the rollout (None: no image), or
    None when the engine does not keep them (staged.vision_reuse)."""
    prompt_index: list[int] | None = None
    """Row -> its distinct prompt (the index into vision_features)."""

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


# ------------------------------------------------------------------------------------------
# positions


def position_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """[3, B, T] positions of a left-padded batch (padding gets 0). Run on host tensors: the
    model's ``get_rope_index`` walks each row in Python."""
    base = base_model(model)
    if image_grid_thw is None or not hasattr(base, "get_rope_index"):
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
    kwargs = dict(image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    if "mm_token_type_ids" in inspect.signature(base.get_rope_index).parameters:
        image_id = base.config.image_token_id
        kwargs["mm_token_type_ids"] = (input_ids == image_id).int()
    pos, _ = base.get_rope_index(input_ids, **kwargs)
    return pos.masked_fill(attention_mask.unsqueeze(0) == 0, 0)


def extend_positions(prompt_pos: torch.Tensor, n: int) -> torch.Tensor:
    """Append ``n`` text positions after each row's prompt: [3, B, Tp] -> [3, B, Tp + n]."""
    nxt = prompt_pos.amax(dim=(0, 2)) + 1  # [B]
    tail = nxt[:, None] + torch.arange(n, dtype=prompt_pos.dtype)
    return torch.cat([prompt_pos, tail.unsqueeze(0).expand(3, -1, -1)], dim=-1)


# ------------------------------------------------------------------------------------------
# batch plumbing


def images_per_row(batch: dict) -> list[int]:
    n = batch.get("images_per_row")
    if n is not None:
        return list(n)
    return [0] * batch["input_ids"].shape[0]


def uses_sliding_window(model) -> bool:
    """Whether any text layer of ``model`` attends within a sliding window."""
    text = model.config.get_text_config()
    return bool(getattr(text, "use_sliding_window", False)) or any(
        t != "full_attention" for t in (getattr(text, "layer_types", None) or []))


def normalize_batch(model, batch: dict) -> dict:
    """A batch as a transformers processor returns it, made into what the engines take: rows
    left-padded (a right-padded row is shifted; its tokens and images unchanged) and
    ``images_per_row`` inferred where it is missing (each row's image-placeholder count matched,
    in order, against the images' token counts)."""
    batch = dict(batch)
    for key in ("input_ids", "attention_mask"):
        if not isinstance(batch.get(key), torch.Tensor) or batch[key].dim() != 2:
            raise ValueError(f"rollout batch: {key} must be a [rows, tokens] tensor")
        batch[key] = batch[key].long()  # int32 ids / bool or float masks, as processors and callers make them
    ids, attn = batch["input_ids"], batch["attention_mask"]
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"rollout batch: no {'rows' if ids.shape[0] == 0 else 'prompt tokens'} (input_ids "
                         f"{tuple(ids.shape)})")
    if ids.shape != attn.shape:
        raise ValueError(f"rollout batch: input_ids {tuple(ids.shape)} and attention_mask {tuple(attn.shape)} differ")
    for key in ("pixel_values_videos", "video_grid_thw"):
        if batch.get(key) is not None:
            raise ValueError(f"rollout batch: {key}: video inputs are not supported by the rollout engines")
    if (batch.get("image_grid_thw") is None) != (batch.get("pixel_values") is None):
        raise ValueError("rollout batch: pixel_values and image_grid_thw come together (one of them is missing)")
    vocab = model.config.get_text_config().vocab_size
    outside = attn.bool() & ((ids < 0) | (ids >= vocab))
    if bool(outside.any()):  # else an index error deep in the embedding
        r, c = (int(i) for i in outside.nonzero()[0])
        raise ValueError(f"rollout batch row {r}: token id {int(ids[r, c])} outside the model's vocabulary of {vocab}")
    if batch.get("image_grid_thw") is not None:
        batch["image_grid_thw"] = torch.as_tensor(batch["image_grid_thw"]).long().reshape(-1, 3)
        patches = int(batch["image_grid_thw"].prod(-1).sum())
        if patches != batch["pixel_values"].shape[0]:
            raise ValueError(f"rollout batch: image_grid_thw's images have {patches} patches, pixel_values has "
                             f"{batch['pixel_values'].shape[0]} rows")
    per_row = batch.get("images_per_row")
    if per_row is not None and len(per_row) != ids.shape[0]:
        raise ValueError(f"rollout batch: images_per_row has {len(per_row)} entries for {ids.shape[0]} rows")
    images = len(batch["image_grid_thw"]) if batch.get("image_grid_thw") is not None else 0
    if per_row is not None and sum(per_row) != images:
        raise ValueError(f"rollout batch: images_per_row counts {sum(per_row)} images, image_grid_thw has {images}")
    T = ids.shape[1]
    pos = torch.arange(T)
    count = attn.sum(-1)
    last = torch.where(attn.bool(), pos, -1).amax(-1)
    first = torch.where(attn.bool(), pos, T).amin(-1)
    if bool((count == 0).any()):
        raise ValueError(f"rollout batch row {int((count == 0).nonzero()[0])}: an empty prompt (its attention_mask is all 0)")
    if bool((last - first + 1 != count).any()):
        raise ValueError("attention_mask: each row must be one contiguous run of 1s (padding on one side only)")
    shift = torch.where(count > 0, T - 1 - last, 0)
    if bool(shift.any()):  # right- (or both-side-) padded rows: rotate their tokens to the right end
        src = (pos[None] - shift[:, None]) % T
        batch["input_ids"], batch["attention_mask"] = ids.gather(-1, src), batch["attention_mask"].gather(-1, src)
        batch.pop("position_ids", None)
    grid = batch.get("image_grid_thw")
    if batch.get("images_per_row") is None and grid is not None and len(grid):
        per_image = _image_tokens(model, grid)
        per_row_tokens = (batch["input_ids"] == model.config.image_token_id).sum(-1).tolist()
        out, i = [], 0
        for need in per_row_tokens:
            k = 0
            while need > 0 and i < len(per_image):
                need -= per_image[i]
                i, k = i + 1, k + 1
            if need != 0:
                break
            out.append(k)
        if len(out) != len(per_row_tokens) or i != len(per_image):
            raise ValueError("images_per_row missing and the rows' image tokens do not match image_grid_thw's "
                             "images in order; pass images_per_row")
        batch["images_per_row"] = out
    _check_image_tokens(model, batch)
    return batch


def _image_tokens(model, grid: torch.Tensor) -> list[int]:
    """Image placeholders per image of ``image_grid_thw`` (patches over the merge window)."""
    cfg = model.config
    merge = getattr(getattr(cfg, "vision_config", cfg), "spatial_merge_size", 2)
    return (grid.prod(-1) // (merge * merge)).tolist()


def _check_image_tokens(model, batch: dict) -> None:
    """Each row's image placeholders must be as many as its images' tokens: otherwise the
    features land on the wrong tokens (or transformers fails deep inside with a shape error)."""
    grid = batch.get("image_grid_thw")
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        return
    per_image = _image_tokens(model, grid) if grid is not None else []
    tokens = ((batch["input_ids"] == image_token) & batch["attention_mask"].bool()).sum(-1).tolist()
    for r, ((a, b), n) in enumerate(zip(image_ranges(batch)[0], tokens)):
        if sum(per_image[a:b]) != n:
            raise ValueError(f"rollout batch row {r}: {n} image tokens in its input_ids but its {b - a} image(s) "
                             f"give {sum(per_image[a:b])} features (image_grid_thw / images_per_row do not match "
                             f"the prompt)")


def image_ranges(batch: dict) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per row, its images [a, b) (indices into image_grid_thw) and its patches [a, b) (rows of
    pixel_values): images are stored row after row."""
    per_row = images_per_row(batch)
    grid = batch.get("image_grid_thw")
    img_start = [0]
    for k in per_row:
        img_start.append(img_start[-1] + k)
    patch_start = [0]
    for n in (grid.prod(-1).tolist() if grid is not None else []):
        patch_start.append(patch_start[-1] + n)
    imgs = [(img_start[r], img_start[r + 1]) for r in range(len(per_row))]
    return imgs, [(patch_start[a], patch_start[b]) if b > a else (0, 0) for a, b in imgs]


def select_rows(batch: dict, rows: list[int]) -> dict:
    """Rows of a generation batch (pixel_values / image_grid_thw follow their rows)."""
    out = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows]}
    per_row = images_per_row(batch)
    out["images_per_row"] = [per_row[r] for r in rows]
    if "position_ids" in batch:
        out["position_ids"] = batch["position_ids"][:, rows]
    if "prompt_index" in batch:
        out["prompt_index"] = [batch["prompt_index"][r] for r in rows]
    if batch.get("image_grid_thw") is not None and sum(out["images_per_row"]) > 0:
        imgs, patches = image_ranges(batch)
        out["image_grid_thw"] = batch["image_grid_thw"][[i for r in rows for i in range(*imgs[r])]]
        out["pixel_values"] = torch.cat([batch["pixel_values"][slice(*patches[r])] for r in rows if per_row[r]])
    return out


def model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The keys the model's forward takes, on ``device`` (pixel values in the compute dtype)."""
    out = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "position_ids")
           if k in batch}
    if "pixel_values" in batch:
        out["pixel_values"] = batch["pixel_values"].to(device, dtype, non_blocking=True)
        out["image_grid_thw"] = batch["image_grid_thw"].to(device, non_blocking=True)
    return out


def cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the KV cache ``cache``, earlier releases ``past_key_values``
    (``model``: a module, or a module class)."""
    params = inspect.signature((model if isinstance(model, type) else type(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"
