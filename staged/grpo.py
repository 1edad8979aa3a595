"""The GRPO pieces the loop calls: group advantages, the policy log-prob forward, micro-batch
weights and the loss (``staged.kernels.grpo_loss``, TRL semantics).

Normalisation across micro-batches and ranks. FSDP averages gradients over ranks, and we
accumulate micro-batches by summing their backward passes, so each micro-batch's loss is
scaled such that (sum over a rank's micro-batches, then mean over ranks) is the loss of the
whole global mini-batch (one optimizer update; staged.minibatch) as TRL defines it for one process:

  grpo, bnpo, dr_grpo  per-sequence (or per-micro-batch) means: weight = rows_mb / rows of the
                       rank's mini-batch (ranks hold equal row counts: the rank mean is the global mean)
  dapo, cispo          token sums over the mini-batch's global token count: the kernel divides by
                       ``num_items_in_batch / num_processes`` (TRL's normaliser), which undoes
                       the ranks' mean; weight 1

With equal row counts per rank this makes 1 process and N ranks compute the same gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from staged.kernels import fused_linear_logprob, grpo_loss
from staged.models.loading import forward_hidden, lm_head_weight
from staged.vision_dummy import dummy_vision_term, with_dummy_vision
from staged.vision_reuse import injected_image_features

TOKEN_SUM_LOSSES = ("dapo", "cispo")


# ------------------------------------------------------------------------------------------
# advantages


def group_advantages(rewards: torch.Tensor, group_size: int, *, std_normalize: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards [P*G] (groups contiguous) -> advantages [P*G]: reward minus its group's mean,
    divided by the group's (unbiased) std + eps when ``std_normalize`` (TRL's scale_rewards)."""
    if rewards.numel() % group_size:
        raise ValueError(f"rewards: {rewards.numel()} values do not split into groups of {group_size}")
    r = rewards.view(-1, group_size).float()
    adv = r - r.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


# ------------------------------------------------------------------------------------------
# the policy forward: hidden states -> log-prob of given tokens (+ entropy)


@dataclass(frozen=True)
class VocabMask:
    """The vocabulary the sampler draws from, for the trainer's log-probs: the sampler masks the
    rows past the tokenizer (a vocabulary padded for speed) and the vision placeholders, so the
    ratio's numerator must be normalised over the same rows (else it is biased by ln V/V_used,
    0.078 on the embedded model). No [tokens, V] mask is ever built: the padded tail is cut off
    the lm_head (a view), the few masked rows inside it get a -1e9 logit bias. Finite, not -inf:
    p * log p of a masked row must be 0 * (-1e9) = 0 in the entropy, not 0 * inf = nan."""

    keep: int
    """lm_head rows [keep, V) are never sampled: the weight is sliced to [:keep]."""
    bias: torch.Tensor | None
    """[keep] fp32: 0, or -1e9 on the masked rows below ``keep``; None when there are none."""

    @staticmethod
    def build(suppress_ids, vocab_size: int, device) -> VocabMask | None:
        ids = sorted({int(i) for i in suppress_ids if 0 <= int(i) < vocab_size})
        if not ids:
            return None
        keep = vocab_size
        while ids and ids[-1] == keep - 1:  # the contiguous suppressed tail
            keep = ids.pop()
        bias = None
        if ids:
            bias = torch.zeros(keep, dtype=torch.float32, device=device)
            bias[torch.tensor(ids, dtype=torch.long, device=device)] = -1e9
        return VocabMask(keep, bias)

    def apply(self, weight: torch.Tensor, targets: torch.Tensor):
        """(weight rows the sampler uses, targets inside them, bias). Targets outside are only
        those of masked-out positions (padding), clamped to stay in range."""
        return weight[: self.keep], targets.clamp_max(self.keep - 1), self.bias


