"""Vision features computed once per prompt and step, reused by the rollout's decoder and by
every training forward of the step's G samples.

Today's cost without it: the vision tower runs G times per prompt in the rollout's prefill and
again G times (forward and backward) in the training forward. With it:

* the rollout engine computes each distinct prompt's image features once (no grad) and prefills
  the decoder with them (staged.rollout.engine);
* the training forward of a micro-batch takes those features instead of running the tower
  (``injected_image_features``: transformers' own forward, whose ``get_image_features`` returns
  them); each distinct prompt's features are one leaf tensor, so the gradient of all its rows and
  micro-batches accumulates there;
* when the tower trains, one deferred pass per step (``backward_through_tower``) recomputes the
  distinct images' features with grad and backpropagates the accumulated gradient through the
  tower: 1 forward + 1 backward per image instead of G of each. The result is the same gradient
  (sums in another order).

Only for towers whose output is the merged features alone (Qwen2-VL, Qwen2.5-VL); Qwen3-VL's
deepstack features feed decoder layers directly and keep the plain path.
"""
from __future__ import annotations

import contextlib

import torch

from staged.models.loading import base_model, vision_module


def supports_reuse(model) -> bool:
    try:
        visual = vision_module(model)
    except Exception:  # noqa: BLE001 - not a VLM
        return False
    return not getattr(visual.config, "deepstack_visual_indexes", None) and hasattr(base_model(model),
                                                                                       "get_image_features")


FORWARD_METHOD = "staged_image_features"


def tower_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The tower's merged output [Nv, H] for ``pixel_values`` (images in order), the tower called directly."""
    from staged.attention import vision_features

    return vision_features(model, pixel_values, grid_thw)


def image_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """``tower_features`` through the root's FSDP forward method when the trainer bound one
    (FSDP2 wants the root's forward to run before any unit's own: the rollout's prefill may be
    the first forward of a run), else directly."""
    fn = getattr(model, FORWARD_METHOD, None)
    return fn(pixel_values, grid_thw) if fn is not None else tower_features(model, pixel_values, grid_thw)


def tokens_per_image(model, grid_thw: torch.Tensor) -> list[int]:
    m = vision_module(model).config.spatial_merge_size
    return (grid_thw.prod(-1) // (m * m)).tolist()


@contextlib.contextmanager
def injected_image_features(model, features: torch.Tensor):
    """Inside, the model's ``get_image_features`` returns ``features`` [Nv, H] (split per image
    as transformers 5.x returns them) instead of running the tower."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = base_model(model)

    def precomputed(pixel_values=None, image_grid_thw=None, **kwargs):
        sizes = tokens_per_image(model, image_grid_thw)
        if sum(sizes) != features.shape[0]:
            raise ValueError(f"precomputed image features: {features.shape[0]} rows for images of "
                             f"{sum(sizes)} tokens ({len(sizes)} images)")
        return BaseModelOutputWithPooling(pooler_output=tuple(features.split(sizes)))

    inner.get_image_features = precomputed
    try:
        yield
    finally:
        del inner.get_image_features


class StepVisionFeatures:
    """One GRPO step's reused features on a rank: a leaf per distinct prompt (requires grad when
    the tower trains), rows -> their prompt."""

    def __init__(self, per_prompt: list[torch.Tensor | None], prompt_of_row: list[int], trainable: bool):
        self.leaves = [None if f is None else f.detach().requires_grad_(trainable) for f in per_prompt]
        self.prompt_of_row, self.trainable = prompt_of_row, trainable

    def for_rows(self, rows: list[int]) -> torch.Tensor | None:
        """Features of the images of ``rows`` (their order), or None when they have none."""
        parts = [self.leaves[self.prompt_of_row[r]] for r in rows if self.leaves[self.prompt_of_row[r]] is not None]
        return torch.cat(parts) if parts else None

    def backward_through_tower(self, model, pixel_values: torch.Tensor | None, grid_thw: torch.Tensor | None) -> None:
        """The deferred tower pass: features of the distinct images (``pixel_values`` / ``grid_thw``:
        the distinct prompts' images, in prompt order) recomputed with grad, and the gradient the
        step's micro-batches left on the leaves sent through the tower. Every rank calls this once
        per step (a zero dummy image on a rank without images: FSDP's collectives line up)."""
        from staged.vision_dummy import dummy_vision_term

        if not self.trainable:
            return
        leaves = [f for f in self.leaves if f is not None]
        if pixel_values is None or not leaves:
            dummy = dummy_vision_term(model)
            if dummy is not None:
                dummy.backward()
            return
        out = tower_features(model, pixel_values, grid_thw)  # the root ran this step: the unit alone
        grad = torch.cat([f.grad if f.grad is not None else torch.zeros_like(f) for f in leaves])
        out.backward(grad.to(out.dtype))
