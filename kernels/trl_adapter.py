"""Put staged's fused GRPO loss into TRL's ``GRPOTrainer`` (trl >= 1.16).

TRL's ``_compute_loss`` runs the model with its own fused LM head (log-probs and entropies of the
completion tokens, chunked, in fp32), then the GRPO loss in eager PyTorch. The adapter replaces
that with one call of :func:`staged.kernels.fused_linear_grpo.fused_linear_grpo_loss` on the last
hidden states: log-probs, entropy and the loss in our kernels (Triton on CUDA), no [tokens x vocab]
logits, the same loss value, gradients and logged metrics as TRL's own path.

Usage::

    from trl import GRPOConfig, GRPOTrainer
    from staged.kernels.trl_adapter import patch_grpo_trainer

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    patch_grpo_trainer(trainer)   # in place, before train(); returns the trainer
    trainer.train()

or ``from staged.kernels.trl_adapter import FusedGRPOTrainer`` — a ``GRPOTrainer`` subclass that
patches itself (built on first access, so importing this module never imports trl).

How: the policy model (under peft, its base model — where TRL puts its own fused head) gets a
``forward`` wrapper that, only when called with ``staged_fused_grpo=...``, runs the backbone
(``model.base_model``) and the fused loss inside the model's forward: wrappers that hook the
forward (FSDP2 unshard / reshard, DDP, accelerate autocast) see a normal call, and the lm_head
weight is read there — gathered with autograd if it is still an FSDP2 DTensor shard. Every other
call (generation, TRL's log-prob passes for old / reference log-probs) goes to the forward TRL
installed, unchanged.

Every TRL option the loss reads is taken from the trainer at each call (loss_type, epsilon,
epsilon_high, delta, beta, use_bias_correction_kl, importance_sampling_level, SAPO temperatures,
VESPO shapes and rates, max_completion_length, num_processes, gradient accumulation and
steps_per_generation — with TRL's eval-mode normalisers — temperature, tool_mask, the vLLM
importance-sampling ratio). Options TRL ignores for the loss type (``delta`` with cispo / sapo /
vespo) are ignored here too. Logged metrics: ``kl``, ``entropy``,
``clip_ratio/{low,high,region}_mean`` (``cispo_clip_ratio`` for cispo, ``vespo/phi_seq_mean`` for
vespo), reduced across processes as TRL does.

Precision: the lm_head runs as TRL runs it. Under ``bf16=True`` / ``fp16=True`` (autocast; the
usual GPU setting with fp32 weights) and with a half-precision model, TRL's fused head computes the
logits in the half dtype (fp32 accumulation, logits rounded to it) and its gradient GEMMs from
half operands: so does ours (``logit_dtype``; the torch path and, on CUDA, the Triton kernels,
which round their logit tile in-kernel), so that the current log-probs are those TRL computes for
its old / reference ones (on-policy ratio 1, KL 0). With ``cast_lm_head_to_fp32=True`` both run
the lm_head in fp32 with autocast off.

Not supported — ``patch_grpo_trainer`` raises ``ValueError`` naming the setting rather than train
differently from TRL; every configuration is decided there, never at the first loss call:
``top_entropy_quantile < 1``,
``off_policy_mask_threshold``, the entropy bonus (``entropy_coef`` / adaptive entropy), MoE router
aux loss, models whose logits are scaled or soft-capped (``final_logit_softcapping``,
``logit_scale`` ...), 2-D (per-token) advantages from subclasses, and a LoRA adapter on the
lm_head. TRL's per-sequence ``clip_ratio/low_min`` and ``clip_ratio/high_max`` are not logged.
The whole micro-batch goes through the model at once (TRL's per-chunk ``batch_size`` is for its
no-grad passes only, as in TRL's own ``_compute_loss``).
"""
from __future__ import annotations

import functools
import types

import torch

from .fused_linear_grpo import fused_linear_grpo_loss, resolve_lm_head
from .grpo_options import resolve_options

_INSTALLED = "_staged_fused_grpo_forward"
# Multimodal keys TRL forwards to the model (whole micro-batch: no per-chunk slicing needed).
_MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                     "token_type_ids", "mm_token_type_ids", "image_position_ids")
_LOGIT_SCALING_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                         "logits_scaling")


