"""Packed micro-batches for the GRPO step: a rollout's prompt+completion sequences packed back to
back under a token budget, the policy forward on packed rows with explicit cu_seqlens, and the
per-token log-probs (+ entropy) of the completion tokens in the packed layout that
``grpo_loss(..., cu_seqlens=...)`` takes. ``packing.enabled`` in the config switches the trainer
from padded micro-batches to these (staged/train.py, the loss section of ``grpo_step``).

    items, n = plan_and_collate(...)               # host: planner, span tables, index tensors
    for it in items:                               # equal count on every rank
        logp, ent = model.staged_packed_logprobs(it.batch, it.rows, it.targets, ...)   # [N]
        loss, m = policy_loss(logp, ..., it.advantages, it.mask, cu_seqlens=it.cu_seqlens)

Layouts. A packed micro-batch holds samples s = 0..B-1 (planner order) in rows
cu[s]..cu[s+1]-1: the sample's unpadded prompt (p_s tokens), then its completion (c_s tokens,
up to and including EOS). Completion token j of sample s is predicted by row cu[s] + p_s - 1 + j;
only those N = sum c_s rows go through lm_head (``rows``), so the log-prob layout is the
completion tokens back to back with ``cu_seqlens`` = cumsum(c_s) (that is what ``grpo_loss``
reads; it never sees prompt rows). Advantages, sampler log-probs and the mask follow.

Ranks. Every rank packs its own samples (all G rows of a prompt already live on the rank that
sampled them, so groups stay together): ``plan_micro_batches(..., num_ranks=1)`` per rank, then
the ranks agree on the largest micro-batch count (folded into the step's one token-count
all-reduce) and a rank with fewer runs extra micro-batches of weight 0. Such a filler holds one
real sample of the rank (not a padding token) so that it runs the same modules -- the vision
tower included -- as the other ranks' micro-batches: FSDP's all-gathers and reduce-scatters line
up. Loss weights are ``micro_batch_weight`` of the real samples (staged.grpo), so 1 process and N
ranks compute the same gradient whatever the packing.

Devices. On CUDA the packing kernels build embeddings and position ids (Triton, no host sync)
and attention dispatches flash-attn varlen / xformers (staged.attention). Off CUDA the Triton
kernels would run under the interpreter (far too slow for a training step), so the plain-torch
versions run instead (``staged.kernels.reference.packing``; identical values) and attention is
the exact per-sequence SDPA loop. The host knows every length (sequence and completion lengths
were read back for the rewards), so nothing here syncs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from staged import attention
from staged.kernels import fused_linear_logprob
from staged.models.loading import lm_head_weight
from staged.packing.collate import (
    PackedMicroBatch,
    PackingConfig,
    PackSample,
    collate_packed,
)
from staged.packing.planner import plan_micro_batches
from staged.vision_dummy import dummy_vision_term, with_dummy_vision
from staged.vision_reuse import split_features

PACKED_LOGPROBS = "staged_packed_logprobs"  # the FSDP forward method bound next to LOGPROBS


# ------------------------------------------------------------------------------------------
# host: rollout rows -> pack samples -> planned, collated micro-batches


@dataclass
class PackedItem:
    """One packed micro-batch of one rank, ready for the forward and the loss.

    batch: the PackedMicroBatch on the device; rows [N] int64: the packed rows that predict the
    completion tokens; targets [N]: those tokens; cu_seqlens [B+1] int32: completion tokens per
    sample (the loss layout); advantages [B]; sampler_logp [N]: the rollout's log-probs; mask [N]
    bool (all true; the loss API wants one); num_rows: real samples (0 for a filler, whose loss
    weight is 0)."""

    batch: PackedMicroBatch
    rows: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    advantages: torch.Tensor
    sampler_logp: torch.Tensor
    mask: torch.Tensor
    num_rows: int
    sample_rows: list[int] = field(default_factory=list)
    """The rollout rows packed here, in slot order (a filler: its one sample)."""


def rollout_samples(batch: dict, prompt_ids: torch.Tensor, prompt_len: list[int], comp_ids: torch.Tensor,
                    comp_len: list[int]) -> list[PackSample]:
    """One PackSample per rollout row: the unpadded prompt (left padding dropped) + the completion
    (right padding dropped), with the row's images. Host tensors in, host tensors out."""
    B, Tp = prompt_ids.shape
    per_row = batch.get("images_per_row") or [0] * B
    grid = batch.get("image_grid_thw")
    pix = batch.get("pixel_values")
    img0, patch0, patches = 0, 0, grid.prod(-1).tolist() if grid is not None else []
    out = []
    for r in range(B):
        ids = torch.cat([prompt_ids[r, Tp - prompt_len[r]:], comp_ids[r, :comp_len[r]]])
        g = pv = None
        if per_row[r]:
            n = sum(patches[img0:img0 + per_row[r]])
            g, pv = grid[img0:img0 + per_row[r]], pix[patch0:patch0 + n]
            img0, patch0 = img0 + per_row[r], patch0 + n
        out.append(PackSample(input_ids=ids, prompt_len=prompt_len[r], image_grid_thw=g, pixel_values=pv))
    return out


