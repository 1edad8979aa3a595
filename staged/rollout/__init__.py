"""Rollout: sample G completions per prompt for a GRPO step.

The interface is ``generate(model, batch, params, *, seeds, device, dtype) -> Rollout``, so that
another engine (vLLM, SGLang) can be plugged in behind it. Engines (``SamplingParams.engine``):

  paged   (default) group-shared prefill, a paged KV cache, continuous batching over decode
          slots (staged.rollout.engine, .cache, .paged_attention)
  simple  the plain decode loop over transformers' DynamicCache (staged.rollout.simple)

Both sample with the same counter-based sampler (staged.rollout.sampler): a row's completion is a
function of its seed and prompt only, so 1 and N ranks, any slot count and a resumed run draw the
same completions, and the two engines draw the same tokens up to float rounding.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from staged.config import ROLLOUT_ENGINES
from staged.parallel import gathered_for_generation
from staged.rollout.interface import (Rollout, SamplingParams, extend_positions, images_per_row, model_inputs,
                                      normalize_batch, position_ids, select_rows, uses_sliding_window)
from staged.rollout.sampler import row_seed, sample_tokens, uniform_from_seed
from staged.vision_dummy import gather_vision

ENGINES = ROLLOUT_ENGINES

__all__ = ["ENGINES", "Rollout", "SamplingParams", "extend_positions", "generate", "images_per_row", "model_inputs",
           "position_ids", "row_seed", "sample_tokens", "select_rows", "uniform_from_seed"]


def generate(model, batch: dict, params: SamplingParams, *, seeds: torch.Tensor,
             device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Rollout:
    """Sample one completion per row of ``batch`` (a host-side generation batch: ``input_ids`` /
    ``attention_mask`` (left-padded; right-padded rows are shifted), optional ``pixel_values`` /
    ``image_grid_thw`` (a processor's output as it is), ``images_per_row`` (inferred when
    missing), ``position_ids``, and ``prompt_index``: row -> its distinct prompt, which lets the
    paged engine skip comparing rows); tensors on a device are brought to the host first.
    ``seeds`` [B] int64: row i's draws are a function of seeds[i] alone. ``dtype``: the compute
    dtype of pixel values."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    B = batch["input_ids"].shape[0]
    seeds = torch.as_tensor(seeds)
    if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
        raise ValueError(f"seeds: expected integers (int64), got {seeds.dtype}")
    seeds = seeds.to(torch.int64)  # the sampler's arithmetic is int64's: an int32 seed drew from half the mass
    if seeds.shape != (B,):
        raise ValueError(f"seeds: expected shape ({B},) (one per row), got {tuple(seeds.shape)}")
    if not params.eos_token_ids:  # the model's own end tokens, as transformers' generate() takes them
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        if not eos:
            raise ValueError("SamplingParams.eos_token_ids is empty and the model's generation_config has no "
                             "eos_token_id: generation would never stop early")
        params = dataclasses.replace(params, eos_token_ids=tuple(int(e) for e in eos))
    if params.engine == "paged" and uses_sliding_window(model):
        # The paged decode attention attends over all of a row's keys: a window would be ignored.
        warnings.warn("rollout: this text model has sliding-window attention layers, which the paged engine does "
                      "not implement; using the simple engine", RuntimeWarning, stacklevel=2)
        params = dataclasses.replace(params, engine="simple")
    # a processor's output moved to the GPU (``.to("cuda")``, as for transformers' generate()):
    # the engines plan on the host and move what the device needs themselves
    batch = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch = normalize_batch(model, batch)
    if "position_ids" not in batch:
        batch["position_ids"] = position_ids(model, batch["input_ids"], batch["attention_mask"],
                                             batch.get("image_grid_thw"))
    was_training = model.training
    model.eval()
    stats = vision = groups = None
    try:
        with gathered_for_generation(model):
            # Ranks > 1: gather the vision tower up front on every rank, with or without images in
            # its rows, so that its one all-gather lines up (staged.vision_dummy).
            gather_vision(model)
            if params.engine == "paged":
                from staged.rollout.engine import generate_paged

                ids, mask, logps, stats, vision, groups = generate_paged(model, batch, params, seeds, device, dtype)
            else:
                from staged.rollout.simple import generate_simple

                ids, mask, logps = generate_simple(model, batch, params, seeds, device, dtype)
    finally:
        model.train(was_training)
    bad = mask.bool() & ~torch.isfinite(logps)
    if bool(bad.any()):  # the trainer skips such a step (a non-finite loss); a caller is told
        rows = bad.any(-1).nonzero().flatten().tolist()
        warnings.warn(f"rollout: {len(rows)} of {B} rows drew from non-finite logits (NaN / inf in the model's "
                      f"output): their tokens are meaningless, their log-probs not finite (rows {rows[:8]}"
                      f"{', ...' if len(rows) > 8 else ''})", RuntimeWarning, stacklevel=2)
    return Rollout(prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], completion_ids=ids,
                   completion_mask=mask, logprobs=logps,
                   position_ids=extend_positions(batch["position_ids"], ids.shape[1]), stats=stats,
                   vision_features=vision, prompt_index=groups)