def token_logprobs(model, inputs: dict, targets: torch.Tensor, start: int, *, temperature: float = 1.0,
                   with_entropy: bool = False, vocab: VocabMask | None = None,
                   image_features: torch.Tensor | None = None, tower_in_forward: bool = True, images=None):
    """Log-probs of ``targets`` [B, T - start] = the tokens at columns start.. of the sequence,
    each predicted from the hidden state one column earlier; never materialises [tokens, V].
    ``vocab``: normalise over the sampler's vocabulary only (see VocabMask).

    ``tower_in_forward=False``: the vision tower does not run here at all (the step's deferred
    tower pass does, staged.vision_reuse); ``image_features`` [Nv, H] stand in for its output
    (None when this micro-batch has no image). ``images`` (a staged.vision_reuse.PromptImages with
    an image): the tower runs here once per distinct image, its features expanded to the rows.

    Bound to the model as an FSDP forward method (``staged.parallel.bind_forward_method``): the
    root's lm_head weight is gathered while this runs and its gradient reduce-scattered after."""
    if images is not None:
        image_features, tower_in_forward = images.per_row(model), False
    if not tower_in_forward:
        with (injected_image_features(model, image_features) if image_features is not None
              else contextlib.nullcontext()):
            hidden = forward_hidden(model, **inputs)
    else:
        # No image on this micro-batch: the vision tower still runs (ranks > 1) so FSDP's collectives
        # line up with ranks that have one (staged.vision_dummy); before the decoder, as real images.
        dummy = dummy_vision_term(model) if "pixel_values" not in inputs else None
        hidden = with_dummy_vision(forward_hidden(model, **inputs), dummy)  # [B, T, H]
    h = hidden[:, start - 1: hidden.shape[1] - 1]
    w, bias = lm_head_weight(model), None
    if vocab is not None:
        w, targets, bias = vocab.apply(w, targets)
    out = fused_linear_logprob(h, w.to(h.dtype), targets, temperature=temperature, bias=bias,
                               return_entropy=with_entropy)
    # The kernel returns [N] reshaped to [B, T]: views, which FSDP warns about as forward outputs
    # (an in-place op on them would drop its pre-backward hook). [B, T] floats: the copy is free.
    return tuple(x.clone() for x in out) if with_entropy else out.clone()


# ------------------------------------------------------------------------------------------
# the loss


def micro_batch_weight(loss_type: str, rows_mb: int, rows_rank: int) -> float:
    """Scale of a micro-batch's loss in the accumulated gradient (see the module doc)."""
    if loss_type in TOKEN_SUM_LOSSES:
        return 1.0  # the kernel divides by num_items_in_batch / num_processes
    return rows_mb / rows_rank


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, cfg, num_items_in_batch: int, world_size: int,
                sampling_logp=None, cu_seqlens=None):
    """One micro-batch's GRPO loss and metrics through ``staged.kernels.grpo_loss`` (TRL semantics).

    logp / old_logp / ref_logp / mask [B, T]; old_logp None = on-policy (logp detached); ref_logp
    None when beta == 0; advantages [B]; sampling_logp: the sampler's log-probs for TRL's
    importance-sampling correction (None = off). cfg: the stage's GRPOConfig. cu_seqlens [B+1]:
    the packed layout instead (all those [N], sequence b owning tokens cu[b]:cu[b+1]; see
    staged.packed_step)
    Returns (loss, metrics: dict of 0-d tensors, no host sync)."""
    # CPU: the kernel's plain-PyTorch path even under TRITON_INTERPRET (which the test suite sets
    # and training subprocesses inherit): interpreted Triton takes ~0.5 s per micro-batch.
    # dual_clip is passed only when set: the loss takes it as a keyword (None = off).
    extra = {"dual_clip": cfg.dual_clip} if cfg.dual_clip is not None else {}
    return grpo_loss(
        logp, old_logp, ref_logp, advantages, mask, cu_seqlens=cu_seqlens, sampling_logp=sampling_logp,
        num_items_in_batch=num_items_in_batch, num_processes=world_size,
        loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, delta=cfg.delta, beta=cfg.beta,
        use_bias_correction_kl=cfg.kl_bias_correction, max_completion_length=cfg.max_response_tokens,
        backend="auto" if logp.is_cuda else "torch", **extra,
    )

