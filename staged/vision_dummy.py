"""Keep the vision tower's FSDP collectives in step when a rank has no image to show it.

The vision tower is one FSDP2 unit (staged.parallel): its forward all-gathers its parameters
and, when trainable, its backward reduce-scatters their gradients. Those are collectives: every
rank must issue them, in the same order. A micro-batch without images never calls the tower, so
in a stage that mixes image and text-only samples a rank whose micro-batch is all text would
skip the all-gather the other ranks wait in (FSDP hangs, or gloo pairs it with the next
decoder block's all-gather). The cure here: on such a micro-batch, run the tower on one tiny
zero image at the point where the real images would run (inside the root's forward, before the
decoder blocks), and add ``0.0 * features.sum()`` to the output, so that autograd, and with it
FSDP's reduce-scatter, see the tower too. The values are unchanged and the tower's gradient from
the dummy is exactly zero.

Only with world size > 1: one process has nobody to wait for, so its numerics are untouched.
One thing zero is not: an absent gradient. If no rank had an image in a step, one process would
leave the tower's ``.grad`` None (AdamW skips it: no weight decay, no moment update) while N
ranks hold zeros; ``drop_vision_grads`` puts the None back so both take the same step.

The rollout needs no dummy: it runs without grad, so only the all-gather matters, and
``gather_vision`` issues it up front on every rank (see staged.rollout.generate).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from staged.models.loading import vision_module


def _multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def dummy_vision_term(model) -> torch.Tensor | None:
    """``0.0 * sum`` of the vision tower's outputs (Qwen3-VL: deepstack features included, so
    that every trainable tower parameter gets its gradient on every rank) on one zero image of the smallest grid
    (1 x merge x merge patches = one merged token): a 0-d tensor to add to a forward output, or
    None with one process. Call it where the real images would run (inside the root's forward,
    before the decoder blocks) so that every rank gathers the units in the same order."""
    if not _multi_rank():
        return None
    from staged.attention import vision_outputs

    merged, deepstack = vision_outputs(model, *dummy_image(model))  # Qwen3-VL: its deepstack mergers too
    return 0.0 * sum((f.sum() for f in deepstack), merged.sum())


def dummy_image(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, grid_thw) of one zero image of the smallest grid: 1 x merge x merge patches."""
    visual = vision_module(model)
    c = visual.config
    m = c.spatial_merge_size
    # pixel_values [patches, C * temporal_patch * patch * patch], grid_thw [images, 3] = (t, h, w)
    pixels = torch.zeros(m * m, c.in_channels * c.temporal_patch_size * c.patch_size ** 2,
                         device=next(visual.parameters()).device)
    return pixels, torch.tensor([[1, m, m]], device=pixels.device)


def with_dummy_vision(x: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
    """``x + term`` (term from :func:`dummy_vision_term`; ``x`` itself when None)."""
    return x if term is None else x + term.to(x.dtype)


def gather_vision(model) -> None:
    """All-gather the vision tower's parameters now (ranks > 1, FSDP only). Inside
    ``gathered_for_generation`` they then stay gathered for the whole rollout, so every rank does
    this unit's one all-gather at the same point whether or not its rows have images."""
    if _multi_rank() and isinstance(visual := vision_module(model), FSDPModule):
        visual.unshard()


def drop_vision_grads(model) -> None:
    """Set the vision tower's gradients to None (call when no rank had an image this step)."""
    for p in vision_module(model).parameters():
        p.grad = None