def plan_rank(seq_len: list[int], group_size: int, token_budget: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches (lists of row indices): the planner on one rank, groups of
    ``group_size`` consecutive rows kept together. ``token_budget`` 0 = micro_batch_size x the
    longest sequence (never more micro-batches than the padded path)."""
    if not seq_len:
        return []
    budget = token_budget or micro_batch_size * max(seq_len)
    longest = max(seq_len)
    if longest > budget:
        raise ValueError(f"packing.token_budget: a sequence of {longest} tokens (prompt + completion) does not fit "
                         f"a budget of {budget} tokens; raise packing.token_budget (or 0 = automatic)")
    plan = plan_micro_batches(seq_len, [r // group_size for r in range(len(seq_len))], budget, 1)
    return [mb for mb in plan.micro_batches[0] if mb]


def collate_items(samples: list[PackSample], micro_batches: list[list[int]], num_micro_batches: int,
                  cfg: PackingConfig, *, comp_ids: torch.Tensor, comp_len: list[int], advantages: torch.Tensor,
                  sampler_logp: torch.Tensor, device: torch.device, dtype: torch.dtype,
                  with_pixels: bool = True) -> list[PackedItem]:
    """Collate this rank's micro-batches, padded to ``num_micro_batches`` with fillers (one real
    sample, weight 0). Index tensors are built on the host from host lengths and copied
    non-blocking; the gathers from the rollout tensors run on the device. ``with_pixels=False``:
    no pixel values are gathered (the rollout's vision features stand in, staged.vision_reuse)."""
    n_fill = num_micro_batches - len(micro_batches) if samples else 0
    mbs = list(micro_batches) + [[0]] * n_fill
    # A sample may appear once per collate call: the fillers (all the same) are a call of their own.
    packed_mbs = collate_packed(samples, micro_batches, cfg, with_pixels=with_pixels)
    if n_fill:
        packed_mbs += collate_packed(samples, [[0]], cfg, with_pixels=with_pixels) * n_fill
    out = []
    for j, (mb, packed) in enumerate(zip(mbs, packed_mbs)):
        cu = packed.table.cu_seqlens.tolist()  # host table: no device sync
        rows, src_r, src_t, cu_loss = [], [], [], [0]
        for slot, i in enumerate(mb):
            p, c = samples[i].prompt_len, comp_len[i]
            rows.append(torch.arange(cu[slot] + p - 1, cu[slot] + p - 1 + c))
            src_r.append(torch.full((c,), i, dtype=torch.int64))
            src_t.append(torch.arange(c))
            cu_loss.append(cu_loss[-1] + c)
        rows, src_r, src_t = (torch.cat(x).to(device, non_blocking=True) for x in (rows, src_r, src_t))
        idx = torch.tensor(mb, dtype=torch.int64).to(device, non_blocking=True)
        if packed.pixel_values is not None:
            packed.pixel_values = packed.pixel_values.to(dtype)
        out.append(PackedItem(
            batch=packed.to(device, non_blocking=True), rows=rows,
            targets=comp_ids.to(device)[src_r, src_t],
            cu_seqlens=torch.tensor(cu_loss, dtype=torch.int32).to(device, non_blocking=True),
            advantages=advantages[idx], sampler_logp=sampler_logp.to(device)[src_r, src_t],
            mask=torch.ones(cu_loss[-1], dtype=torch.bool, device=device),
            num_rows=len(mb) if j < len(micro_batches) else 0, sample_rows=list(mb)))
    return out


# ------------------------------------------------------------------------------------------
# device: the packed forward


def _embed(batch: PackedMicroBatch, emb: torch.nn.Embedding, vision: torch.Tensor | None) -> torch.Tensor:
    """[T, H] packed input embeddings: the Triton kernel on CUDA, plain torch elsewhere (the
    reference's math, plus nn.Embedding's padding_idx so that gradients match the padded path)."""
    pad = getattr(emb, "padding_idx", None)
    if batch.input_ids.is_cuda:
        return batch.embed(emb.weight, vision, padding_idx=pad)
    from staged.kernels.reference.packing import (
        SPAN_KIND,
        SPAN_ROW,
        SPAN_VROW,
        row_spans,
    )

    t, ids = batch.table, batch.input_ids
    sp = t.spans[row_spans(t.spans, t.num_rows)]
    is_vis = sp[:, SPAN_KIND] != 0
    out = F.embedding(torch.where(is_vis, torch.zeros_like(ids), ids), emb.weight, padding_idx=pad)
    if vision is not None and vision.shape[0]:
        vrow = sp[:, SPAN_VROW] + torch.arange(t.num_rows, device=ids.device) - sp[:, SPAN_ROW]
        vrow = torch.where(is_vis, vrow, torch.zeros_like(vrow))  # text rows read row 0, unused
        out = torch.where(is_vis[:, None], vision.to(out.dtype)[vrow], out)
    return out


def _position_ids(batch: PackedMicroBatch) -> torch.Tensor:
    if batch.input_ids.is_cuda:
        return batch.position_ids()
    from staged.kernels.reference.packing import position_ids_reference

    t = batch.table
    return position_ids_reference(t.spans, t.time_scale, t.cu_seqlens, t.num_rows)


def packed_hidden(model, batch: PackedMicroBatch, *, image_features: torch.Tensor | None = None,
                  tower_in_forward: bool = True, images=None) -> torch.Tensor:
    """Final hidden states [T, H] of a packed micro-batch (``staged.attention.packed_forward``
    with torch fallbacks for the packing kernels off CUDA; Qwen3-VL's deepstack included).
    ``tower_in_forward=False``: the tower does not run here; ``image_features`` (the rollout's,
    in span order, ``staged.vision_reuse.tower_features``' layout; None: no image) stand in.
    ``images`` (a staged.vision_reuse.PromptImages with an image, the samples' prompts in slot
    order): the tower runs here once per distinct image, its features expanded to the samples."""
    if images is not None:
        image_features, tower_in_forward = images.per_row(model), False
    inner, _ = attention._vl_parts(model)
    attention.use_packed_attention(model)  # idempotent; unpacked calls (the rollout) stay on sdpa
    vision = dummy = None
    deepstack = ()
    if not tower_in_forward:
        if image_features is not None:
            vision, deepstack = split_features(model, image_features)
    elif batch.pixel_values is not None:
        vision, deepstack = attention.vision_outputs(model, batch.pixel_values, batch.vision_grid_thw)
    else:  # ranks > 1: the tower runs anyway, so FSDP's collectives line up (staged.vision_dummy)
        dummy = dummy_vision_term(model)
    if vision is not None and vision.shape[0] != batch.table.num_vision_rows:
        raise ValueError(f"packed micro-batch: {batch.table.num_vision_rows} vision rows but {vision.shape[0]} "
                         f"vision features")
    embeds = _embed(batch, inner.get_input_embeddings(), vision)
    hidden = attention.packed_text_forward(model, batch, embeds, _position_ids(batch), deepstack=deepstack)
    return with_dummy_vision(hidden, dummy)


def packed_token_logprobs(model, batch: PackedMicroBatch, rows: torch.Tensor, targets: torch.Tensor, *,
                          temperature: float = 1.0, with_entropy: bool = False, vocab=None,
                          image_features: torch.Tensor | None = None, tower_in_forward: bool = True,
                          images=None):
    """Log-probs [N] of ``targets``, each predicted by packed row ``rows[n]`` (+ entropy [N]).
    Bound to the model as an FSDP forward method, like ``staged.grpo.token_logprobs`` (and
    ``vocab``, a staged.grpo.VocabMask, ``image_features`` / ``tower_in_forward`` / ``images``,
    the reused vision features, as there)."""
    hidden = packed_hidden(model, batch, image_features=image_features, tower_in_forward=tower_in_forward,
                           images=images).index_select(0, rows)
    w, bias = lm_head_weight(model), None
    if vocab is not None:
        w, targets, bias = vocab.apply(w, targets)
    out = fused_linear_logprob(hidden, w.to(hidden.dtype), targets, temperature=temperature, bias=bias,
                               return_entropy=with_entropy)
    return tuple(x.clone() for x in out) if with_entropy else out.clone()
