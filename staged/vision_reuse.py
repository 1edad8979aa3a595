"""Vision features computed once per prompt and step, reused by the rollout's decoder and by
every training forward of the step's G samples.

Today's cost without it: the vision tower runs G times per prompt in the rollout's prefill and
again G times (forward and backward) in the training forward. With it:

* the rollout engine computes each distinct prompt's image features once (no grad) and prefills
  the decoder with them (staged.rollout.engine);
* the training forward of a micro-batch takes those features instead of running the tower
  (padded: ``injected_image_features``, transformers' own forward, whose ``get_image_features``
  returns them; packed: ``staged.packed_step.packed_hidden(image_features=...)``, the features
  of the item's samples in slot order, which is span order); each distinct prompt's features
  are one leaf tensor, so the gradient of all its rows and micro-batches accumulates there;
* when the tower trains, one deferred pass per step (``backward_through_tower``) recomputes the
  distinct images' features with grad and backpropagates the accumulated gradient through the
  tower: 1 forward + 1 backward per image instead of G of each. The result is the same gradient
  (sums in another order).

Qwen3-VL: the tower also gives deepstack features (one [Nv, H] per deepstack merger), added
to the image rows after the first decoder layers. They travel with the merged features as one
tensor [Nv, (1 + L) * H] (``tower_features``: merged, then deepstack 0..L-1, along the last
dim), so that everything above -- per-prompt rows, leaves, gradients, the deferred tower pass --
handles them unchanged; ``injected_image_features`` splits them again. The merged part goes in
where transformers' ``get_image_features`` returns it; the deepstack part where the model hands
them to its text model (its ``deepstack_visual_embeds`` argument, in image-token order: the
order of the features). Both are public forward arguments of transformers >= 4.57 / 5.x.

Features computed during training (``PromptImages``: one tower call over some distinct prompts'
images, taken from the step's one-row-per-prompt batch), where the rollout's cannot serve:

* the reference model (beta > 0) is frozen but is not the policy: its own tower runs once per
  mini-batch over the mini-batch's distinct images (no grad), and its forwards take those
  features as the policy's take the rollout's -- once per distinct image per step, not G times;
* the policy, when the rollout's features are stale (the tower trains and the step makes more
  than one update): inside each training forward, the tower once per distinct image of the
  micro-batch, with grad and the forward's weights, expanded to the rows; autograd sums the
  rows' gradients into the one pass (the per-row tower's gradient, summed in another order).
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from staged.models.loading import base_model, vision_module


def supports_reuse(model) -> bool:
    try:
        visual = vision_module(model)
        inner = base_model(model)
    except Exception:  # noqa: BLE001 - not a VLM
        return False
    if not hasattr(inner, "get_image_features"):
        return False
    if num_deepstack(model):  # Qwen3-VL: the text model must take the deepstack features
        lm = getattr(inner, "language_model", None)
        return lm is not None and "deepstack_visual_embeds" in inspect.signature(type(lm).forward).parameters
    return visual is not None


def num_deepstack(model) -> int:
    """Deepstack feature sets the tower gives (Qwen3-VL: 3 for the 8B; 0 for Qwen2/2.5-VL)."""
    return len(getattr(vision_module(model).config, "deepstack_visual_indexes", None) or [])


FORWARD_METHOD = "staged_image_features"


def tower_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The tower's merged output [Nv, H] for ``pixel_values`` (images in order), the tower called
    directly; Qwen3-VL: [Nv, (1 + L) * H], its L deepstack feature sets after the merged ones."""
    from staged.attention import vision_outputs

    merged, deep = vision_outputs(model, pixel_values, grid_thw)
    return torch.cat([merged, *deep], dim=-1) if deep else merged


