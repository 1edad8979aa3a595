"""Options of the fused GRPO loss: one typed, validated dataclass plus the argument aliases.

The kernel (``staged.kernels.grpo_loss``) and its float64 reference
(``staged.kernels.reference.grpo_loss``) both take their options through
:func:`resolve_options`, so the two can never disagree on a default or an alias.

Defaults are TRL's (``trl.GRPOConfig``, trl 1.16): ``loss_type="dapo"``, ``eps_low=0.2``,
``eps_high=None`` (= ``eps_low``), ``beta=0.0``, ``use_bias_correction_kl=True``,
``vllm_importance_sampling_mode="sequence_mask"`` with ``clip_max=3.0``. Liger-Kernel spells some
of these differently (``epsilon_low``/``epsilon_high``); those spellings are accepted as aliases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

# Loss types whose surrogate is PPO's clipped ``-min(r*A, clip(r)*A)``; they differ only in the
# normaliser. ``delta`` (INTELLECT-2's two-sided clip) only has a meaning for these: TRL and Liger
# ignore it for the others, and so do we.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_TYPES = CLIPPED_LOSS_TYPES + ("cispo", "sapo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
CISPO_VARIANTS = ("trl", "verl")

# Scalar options under another spelling: alias -> canonical name. ``epsilon`` is TRL's name for
# the lower clip; ``epsilon_low``/``epsilon_high`` are Liger's chunked-loss names.
OPTION_ALIASES = {
    "epsilon": "eps_low",
    "epsilon_low": "eps_low",
    "epsilon_high": "eps_high",
}
# Tensor arguments under another spelling (TRL's ``inputs`` keys, Liger's argument names).
TENSOR_ALIASES = {
    "completion_mask": "mask",
    "attention_mask": "mask",
    "old_per_token_logps": "old_logp",
    "ref_per_token_logps": "ref_logp",
    "sampling_per_token_logps": "sampling_logp",
    "importance_sampling_ratio": "vllm_is_ratio",
}


@dataclass(frozen=True)
class GRPOLossOptions:
    """Every scalar option of ``grpo_loss``. Validated on construction; errors name the field."""

    loss_type: str = "dapo"
    """grpo | bnpo | dr_grpo | dapo | luspo | cispo | sapo | vespo (TRL's meanings; see grpo_loss)."""
    importance_sampling_level: str = "token"
    """'token': one ratio per token. 'sequence' (GSPO): exp of the masked mean log-ratio per
    sequence, shared by all its tokens."""
    eps_low: float = 0.2
    """Lower clip: the ratio is clipped below at ``1 - eps_low`` (TRL ``epsilon``)."""
    eps_high: float | None = None
    """Upper clip: ``1 + eps_high`` for clipped losses; for ``cispo`` (TRL) the raw upper bound
    on the detached ratio (ScaleRL recommends 5.0). ``None`` means ``eps_low``, as in TRL."""
    delta: float | None = None
    """INTELLECT-2 two-sided clip: the unclipped ratio is capped at ``delta``. Clipped losses only;
    accepted and ignored (not validated) for cispo / sapo / vespo, as TRL and Liger do."""
    dual_clip: float | None = None
    """Dual-clip PPO's C (Ye et al. 2020; verl ``clip_ratio_c``, EasyR1 ``clip_ratio_dual``): for
    A < 0 the clipped loss is further capped at ``-A * C``, so a huge ratio on a negative-advantage
    token cannot blow the loss up. None = off. Must be > 1. Clipped losses only (grpo, bnpo,
    dr_grpo, dapo, luspo): cispo / vespo have no ratio-in-loss term to bound and sapo's gate is
    already bounded, so dual_clip with them is a ValueError (never silently ignored). Applied to
    the ratio after ``delta`` (with ``delta <= C`` it never fires) and at either importance
    sampling level (GSPO: to the sequence ratio)."""
    beta: float = 0.0
    """k3 KL coefficient. 0 skips every reference-model term (``ref_logp`` may be None)."""
    use_bias_correction_kl: bool = True
    """Multiply the k3 KL by the importance ratio (DeepSeek-V3.2). TRL's default is True,
    Liger's False; ours follows TRL. No effect at ``beta == 0``."""
    cispo_variant: str = "trl"
    """'trl': ``min(r, eps_high)`` (one-sided, raw bound). 'verl': ``clip(r, 1-eps_low,
    1+eps_high)`` (two-sided, relative bounds). Only with ``loss_type='cispo'``."""
    sapo_temperature_pos: float = 1.0
    """SAPO gate temperature for tokens with advantage > 0."""
    sapo_temperature_neg: float = 1.05
    """SAPO gate temperature for tokens with advantage <= 0. Both temperatures are validated only
    for ``loss_type='sapo'`` and ignored otherwise (Liger's functional passes them positionally
    whatever the loss type)."""
    vespo_k_pos: float = 2.0
    """VESPO gamma shape k for sequences with advantage >= 0 (TRL ``vespo_k_pos``)."""
    vespo_lambda_pos: float = 3.0
    """VESPO gamma rate lambda for advantage >= 0 (clamped at >= 1e-4, as TRL does)."""
    vespo_k_neg: float = 3.0
    """VESPO gamma shape k for advantage < 0."""
    vespo_lambda_neg: float = 2.0
    """VESPO gamma rate lambda for advantage < 0. The four are validated only for loss_type='vespo'."""
    vllm_importance_sampling_mode: str = "sequence_mask"
    """How the rollout-engine correction ``exp(old_logp - sampling_logp)`` is built when
    ``sampling_logp`` is given: token_/sequence_ granularity, _truncate (clamp) or _mask (zero)."""
    vllm_importance_sampling_clip_min: float | None = None
    """Lower bound C_min of the vLLM ratio (None: unbounded below)."""
    vllm_importance_sampling_clip_max: float | None = 3.0
    """Upper bound C_max of the vLLM ratio (None: unbounded above)."""
    max_completion_length: int | None = None
    """dr_grpo's constant: the loss is divided by ``B * max_completion_length``. Required there."""
    num_processes: int = 1
    """Data-parallel world size: dapo/cispo divide ``num_items_in_batch`` by it (TRL)."""
    gradient_accumulation_steps: int = 1
    """TRL's ``current_gradient_accumulation_steps``: grpo/bnpo/dr_grpo/sapo/luspo divide the loss
    by it; dapo/cispo multiply their normaliser by it over ``steps_per_generation``."""
    steps_per_generation: int | None = None
    """TRL's ``steps_per_generation`` (None: equal to ``gradient_accumulation_steps``)."""

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"grpo_loss: {name}={getattr(self, name)!r} {why}")

        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"is unknown; expected one of {', '.join(LOSS_TYPES)}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            bad("importance_sampling_level", f"is unknown; expected one of {IMPORTANCE_SAMPLING_LEVELS}")
        if self.eps_high is None:
            object.__setattr__(self, "eps_high", self.eps_low)
        # options a loss type does not read are accepted unchecked, as TRL and Liger ignore them
        # (Liger's functional passes every option positionally, whatever the loss type)
        if self.loss_type in CLIPPED_LOSS_TYPES + ("cispo",):
            for name in ("eps_low", "eps_high"):
                v = getattr(self, name)
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                    bad(name, "must be a finite number >= 0")
        if self.loss_type == "cispo" and self.cispo_variant == "trl" and self.eps_high <= 0:
            bad("eps_high", "must be > 0 for loss_type='cispo' (it caps the detached ratio)")
        if self.delta is not None and self.loss_type not in CLIPPED_LOSS_TYPES:
            # TRL's _compute_loss reads delta only in the clipped branch and trains on without it
            object.__setattr__(self, "delta", None)
        if self.delta is not None and not (isinstance(self.delta, (int, float)) and math.isfinite(self.delta)
                                           and self.delta > 0):
            bad("delta", "must be a finite number > 0 (TRL recommends > 1 + eps_high)")
        if self.dual_clip is not None:
            if self.loss_type not in CLIPPED_LOSS_TYPES:
                raise ValueError(
                    f"grpo_loss: dual_clip={self.dual_clip!r} with loss_type={self.loss_type!r} is not a valid "
                    f"combination: dual-clip caps the clipped surrogate -min(r A, clip(r) A) at -A C for A < 0, "
                    f"and only {', '.join(CLIPPED_LOSS_TYPES)} have one (pass dual_clip=None)")
            if isinstance(self.dual_clip, bool) or not (isinstance(self.dual_clip, (int, float))
                                                        and math.isfinite(self.dual_clip) and self.dual_clip > 1):
                bad("dual_clip", "must be None or a finite number > 1 (verl asserts clip_ratio_c > 1; "
                                 "the paper's recipe uses 3)")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            bad("beta", "must be a finite number >= 0")
        if self.cispo_variant not in CISPO_VARIANTS:
            bad("cispo_variant", f"is unknown; expected one of {CISPO_VARIANTS}")
        if self.cispo_variant != "trl" and self.loss_type != "cispo":
            raise ValueError(
                f"grpo_loss: cispo_variant={self.cispo_variant!r} with loss_type={self.loss_type!r} is "
                f"not a valid combination: cispo_variant only applies to loss_type='cispo'")
        if self.loss_type == "sapo":
            for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
                v = getattr(self, name)
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                    bad(name, "must be a finite number > 0")
        if self.loss_type == "vespo":
            for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
                v = getattr(self, name)
                if not (isinstance(v, (int, float)) and math.isfinite(v)):
                    bad(name, "must be a finite number")
        if self.vllm_importance_sampling_mode not in VLLM_IS_MODES:
            bad("vllm_importance_sampling_mode", f"is unknown; expected one of {VLLM_IS_MODES}")
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        for name, v in (("vllm_importance_sampling_clip_min", lo), ("vllm_importance_sampling_clip_max", hi)):
            if v is not None and not (math.isfinite(v) and v >= 0):
                bad(name, "must be None or a finite number >= 0")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"grpo_loss: vllm_importance_sampling_clip_min={lo} > "
                             f"vllm_importance_sampling_clip_max={hi}")
        if self.vllm_importance_sampling_mode.endswith("truncate") and lo is None and hi is None:
            raise ValueError(
                f"grpo_loss: vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} with "
                f"both vllm_importance_sampling_clip_min and _clip_max None truncates nothing "
                f"(TRL's torch.clamp raises here too); set at least one bound")
        if self.loss_type == "dr_grpo":
            if self.max_completion_length is None:
                raise ValueError("grpo_loss: loss_type='dr_grpo' needs max_completion_length (the loss "
                                 "is divided by B * max_completion_length); got None")
        if self.loss_type == "dr_grpo" and not (
                isinstance(self.max_completion_length, int) and self.max_completion_length > 0):
            bad("max_completion_length", "must be a positive int")
        for name in ("num_processes", "gradient_accumulation_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                bad(name, "must be an int >= 1")
        if self.steps_per_generation is None:
            object.__setattr__(self, "steps_per_generation", self.gradient_accumulation_steps)
        if not (isinstance(self.steps_per_generation, int) and self.steps_per_generation >= 1):
            bad("steps_per_generation", "must be an int >= 1")

    # ---- derived switches, shared by the kernel launcher and the reference ----
    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"

    @property
    def vllm_is_sequence(self) -> bool:
        return self.vllm_importance_sampling_mode.startswith("sequence")

    @property
    def vllm_is_truncate(self) -> bool:
        return self.vllm_importance_sampling_mode.endswith("truncate")


_OPTION_NAMES = {f.name for f in fields(GRPOLossOptions)}


def resolve_options(kwargs: dict) -> GRPOLossOptions:
    """Build the options from keyword arguments, mapping aliases to canonical names.

    Raises ``ValueError`` when a name and its alias are both given, ``TypeError`` on an unknown
    keyword (as Python does for a misspelt argument)."""
    canon: dict = {}
    for key, value in kwargs.items():
        name = OPTION_ALIASES.get(key, key)
        if name not in _OPTION_NAMES:
            raise TypeError(f"grpo_loss: unexpected keyword argument {key!r}")
        if name in canon:
            raise ValueError(f"grpo_loss: {name!r} given twice (as {key!r} and under another spelling)")
        canon[name] = value
    return GRPOLossOptions(**canon)


def resolve_tensor_aliases(named: dict, aliases: dict) -> dict:
    """Merge tensor arguments given under alias spellings into ``named`` (canonical -> tensor)."""
    out = dict(named)
    for key, value in aliases.items():
        if key not in TENSOR_ALIASES:
            raise TypeError(f"grpo_loss: unexpected keyword argument {key!r}")
        name = TENSOR_ALIASES[key]
        if out.get(name) is not None:
            raise ValueError(f"grpo_loss: {name!r} given twice (as {name!r} and as {key!r})")
        out[name] = value
    return out


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """Split ``**kwargs`` into (tensor aliases, scalar options)."""
    tensors = {k: v for k, v in kwargs.items() if k in TENSOR_ALIASES}
    options = {k: v for k, v in kwargs.items() if k not in TENSOR_ALIASES}
    return tensors, options


# ---------------------------------------------------------------------------------------------
# Inputs: one validation path for the kernel and the reference, so both reject the same things.
# Only shapes, dtypes and devices are checked here: reading cu_seqlens' values would be a host
# sync, so the launcher checks those on the device instead (torch._assert_async).

@dataclass
class GRPOInputs:
    """Validated inputs, flattened to one token axis [N] (row b owns tokens
    ``cu_seqlens[b]:cu_seqlens[b+1]``, or ``b*T:(b+1)*T`` in the padded layout)."""

    shape: tuple                          # logp's shape: the gradient goes back in it
    packed: bool
    B: int                                # sequences
    T: int                                # padded row length (0 when packed)
    N: int                                # tokens
    logp: torch.Tensor                    # [N] float
    old_logp: torch.Tensor | None         # [N] float; None = on-policy (old = logp.detach())
    ref_logp: torch.Tensor | None         # [N] float; kept only when beta != 0
    sampling_logp: torch.Tensor | None    # [N] float: the rollout engine's log-probs
    is_ratio_token: torch.Tensor | None   # [N] float: a precomputed per-token vLLM ratio
    is_ratio_row: torch.Tensor | None     # [B] float: a precomputed per-sequence vLLM ratio
    mask: torch.Tensor | None             # [N] bool/int/float; None = all ones
    advantages: torch.Tensor              # [B] float
    cu_seqlens: torch.Tensor | None       # [B+1] int32/int64 (packed only)


def prepare_inputs(opts: GRPOLossOptions, logp, old_logp, ref_logp, advantages, mask,
                   cu_seqlens, sampling_logp, vllm_is_ratio) -> GRPOInputs:
    if not isinstance(logp, torch.Tensor) or not logp.is_floating_point():
        raise ValueError(f"grpo_loss: logp must be a floating tensor; got "
                         f"{type(logp).__name__ if not isinstance(logp, torch.Tensor) else logp.dtype}")
    device = logp.device
    if cu_seqlens is None:
        if logp.dim() != 2:
            raise ValueError(f"grpo_loss: padded layout needs logp of shape [B, T]; got {tuple(logp.shape)} "
                             f"(pass cu_seqlens for the packed layout)")
        B, T = logp.shape
        packed = False
    else:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("grpo_loss: cu_seqlens must be a 1-D int32/int64 tensor [B+1] with B >= 1; got "
                             f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} "
                             f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
        if cu_seqlens.device != device:
            raise ValueError(f"grpo_loss: cu_seqlens is on {cu_seqlens.device}, logp on {device}")
        B, T = cu_seqlens.numel() - 1, 0
        packed = True
    N = logp.numel()
    if B == 0:
        raise ValueError("grpo_loss: empty batch (B = 0 sequences)")

    def token(name, t, float_only=True):
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"grpo_loss: {name} must be a tensor; got {type(t).__name__}")
        if tuple(t.shape) != tuple(logp.shape):
            raise ValueError(f"grpo_loss: {name} has shape {tuple(t.shape)}, logp {tuple(logp.shape)}")
        if t.device != device:
            raise ValueError(f"grpo_loss: {name} is on {t.device}, logp on {device}")
        if float_only and not t.is_floating_point():
            raise ValueError(f"grpo_loss: {name} must be floating; got {t.dtype}")
        if not float_only and t.is_complex():
            raise ValueError(f"grpo_loss: {name} must be bool, integer or floating; got {t.dtype}")
        return t.reshape(-1).contiguous()

    def row(name, t):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"grpo_loss: {name} must be a tensor [B]; got {type(t).__name__}")
        if tuple(t.shape) not in ((B,), (B, 1)):
            raise ValueError(f"grpo_loss: {name} has shape {tuple(t.shape)}; expected ({B},) or ({B}, 1) "
                             f"(one value per sequence, B = {B})")
        if t.device != device:
            raise ValueError(f"grpo_loss: {name} is on {t.device}, logp on {device}")
        if not t.is_floating_point():
            raise ValueError(f"grpo_loss: {name} must be floating; got {t.dtype}")
        return t.reshape(-1).contiguous()

    if advantages is None:
        raise ValueError("grpo_loss: advantages [B] are required")
    adv = row("advantages", advantages)
    if opts.beta != 0.0 and ref_logp is None:
        raise ValueError(f"grpo_loss: beta={opts.beta} needs ref_logp (the KL term reads it); got None")
    if sampling_logp is not None and vllm_is_ratio is not None:
        raise ValueError("grpo_loss: sampling_logp and vllm_is_ratio are both given; pass one: the "
                         "rollout log-probs (the ratio is then built in the kernel) or a precomputed ratio")
    if opts.loss_type == "vespo" and sampling_logp is not None and opts.vllm_is_sequence:
        raise ValueError(f"grpo_loss: loss_type='vespo' needs a token-level vLLM ratio "
                         f"(vllm_importance_sampling_mode token_truncate or token_mask); got "
                         f"{opts.vllm_importance_sampling_mode!r} (TRL raises here too)")
    is_tok = is_row = None
    if vllm_is_ratio is not None:
        if isinstance(vllm_is_ratio, torch.Tensor) and tuple(vllm_is_ratio.shape) == tuple(logp.shape):
            is_tok = token("vllm_is_ratio", vllm_is_ratio)
        else:
            is_row = row("vllm_is_ratio", vllm_is_ratio)
    return GRPOInputs(
        shape=tuple(logp.shape), packed=packed, B=B, T=T, N=N,
        logp=logp.reshape(-1).contiguous(),
        old_logp=token("old_logp", old_logp),
        ref_logp=token("ref_logp", ref_logp) if opts.beta != 0.0 else None,
        sampling_logp=token("sampling_logp", sampling_logp),
        is_ratio_token=is_tok, is_ratio_row=is_row,
        mask=token("mask", mask, float_only=False),
        advantages=adv,
        cu_seqlens=cu_seqlens.contiguous() if packed else None,
    )


def check_num_items(num_items_in_batch):
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"grpo_loss: num_items_in_batch must hold one number; got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        return num_items_in_batch
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise ValueError(f"grpo_loss: num_items_in_batch must be a number or a 1-element tensor; got "
                         f"{type(num_items_in_batch).__name__}")
    return num_items_in_batch


def resolve_call(logp, old_logp, ref_logp, advantages, mask, cu_seqlens, sampling_logp,
                 vllm_is_ratio, kwargs: dict):
    """The common front half of ``grpo_loss`` and its reference: aliases resolved, options
    validated, inputs checked and laid out. Returns ``(opts, inp)``."""
    tensor_aliases, option_kwargs = split_kwargs(kwargs)
    named = resolve_tensor_aliases(
        dict(old_logp=old_logp, ref_logp=ref_logp, mask=mask, sampling_logp=sampling_logp,
             vllm_is_ratio=vllm_is_ratio), tensor_aliases)
    opts = resolve_options(option_kwargs)
    inp = prepare_inputs(opts, logp, named["old_logp"], named["ref_logp"], advantages, named["mask"],
                         cu_seqlens, named["sampling_logp"], named["vllm_is_ratio"])
    return opts, inp