def _policy_module(model):
    """The module whose forward TRL patched: the base model under peft."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def check_supported(trainer) -> None:
    """Raise ValueError for a trainer setting the fused path does not reproduce."""
    args = trainer.args
    problems = []
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        problems.append(f"top_entropy_quantile={trainer.top_entropy_quantile} (high-entropy token masking)")
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        problems.append(f"off_policy_mask_threshold={trainer.off_policy_mask_threshold}")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        problems.append("an entropy bonus (entropy_coef != 0 or adaptive entropy)")
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append("the MoE router aux loss (router_aux_loss_coef != 0)")
    model = _policy_module(trainer.model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field in _LOGIT_SCALING_FIELDS:
        v = getattr(cfg, field, None)
        if v is not None and not (field != "final_logit_softcapping" and v == 1.0):
            problems.append(f"model config {field}={v} (scaled / soft-capped logits)")
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        problems.append("a model without an output embedding (get_output_embeddings() is None)")
    if problems:
        raise ValueError("staged.kernels.trl_adapter: the fused loss does not support "
                         + "; ".join(problems) + ". Use TRL's own GRPOTrainer for this configuration.")
    resolve_lm_head(lm_head)  # a LoRA lm_head raises here, naming the fix
    for mode in ("train", "eval"):
        # the loss options of every later call, validated now (a ValueError names the field)
        resolve_options(_loss_options(trainer, mode))


def _lm_head_dtype(hidden, lm_head, cast_lm_head_to_fp32: bool):
    """The dtype TRL's fused head computes the logits in (trl.kernels.ChunkedLogProbFunction:
    the autocast dtype when autocast is on, else the hidden states'), or None for fp32."""
    if cast_lm_head_to_fp32:
        return None  # TRL: hidden.float(), autocast off
    dev = hidden.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    return dt if dt in (torch.bfloat16, torch.float16) else None


def _install_forward(model) -> None:
    if getattr(model, _INSTALLED, False):
        return
    inner = model.forward  # TRL's fused-head forward (bound); every ordinary call goes there

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates kwargs against it
    def forward(self, *args, staged_fused_grpo=None, **kwargs):
        if staged_fused_grpo is None:
            return inner(*args, **kwargs)
        req = staged_fused_grpo
        kwargs["use_cache"] = False
        out = self.base_model(*args, **kwargs)
        k = req["logits_to_keep"]
        hidden = out.last_hidden_state[:, :-1][:, -k:]  # position t predicts token t + 1
        lm_head = self.get_output_embeddings()
        hidden = hidden.to(lm_head.weight.device)
        loss, metrics = fused_linear_grpo_loss(hidden, lm_head, *req["args"], **req["kwargs"],
                                               logit_dtype=_lm_head_dtype(hidden, lm_head, req["cast_lm_head_to_fp32"]))
        # a plain dict: wrappers that rebuild outputs (accelerate's fp32 conversion) handle it
        return {"loss": loss, "metrics": metrics.as_dict()}

    model.forward = types.MethodType(forward, model)
    setattr(model, _INSTALLED, True)


def _loss_options(trainer, mode: str) -> dict:
    args = trainer.args
    train = mode == "train"
    return dict(
        loss_type=trainer.loss_type,
        importance_sampling_level=trainer.importance_sampling_level,
        eps_low=trainer.epsilon_low,
        eps_high=trainer.epsilon_high,
        delta=getattr(args, "delta", None),
        beta=trainer.beta,
        use_bias_correction_kl=getattr(args, "use_bias_correction_kl", True),
        sapo_temperature_pos=getattr(args, "sapo_temperature_pos", 1.0),
        sapo_temperature_neg=getattr(args, "sapo_temperature_neg", 1.05),
        vespo_k_pos=getattr(args, "vespo_k_pos", 2.0),
        vespo_lambda_pos=getattr(args, "vespo_lambda_pos", 3.0),
        vespo_k_neg=getattr(args, "vespo_k_neg", 3.0),
        vespo_lambda_neg=getattr(args, "vespo_lambda_neg", 2.0),
        max_completion_length=trainer.max_completion_length,
        num_processes=trainer.accelerator.num_processes,
        # TRL's normalisers: train mode divides by the accumulation steps (dapo/cispo: scales by
        # GA / steps_per_generation); eval mode does neither
        gradient_accumulation_steps=(getattr(trainer, "current_gradient_accumulation_steps", None)
                                     or args.gradient_accumulation_steps) if train else 1,
        steps_per_generation=args.steps_per_generation if train else 1,
    )


