"""FusedLinearGRPOLoss: final hidden states + lm_head weight -> GRPO loss, with no [N, V] logits.

A drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (same constructor and forward
arguments, same ``(loss, metrics)`` return) built on our two kernels:

    hidden [B, T, H] | [N, H] --fused_linear_logprob(weight [V, H], ids, temperature)--> logp [B, T] | [N]
    logp (+ old / ref / sampling log-probs, advantages [B], mask) --grpo_loss--> loss, metrics

Shapes and dtypes
    _input / hidden          : [B, T, H] padded (or [B*T, H] with ids [B, T]), or [N, H] packed with
                               ``cu_seqlens`` [B+1]; bf16 / fp16 / fp32 (fp64 on backend="torch")
    lin_weight               : [V, H] tensor (plain, or an FSDP2 DTensor shard), or the lm_head module
    bias                     : [V] optional
    selected_token_ids       : [B, T] | [N] int32 / int64 (the sampled tokens)
    attention_mask           : like the ids (the completion mask; bool / int / float weights), or None
    advantages               : [B] | [B, 1] float
    old/ref_per_token_logps  : like the ids, optional
    loss -> 0-d; metrics -> GRPOMetrics (a tuple in Liger's order that also maps names -> 0-d tensors)

Cost: the lm_head GEMMs dominate: 8 N H V FLOPs (fused_linear_logprob's recompute design), plus
2 N H V without grad for a reference model given as (ref_input, ref_weight). Every position is
scored, masked ones included (finding only the valid ones would be a host sync); pack sequences
(``cu_seqlens``) to keep that waste small. Masked positions are neutralised before the GEMM
(hidden row zeroed, target 0), so garbage there (NaN from a fully masked attention row, -100
ids) never reaches the loss, the metrics or the weight gradient; that costs one N x H pass.
Host syncs: none on CUDA (the CPU path of fused_linear_logprob validates targets on the host).

Semantics: TRL's (``staged.kernels.grpo_loss``). Where the defaults follow TRL rather than Liger:
``beta`` 0.0 (Liger 0.04), ``use_bias_correction_kl`` True (Liger False), ``epsilon_high`` None =
``epsilon_low`` (Liger 0.2, the same value by default), ``use_ref_model`` None = ``beta != 0``
(Liger True). See ``grpo_loss`` for the few loss types and metrics where Liger differs from TRL.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .grpo_loss import grpo_loss
from .grpo_options import resolve_options
from .linear_logprob import fused_linear_logprob

# Liger's positional metrics are (kl if beta != 0, clip ratio); the clip ratio is TRL's
# clip_ratio/region_mean (for cispo: TRL's cispo_clip_ratio).
_LIGER_CLIP_METRIC = "clip_ratio/region_mean"


class GRPOMetrics(tuple):
    """Metrics of one loss call: a tuple in Liger's order — ``(kl, clip_ratio)`` when beta != 0,
    else ``(clip_ratio,)`` — so code written for Liger unpacks it unchanged, that is also indexed
    by name: ``m["kl"]``, ``m["entropy"]``, ``m.keys()``, ``dict(m)``. Names: ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``kl`` (beta != 0), ``ratio_mean``,
    ``num_tokens``, ``entropy`` (return_entropy). All 0-d detached device tensors."""

    def __new__(cls, named: dict, beta: float = 0.0):
        order = (["kl"] if beta != 0.0 else []) + [_LIGER_CLIP_METRIC]
        obj = super().__new__(cls, tuple(named[k] for k in order))
        obj._named = dict(named)
        obj._beta = beta
        return obj

    def __getnewargs__(self):  # pickle / deepcopy
        return (self._named, self._beta)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._named[key]
        return super().__getitem__(key)

    def __contains__(self, key):
        if isinstance(key, str):
            return key in self._named
        return any(key is v for v in tuple.__iter__(self))

    def get(self, key, default=None):
        return self._named.get(key, default)

    def keys(self):
        return self._named.keys()

    def items(self):
        return self._named.items()

    def as_dict(self) -> dict:
        return dict(self._named)

    def __repr__(self):
        return f"GRPOMetrics({', '.join(f'{k}={v.item() if v.numel() == 1 else v}' for k, v in self._named.items())})"


# ---------------------------------------------------------------------------------------------
# lm_head: LoRA / peft detection, FSDP2 DTensor gather


def _is_dtensor(t) -> bool:
    if not isinstance(t, torch.Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def resolve_lm_head(lm_head: nn.Module, name: str = "lm_head"):
    """(weight, bias) of an output-projection module, refusing wrappers whose trainable part the
    fused loss would bypass. A peft LoRA on the lm_head (``lora_A``/``lora_B``, or any peft tuner's
    ``base_layer``) adds ``B @ A`` to the logits: calling the fused loss with the base weight would
    train nothing there while looking fine, so it is an error. So is peft's ``modules_to_save``
    wrapper (``original_module``)."""
    if not isinstance(lm_head, nn.Module):
        raise ValueError(f"{name} must be an nn.Module or a weight tensor; got {type(lm_head).__name__}")
    kind = type(lm_head).__name__
    if hasattr(lm_head, "lora_A") or hasattr(lm_head, "lora_B") or hasattr(lm_head, "base_layer"):
        raise ValueError(
            f"FusedLinearGRPOLoss: {name} is a peft/LoRA-wrapped layer ({kind}); the fused loss reads "
            f"the lm_head weight directly, so the adapter (lora_A/lora_B) would get no gradient and "
            f"silently not train. Remove 'lm_head' from the LoRA target_modules (train it fully via "
            f"modules_to_save and pass that copy's weight, or keep it frozen), or merge the adapter "
            f"into the weight first.")
    if hasattr(lm_head, "original_module") and hasattr(lm_head, "modules_to_save"):
        raise ValueError(
            f"FusedLinearGRPOLoss: {name} is peft's ModulesToSaveWrapper ({kind}); pass the active "
            f"trainable copy's weight (lm_head.modules_to_save[adapter].weight) explicitly")
    weight = getattr(lm_head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"FusedLinearGRPOLoss: {name} ({kind}) has no weight tensor")
    bias = getattr(lm_head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def gather_full(t, name: str = "weight"):
    """A plain full tensor from a DTensor parameter (FSDP2 / HSDP shard), keeping autograd.

    ``full_tensor(grad_placements=[Partial()])`` all-gathers in forward; in backward each rank's
    gradient of the full weight is a partial sum, so DTensor reduce-scatters it back into a
    gradient shaped like the shard (a DTensor in ``.grad``, where FSDP2 keeps it). The gradient is
    divided by the mesh size first: the result is the mean over ranks, FSDP2's default data-parallel
    reduction (a tensor-parallel mesh dimension, whose ranks see identical gradients, averages to
    the same value). Gradients are reduced on every call, also under
    ``set_requires_gradient_sync(False)``. Plain tensors pass through unchanged.
    """
    if t is None or not _is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial

    mesh = t.device_mesh
    full = t.full_tensor(grad_placements=[Partial("sum")] * mesh.ndim)
    if t.requires_grad and torch.is_grad_enabled():
        full = _ScaleGrad.apply(full, 1.0 / mesh.size())
    return full


def _resolve_weight(w, b, what: str):
    if isinstance(w, nn.Module):
        w, mb = resolve_lm_head(w, what)
        b = mb if b is None else b
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"FusedLinearGRPOLoss: {what} must be a [V, H] tensor or the lm_head module; "
                         f"got {type(w).__name__}")
    return gather_full(w, what), gather_full(b, f"{what} bias")


# ---------------------------------------------------------------------------------------------
# functional


def fused_linear_grpo_loss(hidden, weight, selected_token_ids, mask, advantages, *, bias=None,
                           old_logp=None, ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                           cu_seqlens=None, sampling_logp=None, vllm_is_ratio=None, num_items_in_batch=None,
                           temperature: float = 1.0, use_ref_model: bool | None = None,
                           return_entropy: bool = False, backend: str = "auto",
                           logit_dtype: torch.dtype | None = None, **options):
    """GRPO loss straight from final hidden states. Returns ``(loss, GRPOMetrics)``.

    hidden [B, T, H] (padded; [B*T, H] is accepted with ids [B, T]) or [N, H] with ``cu_seqlens``
    [B+1] (packed); weight [V, H] (a tensor, an FSDP2 DTensor shard — gathered with autograd, see
    ``gather_full`` — or the lm_head module, which is checked for LoRA); ``bias`` [V]; ids and
    ``mask`` like hidden without H; advantages [B]. ``old_logp`` None = on-policy. With beta != 0
    the reference log-probs are ``ref_logp``, or computed here without grad from ``ref_hidden`` and
    ``ref_weight`` (+ ``ref_bias``) at the same temperature. ``use_ref_model=False`` with beta != 0
    uses the policy's own detached log-probs as the reference (KL = 0; any reference given is
    ignored), as Liger does.
    ``options``: every ``grpo_loss`` option (loss_type, eps_low / epsilon_low, eps_high /
    epsilon_high, beta, delta, importance_sampling_level, use_bias_correction_kl, ...), TRL's
    defaults. ``backend`` goes to both kernels. A frozen weight / bias (requires_grad False) gets
    no gradient and costs no dW GEMM. Hidden is cast to the weight's dtype when they differ (an
    fp32 lm_head under bf16 autocast), and autocast is off inside: the kernels pick their precision,
    unless ``logit_dtype`` (bf16 / fp16) asks for the lm_head as autocast runs it (see
    ``fused_linear_logprob``; the TRL adapter passes it under ``bf16=True``, as TRL does).
    """
    opts = resolve_options(dict(options))  # validate early; grpo_loss re-parses the same dict
    beta = opts.beta
    if use_ref_model is None:
        use_ref_model = beta != 0.0
    weight, bias = _resolve_weight(weight, bias, "lin_weight")
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise ValueError(f"FusedLinearGRPOLoss: hidden (_input) must be a float tensor; got "
                         f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
    if _is_dtensor(hidden):
        raise ValueError("FusedLinearGRPOLoss: hidden (_input) is a DTensor (sequence/tensor parallel); "
                         "pass the local full hidden states (e.g. hidden.full_tensor())")
    if not isinstance(selected_token_ids, torch.Tensor) or selected_token_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"FusedLinearGRPOLoss: selected_token_ids must be an int32/int64 tensor; got "
                         f"{getattr(selected_token_ids, 'dtype', type(selected_token_ids).__name__)}")
    if weight.dim() != 2:
        raise ValueError(f"FusedLinearGRPOLoss: lin_weight must be [V, H]; got shape {tuple(weight.shape)}")
    V, H = weight.shape
    ids = selected_token_ids
    if hidden.dim() < 1 or hidden.shape[-1] != H:
        raise ValueError(f"FusedLinearGRPOLoss: hidden {tuple(hidden.shape)} must end in H = {H} "
                         f"(lin_weight is [V, H] = [{V}, {H}])")
    if tuple(hidden.shape[:-1]) != tuple(ids.shape):
        if hidden.dim() == 2 and hidden.shape[0] == ids.numel():  # Liger's documented [B*T, H]
            hidden = hidden.reshape(*ids.shape, H)
        else:
            raise ValueError(f"FusedLinearGRPOLoss: hidden {tuple(hidden.shape)} does not match "
                             f"selected_token_ids {tuple(ids.shape)} (expected hidden [*ids.shape, {H}])")
    if cu_seqlens is None and ids.dim() != 2:
        raise ValueError(f"FusedLinearGRPOLoss: padded layout needs selected_token_ids [B, T]; got "
                         f"{tuple(ids.shape)} (pass cu_seqlens for the packed layout)")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        raise ValueError(f"FusedLinearGRPOLoss: attention_mask must be a tensor shaped like "
                         f"selected_token_ids {tuple(ids.shape)}; got {tuple(getattr(mask, 'shape', ()))}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"FusedLinearGRPOLoss: temperature must be a finite number > 0; got {temperature!r}")

    # ---- positions the loss reads: mask != 0, and inside a sequence (packed) ----
    valid = None if mask is None else mask != 0
    if cu_seqlens is not None and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.numel() >= 2:
        pos = torch.arange(ids.numel(), device=ids.device).view(ids.shape)
        cu = cu_seqlens.to(device=ids.device, dtype=torch.int64)
        inside = (pos >= cu[0]) & (pos < cu[-1])
        valid = inside if valid is None else valid & inside
    if valid is not None:
        # padding ids (-100, V) and hidden rows (NaN) never reach the GEMM (no ignore_index there)
        ids = torch.where(valid, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
        hidden = torch.where(valid.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)

    with torch.autocast(hidden.device.type, enabled=False):
        out = fused_linear_logprob(hidden, weight, ids, temperature=float(temperature), bias=bias,
                                   return_entropy=return_entropy, backend=backend, logit_dtype=logit_dtype)
        logp, entropy = out if return_entropy else (out, None)

        # ---- reference log-probs (beta != 0) ----
        if beta != 0.0 and not use_ref_model:
            ref_logp = logp.detach()  # Liger's use_ref_model=False: KL against itself = 0
        elif beta != 0.0 and ref_logp is None:
            if ref_hidden is not None and ref_weight is not None:
                with torch.no_grad():
                    rw, rb = _resolve_weight(ref_weight, ref_bias, "ref_weight")
                    rh = ref_hidden
                    if tuple(rh.shape[:-1]) != tuple(ids.shape) and rh.dim() == 2 and rh.shape[0] == ids.numel():
                        rh = rh.reshape(*ids.shape, rh.shape[-1])
                    if valid is not None and tuple(rh.shape[:-1]) == tuple(ids.shape):
                        rh = torch.where(valid.unsqueeze(-1), rh, torch.zeros((), dtype=rh.dtype, device=rh.device))
                    ref_logp = fused_linear_logprob(rh.to(rw.dtype), rw, ids, temperature=float(temperature),
                                                    bias=rb, backend=backend, logit_dtype=logit_dtype)
            else:
                raise ValueError(
                    f"FusedLinearGRPOLoss: beta={beta} with use_ref_model needs ref_per_token_logps, or "
                    f"ref_input and ref_weight to compute them; got none")
        elif ref_logp is not None and ref_hidden is not None and beta != 0.0:
            warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.",
                          stacklevel=3)

        loss, named = grpo_loss(logp, old_logp, ref_logp, advantages, mask, cu_seqlens=cu_seqlens,
                                sampling_logp=sampling_logp, vllm_is_ratio=vllm_is_ratio,
                                num_items_in_batch=num_items_in_batch, backend=backend, **options)

    if return_entropy:
        with torch.no_grad():
            w = torch.ones_like(entropy) if mask is None else mask.to(entropy.dtype)
            if valid is not None:
                w = torch.where(valid, w, torch.zeros((), dtype=w.dtype, device=w.device))
            ent = torch.where(w != 0, entropy.detach(), torch.zeros((), dtype=entropy.dtype, device=entropy.device))
            named = dict(named)
            named["entropy"] = (ent * w).sum() / w.sum().clamp(min=1.0)
    return loss, GRPOMetrics(named, beta)


# ---------------------------------------------------------------------------------------------
# module


class FusedLinearGRPOLoss(nn.Module):
    """Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (same constructor and
    forward arguments, same ``(loss, metrics)`` return; ``metrics`` also maps names, see
    ``GRPOMetrics``), with TRL's semantics and defaults and our fused kernels.

    Constructor (Liger's arguments, in Liger's order):
        beta (0.0; Liger 0.04), compiled (accepted, no effect: the kernels are already fused),
        use_ref_model (None = beta != 0; Liger True), chunk_size (accepted, no effect: nothing is
        chunked by sequence), epsilon_low (0.2), epsilon_high (None = epsilon_low; Liger 0.2),
        loss_type ("dapo"), max_completion_length (dr_grpo), importance_sampling_level ("token"),
        sapo_temperature_pos / _neg (1.0 / 1.05), temperature (1.0), delta (None),
        use_bias_correction_kl (True; Liger False), vespo_k_pos / _lambda_pos / _k_neg / _lambda_neg
        (2, 3, 3, 2). Options a loss type does not use (delta for cispo / sapo / vespo, the SAPO
        temperatures, the VESPO shapes) are accepted and ignored, as TRL and Liger do.
    Keyword-only extras: ``return_entropy`` (adds ``metrics["entropy"]``, the masked mean entropy
    of the tempered distribution), ``backend`` ("auto" | "triton" | "torch"), and any other
    ``grpo_loss`` option (``gradient_accumulation_steps``, ``num_processes``,
    ``steps_per_generation``, ``cispo_variant``, ``vllm_importance_sampling_mode`` / ``_clip_min`` /
    ``_clip_max``).

    forward(_input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
            ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
            ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None, *, cu_seqlens=None,
            sampling_per_token_logps=None) -> (loss, GRPOMetrics)
    ``lin_weight`` may be the lm_head module itself (its bias is used when ``bias`` is None; a LoRA
    wrapper raises). Packed layout: ``_input`` [N, H], ids / mask / log-probs [N], ``cu_seqlens``.
    """

    def __init__(self, beta: float = 0.0, compiled: bool = True, use_ref_model: bool | None = None,
                 chunk_size: int = 1, epsilon_low: float = 0.2, epsilon_high: float | None = None,
                 loss_type: str = "dapo", max_completion_length: int | None = None,
                 importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, temperature: float = 1.0, delta: float | None = None,
                 use_bias_correction_kl: bool = True, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                 vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, *, return_entropy: bool = False,
                 backend: str = "auto", **grpo_options):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"FusedLinearGRPOLoss: temperature must be a finite number > 0; got {temperature!r}")
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"FusedLinearGRPOLoss: chunk_size must be an int >= 1; got {chunk_size!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"FusedLinearGRPOLoss: backend must be 'auto', 'triton' or 'torch'; got {backend!r}")
        self.options = dict(beta=beta, eps_low=epsilon_low, eps_high=epsilon_high, loss_type=loss_type,
                            max_completion_length=max_completion_length,
                            importance_sampling_level=importance_sampling_level,
                            sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                            delta=delta, use_bias_correction_kl=use_bias_correction_kl,
                            vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
                            vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, **grpo_options)
        self.opts = resolve_options(self.options)  # raises now, naming the field
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = (beta != 0.0) if use_ref_model is None else bool(use_ref_model)
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = self.opts.eps_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = float(temperature)
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.return_entropy = return_entropy
        self.backend = backend

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None, *, cu_seqlens=None,
                sampling_per_token_logps=None):
        return fused_linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=bias,
            old_logp=old_per_token_logps, ref_logp=ref_per_token_logps, ref_hidden=ref_input,
            ref_weight=ref_weight, ref_bias=ref_bias, cu_seqlens=cu_seqlens,
            sampling_logp=sampling_per_token_logps, vllm_is_ratio=vllm_is_ratio,
            num_items_in_batch=num_items_in_batch, temperature=self.temperature,
            use_ref_model=self.use_ref_model, return_entropy=self.return_entropy, backend=self.backend,
            **self.options)

    def extra_repr(self) -> str:
        o = self.opts
        return (f"loss_type={o.loss_type!r}, beta={o.beta}, eps=({o.eps_low}, {o.eps_high}), "
                f"level={o.importance_sampling_level!r}, temperature={self.temperature}, backend={self.backend!r}")


# ---------------------------------------------------------------------------------------------
# Liger's positional functional

# Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOFunction.forward`` arguments after ``ctx``, in order.
LIGER_GRPO_ARGS = (
    "_input", "weight", "selected_token_ids", "attention_mask", "advantages", "bias",
    "ref_per_token_logps", "old_per_token_logps", "ref_input", "ref_weight", "ref_bias",
    "beta", "epsilon_low", "epsilon_high", "loss_type", "max_completion_length",
    "importance_sampling_level", "sapo_temperature_pos", "sapo_temperature_neg", "temperature",
    "compiled", "use_ref_model", "chunk_size", "vllm_is_ratio", "delta", "use_bias_correction_kl",
    "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "num_items_in_batch",
)
# Where a value is omitted: TRL's defaults where TRL has the option (beta 0, bias-corrected KL,
# epsilon_high = epsilon_low, use_ref_model = beta != 0), Liger's otherwise.
_LIGER_GRPO_DEFAULTS = dict(
    bias=None, ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
    ref_bias=None, beta=0.0, epsilon_low=0.2, epsilon_high=None, loss_type="dapo", max_completion_length=None,
    importance_sampling_level="token", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, temperature=1.0,
    compiled=True, use_ref_model=None, chunk_size=1, vllm_is_ratio=None, delta=None, use_bias_correction_kl=True,
    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, num_items_in_batch=None,
)


class FusedLinearGRPOFunction:
    """Twin of ``liger_kernel.chunked_loss.grpo_loss.LigerFusedLinearGRPOFunction``: ``.apply``
    takes Liger 0.8.5's arguments positionally (or by name) in Liger's order — see
    ``LIGER_GRPO_ARGS`` — and returns ``(loss, GRPOMetrics)``. ``compiled`` and ``chunk_size`` are
    accepted and ignored (the kernels are fused already). Semantics and defaults are TRL's, as for
    ``FusedLinearGRPOLoss`` (README: "Using the fused loss in your trainer" lists where Liger differs).

    Not an ``autograd.Function`` itself: it composes two of them (``fused_linear_logprob`` and
    ``grpo_loss``), so gradients flow to ``_input``, ``weight`` and ``bias`` as with Liger's."""

    @staticmethod
    def apply(*args, **kwargs):
        if len(args) > len(LIGER_GRPO_ARGS):
            raise TypeError(f"LigerFusedLinearGRPOFunction.apply takes at most {len(LIGER_GRPO_ARGS)} "
                            f"positional arguments ({len(args)} given)")
        named = dict(zip(LIGER_GRPO_ARGS, args))
        for k, v in kwargs.items():
            if k not in LIGER_GRPO_ARGS:
                raise TypeError(f"LigerFusedLinearGRPOFunction.apply got an unexpected keyword argument {k!r}")
            if k in named:
                raise TypeError(f"LigerFusedLinearGRPOFunction.apply got multiple values for argument {k!r}")
            named[k] = v
        missing = [k for k in LIGER_GRPO_ARGS[:5] if k not in named]
        if missing:
            raise TypeError(f"LigerFusedLinearGRPOFunction.apply missing required arguments: {missing}")
        a = {**_LIGER_GRPO_DEFAULTS, **named}
        chunk_size = a["chunk_size"]
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"LigerFusedLinearGRPOFunction: chunk_size must be an int >= 1; got {chunk_size!r}")
        return fused_linear_grpo_loss(
            a["_input"], a["weight"], a["selected_token_ids"], a["attention_mask"], a["advantages"],
            bias=a["bias"], old_logp=a["old_per_token_logps"], ref_logp=a["ref_per_token_logps"],
            ref_hidden=a["ref_input"], ref_weight=a["ref_weight"], ref_bias=a["ref_bias"],
            vllm_is_ratio=a["vllm_is_ratio"], num_items_in_batch=a["num_items_in_batch"],
            temperature=a["temperature"], use_ref_model=a["use_ref_model"],
            beta=a["beta"], eps_low=a["epsilon_low"], eps_high=a["epsilon_high"], loss_type=a["loss_type"],
            max_completion_length=a["max_completion_length"],
            importance_sampling_level=a["importance_sampling_level"],
            sapo_temperature_pos=a["sapo_temperature_pos"], sapo_temperature_neg=a["sapo_temperature_neg"],
            delta=a["delta"], use_bias_correction_kl=a["use_bias_correction_kl"],
            vespo_k_pos=a["vespo_k_pos"], vespo_lambda_pos=a["vespo_lambda_pos"],
            vespo_k_neg=a["vespo_k_neg"], vespo_lambda_neg=a["vespo_lambda_neg"])


LigerFusedLinearGRPOFunction = FusedLinearGRPOFunction
liger_fused_linear_grpo = FusedLinearGRPOFunction.apply  # Liger's chunked_loss.functional name


__all__ = ["FusedLinearGRPOLoss", "fused_linear_grpo_loss", "GRPOMetrics", "resolve_lm_head", "gather_full",
           "FusedLinearGRPOFunction", "LigerFusedLinearGRPOFunction", "liger_fused_linear_grpo", "LIGER_GRPO_ARGS"]