def split_features(model, features: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``tower_features``' layout back to (merged [Nv, H], deepstack [[Nv, H]] * L). L is read
    from the width (a config may list deepstack blocks the tower does not have: none then run)."""
    cfg = vision_module(model).config
    width = getattr(cfg, "out_hidden_size", None) or model.config.get_text_config().hidden_size
    if features.shape[-1] % width:
        raise ValueError(f"image features of width {features.shape[-1]}: not a whole number of feature sets "
                         f"of width {width} (merged + deepstack)")
    parts = features.split(width, dim=-1)
    return parts[0], list(parts[1:])


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
    as transformers 5.x returns them) instead of running the tower. Qwen3-VL (``features`` in
    ``tower_features``' layout): the merged part there (with no deepstack features, so the model
    builds none), and the deepstack part handed to the text model in place of what the model
    built (``deepstack_visual_embeds``; its ``visual_pos_masks`` are the image tokens)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = base_model(model)
    merged, deep = split_features(model, features)

    def precomputed(pixel_values=None, image_grid_thw=None, **kwargs):
        sizes = tokens_per_image(model, image_grid_thw)
        if sum(sizes) != merged.shape[0]:
            raise ValueError(f"precomputed image features: {merged.shape[0]} rows for images of "
                             f"{sum(sizes)} tokens ({len(sizes)} images)")
        out = BaseModelOutputWithPooling(pooler_output=tuple(merged.split(sizes)))
        out.deepstack_features = []  # Qwen3-VL: the model's merge of them is a no-op; ours go in below
        return out

    patched = [(inner, "get_image_features", precomputed)]
    if deep:
        lm = inner.language_model
        text_forward = lm.forward

        def with_deepstack(*args, **kwargs):
            if kwargs.get("visual_pos_masks") is not None:
                kwargs["deepstack_visual_embeds"] = deep
            return text_forward(*args, **kwargs)

        patched.append((lm, "forward", with_deepstack))
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patched]
    for obj, name, fn in patched:
        setattr(obj, name, fn)
    try:
        yield
    finally:
        for obj, name, prev in saved:
            if prev is None:
                del obj.__dict__[name]
            else:
                setattr(obj, name, prev)


class StepVisionFeatures:
    """One GRPO step's reused features on a rank: a leaf per distinct prompt (requires grad when
    the tower trains), rows -> their prompt."""

    def __init__(self, per_prompt: list[torch.Tensor | None], prompt_of_row: list[int], trainable: bool):
        self.leaves = [None if f is None else f.detach().requires_grad_(trainable) for f in per_prompt]
        self.prompt_of_row, self.trainable = prompt_of_row, trainable

    def for_rows(self, rows: list[int]) -> torch.Tensor | None:
        """Features of the images of ``rows`` (their order), or None when they have none."""
        return rows_features(self.leaves, [self.prompt_of_row[r] for r in rows])

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


def per_row_features(model, feats: torch.Tensor, grid_thw: torch.Tensor, num_images: list[int]) -> list:
    """A tower call's output over several rows' images (in order) cut back into rows: row i's
    ``num_images[i]`` images' features as one tensor, None for a row without an image."""
    per_img = feats.split(tokens_per_image(model, grid_thw))
    out, start = [], 0
    for n in num_images:
        out.append(torch.cat(per_img[start:start + n]) if n else None)
        start += n
    return out


def rows_features(per_prompt, prompts: list[int]) -> torch.Tensor | None:
    """The features of rows showing ``prompts``' images (one prompt per row, the rows' order):
    ``per_prompt[p]`` [Nv_p, ...] (None: no image) repeated for each of its rows; None when no row
    has an image. A prompt's tensor used by several rows: autograd sums their gradients there."""
    parts = [per_prompt[p] for p in prompts if per_prompt[p] is not None]
    return torch.cat(parts) if parts else None


class PromptImages:
    """The images of the distinct prompts of some rows, on the device, for one tower call over
    them. ``base``: the step's generation batch with one row per distinct prompt (the trainer's;
    row p = prompt p); ``prompts``: the rows' prompts, in the rows' order (repeats allowed)."""

    def __init__(self, base: dict, prompts: list[int], device: torch.device, dtype: torch.dtype):
        from staged.rollout.interface import images_per_row, model_inputs, select_rows

        self.prompts, self.distinct = list(prompts), list(dict.fromkeys(prompts))
        sub = select_rows(base, self.distinct)
        self.num_images = images_per_row(sub)
        inputs = model_inputs(sub, device, dtype)
        self.pixel_values, self.grid_thw = inputs.get("pixel_values"), inputs.get("image_grid_thw")

    def per_prompt(self, model, tower=tower_features) -> dict[int, torch.Tensor | None]:
        """{distinct prompt: its images' features (None: no image)} from one ``tower`` call
        (``tower_features``: the unit itself, inside a root forward; ``image_features``: through
        the root's forward method); no call when no prompt has an image."""
        if self.pixel_values is None:
            return dict.fromkeys(self.distinct)
        feats = tower(model, self.pixel_values, self.grid_thw)
        return dict(zip(self.distinct, per_row_features(model, feats, self.grid_thw, self.num_images)))

    def per_row(self, model) -> torch.Tensor | None:
        """The rows' features (``tower_features``' layout, the rows' order), the tower called once
        per distinct image: what the log-prob forwards take as ``images`` run this in the forward."""
        return rows_features(self.per_prompt(model), self.prompts)