def fused_compute_loss(self, model, inputs):
    """Drop-in for ``GRPOTrainer._compute_loss`` (bound to the trainer by ``patch_grpo_trainer``)."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits_to_keep = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    mode = "train" if self.model.training else "eval"

    advantages = inputs["advantages"]
    if advantages.dim() != 1:
        raise ValueError(f"staged.kernels.trl_adapter: advantages must be one per sequence [B]; got shape "
                         f"{tuple(advantages.shape)} (per-token advantages are not supported)")
    vllm_is_ratio = None
    if self.loss_type == "vespo":
        vllm_is_ratio = inputs.get("importance_sampling_ratio")  # TRL folds it into phi whenever present
    elif self.use_vllm and self.vllm_importance_sampling_correction:
        vllm_is_ratio = inputs["importance_sampling_ratio"]
    beta = self.beta
    opts = _loss_options(self, mode)
    req = dict(
        logits_to_keep=logits_to_keep,
        cast_lm_head_to_fp32=bool(getattr(self.args, "cast_lm_head_to_fp32", False)),
        args=(completion_ids, mask, advantages),
        kwargs=dict(old_logp=inputs.get("old_per_token_logps"),
                    ref_logp=inputs.get("ref_per_token_logps") if beta != 0.0 else None,
                    vllm_is_ratio=vllm_is_ratio, num_items_in_batch=inputs.get("num_items_in_batch"),
                    temperature=self.temperature, return_entropy=True, **opts),
    )
    model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    for key in _MODEL_INPUT_KEYS:
        if inputs.get(key) is not None:
            model_inputs[key] = inputs[key]
    with self.accelerator.autocast():
        out = model(**model_inputs, staged_fused_grpo=req)
    loss, metrics = out["loss"], out["metrics"]

    # ---- metrics, as TRL logs them: global means over processes from local (sum, count) ----
    n_tok = metrics["num_tokens"].float()
    n_seq = torch.tensor(float(completion_ids.size(0)), device=n_tok.device)

    def global_mean(mean, count):
        # reduce + .item(): a host sync per logged metric, exactly as TRL's own logging does
        local_sum = mean.float() * count.clamp(min=1.0)
        totals = self.accelerator.reduce(torch.stack([local_sum, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    seq_count = n_seq if self.importance_sampling_level == "sequence" else n_tok
    log = self._metrics[mode]
    if beta != 0.0:
        log["kl"].append(global_mean(metrics["kl"], n_tok))
    log["entropy"].append(global_mean(metrics["entropy"], n_tok))
    if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            log[name].append(global_mean(metrics[name], seq_count))
    elif self.loss_type == "cispo":
        log["cispo_clip_ratio"].append(global_mean(metrics["clip_ratio/high_mean"], seq_count))
    elif self.loss_type == "vespo":
        log["vespo/phi_seq_mean"].append(global_mean(metrics["vespo/phi_seq_mean"], n_seq))
    return loss


def patch_grpo_trainer(trainer):
    """Make ``trainer`` (a trl ``GRPOTrainer``) compute its loss with staged's fused kernels.

    Checks the configuration first (``check_supported``: a ValueError names anything the fused
    path would compute differently from TRL), wraps the policy model's forward (see the module
    docstring) and replaces the trainer's ``_compute_loss``. Idempotent. Returns the trainer."""
    check_supported(trainer)
    _install_forward(_policy_module(trainer.model))
    trainer._compute_loss = types.MethodType(fused_compute_loss, trainer)
    return trainer


@functools.lru_cache(maxsize=1)
def _fused_trainer_class():
    from trl import GRPOTrainer

    class FusedGRPOTrainer(GRPOTrainer):
        """``trl.GRPOTrainer`` whose loss runs through staged's fused kernels (see
        ``staged.kernels.trl_adapter``). Same constructor; raises ValueError on an unsupported
        configuration."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            check_supported(self)
            _install_forward(_policy_module(self.model))

        _compute_loss = fused_compute_loss

    return FusedGRPOTrainer


def __getattr__(name):
    if name == "FusedGRPOTrainer":
        return _fused_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["patch_grpo_trainer", "check_supported", "fused_compute_loss", "FusedGRPOTrainer"]
