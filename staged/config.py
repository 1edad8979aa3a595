"""Typed configuration of a staged run: global settings plus an ordered list of stages.

A run is one :class:`TrainConfig`. It is loaded from TOML (``tomllib``) and can be overridden
on the command line, either as ``key.sub=value`` or as ``--key.sub value``; list entries are
addressed by index (``stages.0.lr=1e-6``). Values are parsed as TOML literals (``1e-6``,
``true``, ``["vision"]``) and fall back to plain strings (``loss_type=dapo``). An unknown key is
an error that names the key and the keys that exist at that level.

Every dataclass validates itself in ``__post_init__`` and raises ``ValueError`` naming the field
(``stages[1].batch.group_size: must be >= 2 for GRPO, got 1``), so a bad config fails before
any model is loaded.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SYNTHETIC_KINDS = ("perception", "textual", "visual", "caption")
REWARD_KINDS = ("paper", "accuracy", "format")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
FREEZABLE = ("vision", "merger", "embed", "decoder", "lm_head")


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {msg}")


# ------------------------------------------------------------------------------------------
# stage-level sections


@dataclass
class DataConfig:
    """Where a stage's prompts come from: a synthetic generator or local files."""

    synthetic: str | list[str] | None = None
    """Synthetic task generated on the fly: one of perception / textual / visual / caption, or a
    list of them, mixed and shuffled into one dataset (num_samples of each: the merged baseline)."""
    files: list[str] = field(default_factory=list)
    """Local JSONL / Parquet files (EasyR1, verl or TRL-style rows; see staged.data.files)."""
    image_dir: str | None = None
    """Directory that relative image paths in ``files`` are resolved against (None: each file's own)."""
    format: str = "auto"
    """Row layout of ``files``: auto (detected per file), easyr1, verl or trl."""
    default_task: str | None = None
    """Verifier task of rows without a ``task`` field (mcq, number, math, count, ...)."""
    on_bad_row: str = "error"
    """error (stop at the first bad row, naming file, line and field) or skip (count and warn)."""
    num_samples: int = 256
    """Synthetic: how many samples to generate, per kind (the stage cycles through them in epochs)."""
    seed: int | None = None
    """Synthetic: generator seed; None = the run seed + 1000 * stage index."""
    fields: dict[str, str] = field(default_factory=dict)
    """Our field name -> your column, for files whose columns are named otherwise:
    ``fields = { prompt = "question", answer = "gt", images = "image_path" }``; a dotted column reaches
    into a nested dict (``"extra_info.pass_rate"``). Fields: prompt, answer, images, task, pass_rate,
    reference_response."""
    min_pixels: int | None = None
    """Images with fewer pixels are scaled up to about this many (aspect kept) before the processor,
    as EasyR1's ``process_image`` does (release: 262144 = 512 x 512). None = no lower bound of ours."""
    max_pixels: int | None = None
    """Images with more pixels are scaled down to about this many (release: 4194304 = 2048 x 2048).
    None = no upper bound of ours. The processor's own bounds (preprocessor_config) apply after these,
    as in EasyR1. Applied on use, the same for rollout, training and the stage-end eval."""
    max_prompt_tokens: int | None = None
    """Rows whose prompt (chat and prompt templates, image tokens at these pixel bounds) is longer
    are dropped when the stage loads, and counted: EasyR1's filter_overlong_prompts (release: 2048).
    Counted from the images' sizes, before epochs become steps. None = keep every row."""

    def __post_init__(self):
        _check((self.synthetic is None) == bool(self.files), "synthetic",
               "set exactly one of synthetic or files, got "
               f"synthetic={self.synthetic!r}, files={self.files!r}")
        if self.synthetic is not None:
            kinds = self.synthetic if isinstance(self.synthetic, list) else [self.synthetic]
            _check(bool(kinds) and all(isinstance(k, str) and k in SYNTHETIC_KINDS for k in kinds), "synthetic",
                   f"expected one of {SYNTHETIC_KINDS} or a non-empty list of them, got {self.synthetic!r}")
            _check(len(set(kinds)) == len(kinds), "synthetic", f"kinds repeated in {self.synthetic!r}")
        _check(self.on_bad_row in ("error", "skip"), "on_bad_row",
               f"expected error or skip, got {self.on_bad_row!r}")
        _check(self.format in ("auto", "easyr1", "verl", "trl"), "format",
               f"expected auto, easyr1, verl or trl, got {self.format!r}")
        _check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check_pixel_bounds(self.min_pixels, self.max_pixels, "")
        _check(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens",
               f"must be >= 1 when set, got {self.max_prompt_tokens}")
        _check(self.max_prompt_tokens is None or self.synthetic is None, "max_prompt_tokens",
               "drops overlong rows of files; synthetic prompts are short")
        if self.fields:
            _check(self.synthetic is None, "fields", "maps columns of files; synthetic data has none")
            from staged.data.formats import check_fields

            try:
                check_fields(self.fields)
            except ValueError as e:
                raise ValueError(str(e)) from None


def _row_blocks(max_prompt: int, max_new: int, bs: int) -> int:
    """KV blocks the paged engine reserves for one row of a prompt of up to ``max_prompt`` tokens.
    Not monotone in the prompt length (a shorter prompt's partial block can cost one more), so the
    worst of the last ``bs`` lengths: shorter ones repeat their partial blocks with fewer full ones."""
    from staged.rollout.cache import row_blocks  # here: staged.rollout imports this module

    return max(row_blocks(p, max_new, bs) for p in range(max(1, max_prompt - bs + 1), max_prompt + 1))


def check_engine_settings(s, check) -> None:
    """The rollout engine's settings that ``RolloutConfig`` and ``SamplingParams`` share, checked
    alike; ``check(ok, name, message)`` raises in the caller's words."""
    check(s.engine in ROLLOUT_ENGINES, "engine", f"expected one of {', '.join(ROLLOUT_ENGINES)}, got {s.engine!r}")
    check(s.attention in ATTENTION_BACKENDS, "attention",
          f"expected one of {', '.join(ATTENTION_BACKENDS)}, got {s.attention!r}")
    for name in ("block_size", "kv_cache_tokens", "invariant_rows"):
        check(getattr(s, name) >= 0, name, f"must be >= 0, got {getattr(s, name)}")
    check(s.prefill_tokens >= 1, "prefill_tokens", f"must be >= 1, got {s.prefill_tokens}")
    check(0.0 < s.kv_cache_memory_fraction <= 0.95, "kv_cache_memory_fraction",
          f"must lie in (0, 0.95], got {s.kv_cache_memory_fraction}")


def check_pixel_bounds(lo: int | None, hi: int | None, prefix: str) -> None:
    for name, v in ((f"{prefix}min_pixels", lo), (f"{prefix}max_pixels", hi)):
        _check(v is None or v >= 1, name, f"must be >= 1 when set, got {v}")
    _check(lo is None or hi is None or lo <= hi, f"{prefix}min_pixels",
           f"must be <= max_pixels, got min_pixels={lo} > max_pixels={hi}")


@dataclass
class RewardConfig:
    """The verifier reward: ``(1 - format_weight) * accuracy + format_weight * format``."""

    kind: str = "paper"
    """paper (accuracy + format, with the paper's guard against overly complex answers),
    accuracy (accuracy only) or format (format only)."""
    format_weight: float = 0.1
    """Weight of the format term ``<think>...</think>...\\boxed{...}``."""

    def __post_init__(self):
        _check(self.kind in REWARD_KINDS, "kind",
               f"expected one of {REWARD_KINDS}, got {self.kind!r}")
        _check(0.0 <= self.format_weight <= 1.0, "format_weight",
               f"must lie in [0, 1], got {self.format_weight}")


@dataclass
class BatchConfig:
    """Batch geometry of one optimizer step (global, over all data-parallel ranks)."""

    prompts_per_step: int = 8
    """Prompts per rollout step, over all ranks; must divide by the world size."""
    group_size: int = 4
    """G: completions sampled per prompt (the GRPO group)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (gradient accumulation inside one step)."""
    rollout_batch_size: int = 0
    """Decode slots of the rollout engine: sequences decoded at once on a rank; when one ends,
    its slot takes the next pending sequence (continuous batching). 0 = all of a rank's
    sequences at once. (engine "simple": sequences per generate chunk.)"""
    mini_batch_prompts: int = 0
    """Prompts per optimizer update, over all ranks (EasyR1's global_batch_size): the rollout's
    prompts split into prompts_per_step / mini_batch_prompts mini-batches, each one optimizer
    update (x grpo.ppo_epochs passes). 0 = prompts_per_step: one update per rollout step."""

    def __post_init__(self):
        _check(self.prompts_per_step >= 1, "prompts_per_step",
               f"must be >= 1, got {self.prompts_per_step}")
        _check(self.group_size >= 1, "group_size", f"must be >= 1, got {self.group_size}")
        _check(self.micro_batch_size >= 1, "micro_batch_size",
               f"must be >= 1, got {self.micro_batch_size}")
        _check(self.rollout_batch_size >= 0, "rollout_batch_size",
               f"must be >= 0, got {self.rollout_batch_size}")
        _check(self.mini_batch_prompts >= 0 and (self.mini_batch_prompts == 0
                                                 or self.prompts_per_step % self.mini_batch_prompts == 0),
               "mini_batch_prompts", f"must divide prompts_per_step={self.prompts_per_step} (0 = prompts_per_step), "
               f"got {self.mini_batch_prompts}")

    @property
    def num_mini_batches(self) -> int:
        """Mini-batches (optimizer updates per pass) of one rollout step."""
        return self.prompts_per_step // (self.mini_batch_prompts or self.prompts_per_step)


@dataclass
class GRPOConfig:
    """Sampling and loss options. Loss semantics follow TRL's GRPOTrainer."""

    loss_type: str = "grpo"
    """grpo (per-sequence mean, then mean), bnpo, dr_grpo, dapo (global token mean), cispo."""
    importance_sampling_level: str = "token"
    """token (GRPO) or sequence (GSPO)."""
    eps_low: float = 0.2
    """Lower clip range: ratio >= 1 - eps_low."""
    eps_high: float = 0.3
    """Upper clip range: ratio <= 1 + eps_high (the paper's clip-higher 0.3)."""
    delta: float | None = None
    """Optional two-sided clip of the ratio for negative advantages (TRL's ``delta``)."""
    dual_clip: float | None = None
    """Dual-clip PPO's C (> 1; None = off): for negative advantages the clipped loss is capped at
    -C * A, so a token whose ratio ran far past 1 + eps cannot dominate (EasyR1: 3.0)."""
    ppo_epochs: int = 1
    """Passes over the rollout step's mini-batches (batch.mini_batch_prompts): the step takes
    num_mini_batches x ppo_epochs optimizer updates. Updates after the first measure the ratio
    against the log-probs of the policy that sampled (see old_logp)."""
    beta: float = 0.0
    """Weight of the k3 KL to the stage's reference model; 0 = no reference model is built."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs and entropy use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    max_response_tokens: int = 64
    """Longest completion; longer ones are cut (and count as truncated in the metrics)."""
    std_normalize: bool = True
    """Divide group advantages by the group's reward std (Dr. GRPO turns this off)."""
    kl_bias_correction: bool = True
    """Multiply the k3 KL by the importance ratio (TRL's default); EasyR1's low_var_kl does not."""
    old_logp: str = "recompute"
    """The importance ratio's denominator: recompute (the trainer's own log-probs, detached: TRL's
    on-policy shortcut, ratio 1 in value, for the step's first update; later updates use the
    log-probs of the policy that sampled, from one no-grad pass before the first update, as
    EasyR1 does) or rollout (the sampler's log-probs, every update)."""
    rollout_is_correction: bool = False
    """TRL's vLLM importance-sampling correction: weight tokens by exp(trainer - sampler
    log-prob), for engines whose numerics differ from the trainer's."""

    def __post_init__(self):
        _check(self.loss_type in LOSS_TYPES, "loss_type",
               f"expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        _check(self.importance_sampling_level in ("token", "sequence"),
               "importance_sampling_level",
               f"expected token or sequence, got {self.importance_sampling_level!r}")
        _check(0.0 <= self.eps_low < 1.0, "eps_low", f"must lie in [0, 1), got {self.eps_low}")
        _check(self.eps_high >= 0.0, "eps_high", f"must be >= 0, got {self.eps_high}")
        _check(self.delta is None or self.delta > 1.0, "delta",
               f"must be > 1 when set, got {self.delta}")
        _check(self.dual_clip is None or self.dual_clip > 1.0, "dual_clip",
               f"must be > 1 when set (None = off), got {self.dual_clip}")
        # cispo / sapo / vespo bound their ratio terms themselves: decided here, not at the first loss call
        _check(self.dual_clip is None or self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"), "dual_clip",
               f"applies to the clipped loss types (grpo, bnpo, dr_grpo, dapo, luspo), not {self.loss_type!r}")
        _check(self.ppo_epochs >= 1, "ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        _check(self.beta >= 0.0, "beta", f"must be >= 0, got {self.beta}")
        _check(self.temperature > 0.0, "temperature",
               f"must be > 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must lie in (0, 1], got {self.top_p}")
        _check(self.max_response_tokens >= 1, "max_response_tokens",
               f"must be >= 1, got {self.max_response_tokens}")
        _check(self.old_logp in ("rollout", "recompute"), "old_logp",
               f"expected rollout or recompute, got {self.old_logp!r}")
        if self.delta is not None and self.loss_type == "cispo":
            # as TRL, the fused loss and its TRL adapter do: delta exists only for the clipped losses
            warnings.warn(f"grpo.delta={self.delta} is ignored with loss_type='cispo' (TRL reads delta only "
                          f"for the clipped losses grpo, bnpo, dr_grpo, dapo)", UserWarning, stacklevel=3)


@dataclass
class StageConfig:
    """One stage: its data, reward, trainable modules, schedule, batch and GRPO options."""

    name: str = "stage"
    """Shown in logs, plots and the export directory name."""
    type: str = "grpo"
    """grpo (RL with verifiable rewards) or sft (supervised on reference responses/captions)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic="perception"))
    reward: RewardConfig = field(default_factory=RewardConfig)
    freeze: list[str] = field(default_factory=list)
    """Modules kept frozen in this stage: any of vision (the whole vision tower), merger (its
    patch merger only), embed, decoder, lm_head."""
    steps: int | None = None
    """Rollout steps in this stage (format warm-up steps included); each takes
    batch.num_mini_batches x grpo.ppo_epochs optimizer updates (one by default). None: from
    ``epochs``, else 10."""
    epochs: int | None = None
    """Instead of steps: passes over the stage's data, steps = ceil(rows / prompts_per_step) * epochs
    (floor with drop_last), counted when the data is checked before the model loads."""
    drop_last: bool = False
    """EasyR1's data loader (drop_last=True): every epoch is a fresh permutation cut to whole steps,
    floor(rows / prompts_per_step) of them, its last rows % prompts_per_step rows left out. False: the
    data is one stream over epochs (a step may straddle two), nothing left out."""
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    schedule: str = "constant"
    """constant, cosine (to min_lr_ratio * lr at the last step) or warmup (linear warm-up,
    then constant); warmup_steps applies to all three. The schedule covers the GRPO steps (the
    format warm-up runs at sft_lr before it) or, in an sft stage, all steps. It counts rollout
    steps, as verl / EasyR1 do: all optimizer updates of one step share its lr."""
    warmup_steps: int = 0
    """Linear warm-up steps from lr / warmup_steps to lr. A fresh AdamW's first steps move every
    weight by ~lr whatever the gradient's size, so RL from a new optimizer wants a few."""
    min_lr_ratio: float = 0.0
    """cosine: final lr as a fraction of lr."""
    vision_lr_scale: float = 1.0
    """The vision tower's learning rate as a multiple of the stage's (a slower vision tower is
    common in VLM training; at high learning rates a small one collapses to constant features)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping, the norm is still logged)."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    curriculum: str = "shuffle"
    """shuffle (a fresh permutation per epoch) or easy_to_hard (sorted by pass_rate, high first)."""
    sft_warmup_steps: int = 0
    """Format warm-up: this many of the stage's first steps are SFT on reference responses."""
    sft_lr: float | None = None
    """Learning rate of SFT steps (sft stages and the warm-up); None = lr."""
    system_prompt: str | None = None
    """System message put before every prompt. None: no system turn of ours (the chat template's
    default system message, e.g. Qwen2.5-VL's "You are a helpful assistant.", stays)."""
    prompt_template: str | None = None
    """Jinja template applied to each prompt's text, the user turn, as EasyR1's ``format_prompt``:
    ``{{ content }}`` is the row's prompt (``<image>`` markers included, placed after rendering).
    Inline text (it contains ``{{``), or a .jinja file: a path, or the name of a shipped one in
    staged/configs/templates (``math``, ``math_release``); read when the config loads."""

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, "name",
               f"must be a non-empty name without '/', got {self.name!r}")
        _check(self.type in ("grpo", "sft"), "type",
               f"expected grpo or sft, got {self.type!r}")
        for m in self.freeze:
            _check(m in FREEZABLE, "freeze", f"unknown module {m!r}; expected any of {FREEZABLE}")
        _check(self.epochs is None or self.steps is None, "epochs",
               f"set steps or epochs, not both (steps={self.steps}, epochs={self.epochs})")
        _check(self.epochs is None or self.epochs >= 1, "epochs", f"must be >= 1 when set, got {self.epochs}")
        if self.epochs is None and self.steps is None:
            self.steps = 10
        _check(self.steps is None or self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        if self.prompt_template is not None:
            from staged.data.prompting import load_template

            self.prompt_template = load_template(self.prompt_template)
        _check(self.lr > 0.0, "lr", f"must be > 0, got {self.lr}")
        _check(self.sft_lr is None or self.sft_lr > 0.0, "sft_lr",
               f"must be > 0 when set, got {self.sft_lr}")
        _check(self.schedule in ("constant", "cosine", "warmup"), "schedule",
               f"expected constant, cosine or warmup, got {self.schedule!r}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.schedule != "warmup" or self.warmup_steps > 0, "warmup_steps",
               "schedule = 'warmup' needs warmup_steps > 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio",
               f"must lie in [0, 1], got {self.min_lr_ratio}")
        _check(self.vision_lr_scale > 0.0, "vision_lr_scale", f"must be > 0, got {self.vision_lr_scale}")
        _check(self.weight_decay >= 0.0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.max_grad_norm >= 0.0, "max_grad_norm",
               f"must be >= 0, got {self.max_grad_norm}")
        _check(self.curriculum in ("shuffle", "easy_to_hard"), "curriculum",
               f"expected shuffle or easy_to_hard, got {self.curriculum!r}")
        self._check_steps()

    def _check_steps(self):
        if self.steps is None:  # from epochs, once the rows are counted (resolve_steps)
            _check(self.sft_warmup_steps >= 0, "sft_warmup_steps", f"must be >= 0, got {self.sft_warmup_steps}")
            return
        _check(0 <= self.sft_warmup_steps <= self.steps, "sft_warmup_steps",
               f"must lie in [0, steps={self.steps}], got {self.sft_warmup_steps}")
        if self.type == "grpo" and self.sft_warmup_steps < self.steps:
            _check(self.batch.group_size >= 2, "batch.group_size",
                   f"must be >= 2 for GRPO (advantages are relative to the group), "
                   f"got {self.batch.group_size}")

    def steps_for(self, rows: int) -> int:
        """Steps of ``epochs`` passes over ``rows`` rows (see epochs / drop_last)."""
        P = self.batch.prompts_per_step
        per_epoch = rows // P if self.drop_last else math.ceil(rows / P)
        if per_epoch < 1:
            raise ValueError(f"steps: {rows} rows do not fill one step of prompts_per_step={P} "
                             f"(drop_last = true drops them all)")
        return per_epoch * (self.epochs or 1)

    def resolve_steps(self, rows: int) -> None:
        """Set steps from epochs and the stage's row count (no-op when steps was given)."""
        if self.epochs is not None:
            self.steps = self.steps_for(rows)
            self._check_steps()

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step with 0-based index ``step`` in this stage. Format
        warm-up steps use sft_lr (or lr), constant; the schedule runs over the steps after them."""
        if self.type == "grpo" and step < self.sft_warmup_steps:
            return self.sft_lr or self.lr
        base = (self.sft_lr or self.lr) if self.type == "sft" else self.lr
        first = 0 if self.type == "sft" else self.sft_warmup_steps
        t, n = step - first, self.steps - first
        if self.warmup_steps > 0 and t < self.warmup_steps:
            return base * (t + 1) / self.warmup_steps
        if self.schedule == "cosine":
            span = max(1, n - 1 - self.warmup_steps)
            frac = min(1.0, (t - self.warmup_steps) / span)
            return base * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac)))
        return base

    def is_sft_step(self, step: int) -> bool:
        return self.type == "sft" or step < self.sft_warmup_steps


# ------------------------------------------------------------------------------------------
# run-level sections


@dataclass
class FSDPConfig:
    """FSDP2 options (``staged.parallel``)."""

    activation_checkpointing: bool = False
    """Recompute each decoder block (and vision block) in backward instead of storing it."""
    reshard_after_forward: bool = True
    """Free gathered block parameters after forward (ZeRO-3); False keeps them (ZeRO-2)."""


ROLLOUT_ENGINES = ("paged", "simple")
ATTENTION_BACKENDS = ("auto", "flash", "triton", "torch")


@dataclass
class RolloutConfig:
    """The rollout engine (``staged.rollout``; batch.rollout_batch_size sets its decode slots)."""

    engine: str = "paged"
    """paged: each prompt prefilled once for its G samples, paged KV cache, continuous batching;
    simple: the plain decode loop over transformers' DynamicCache (the reference)."""
    block_size: int = 0
    """Tokens per KV-cache block; 0 = 256 with flash-attn on CUDA, else 16."""
    attention: str = "auto"
    """Engine paged, decode attention over the cache: flash (flash-attn's paged kernel), triton
    (staged.kernels.paged_decode: reads each row's blocks in place, a row's output the same bits
    whatever rows share the step), torch (gather + SDPA); auto = flash where installed, else
    triton on CUDA, torch on a CPU."""
    kv_cache_tokens: int = 0
    """KV-cache capacity in tokens; 0 = kv_cache_memory_fraction of free memory on CUDA, or what
    a step can need at most on a CPU (capped at 4 GiB)."""
    kv_cache_memory_fraction: float = 0.3
    """On CUDA with kv_cache_tokens = 0: the share of free device memory the cache may take."""
    prefill_tokens: int = 8192
    """Prompt tokens per prefill forward (at least one prompt; packed on a CPU, padded on CUDA with
    invariant_rows = 0; one prompt per forward on CUDA otherwise)."""
    cuda_graphs: bool = True
    """Engine paged on CUDA: decode steps at static shapes (rows padded to invariant_rows, or to
    power-of-two buckets with invariant_rows = 0),
    each shape captured once per rollout as a CUDA graph and replayed (staged.rollout.graphs);
    a capture that fails falls back to eager decoding with a warning."""
    invariant_rows: int = 64
    """Engine paged on CUDA: every decode step (and first-token draw) at exactly this many rows,
    padded, in several passes when more rows are live, and prompts prefilled one per forward: a
    row's completion then depends on its seed and prompt only, whatever rows share its steps and
    however many ranks (cuBLAS picks kernels by shape; these shapes never follow the batch).
    Decode is bandwidth-bound up to a few dozen rows, so padding to 64 costs little there; more
    slots than this pay one weight read per pass. 0: power-of-two buckets of the live rows, one
    pass (faster with many slots; a row's tokens then agree with another batch's up to flips)."""
    reuse_vision_features: bool = True
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL (deepstack features included), engine paged, padded or
    packed micro-batches: the rollout's image features (one tower pass per distinct prompt) stand
    in for the tower in every training forward of the step, and the tower's gradient comes from
    one deferred pass per step instead of G (staged.vision_reuse). Keeps every distinct prompt's
    features on the device until the step ends. Where they are stale (a training tower and more
    than one update per step), each training forward runs the tower once per distinct image of
    its micro-batch instead of once per row. The reference model (beta > 0) runs its own tower
    once per mini-batch over its distinct images (not per row). false: the tower per row."""

    def __post_init__(self):
        check_engine_settings(self, _check)


@dataclass
class PackingTrainConfig:
    """Sequence packing of the GRPO step's policy forward (``staged.packed_step``)."""

    enabled: bool = False
    """Pack each rank's prompt+completion sequences back to back into micro-batches under a
    token budget (planner: staged.packing.planner; varlen attention: staged.attention) instead
    of padded [rows, longest] micro-batches. Same loss and gradients (tested to 1e-5 in fp32).
    Off by default, from measurement: on the embedded CPU demo (1 thread) the whole run took 78 s
    packed vs 67 s padded (loss + backward per step 0.39 vs 0.30 s in perception, 0.65 vs 0.53 s
    in visual): its sequences are short and of similar length, so there is little padding to
    save, and the exact per-sequence SDPA loop makes one call per sequence and layer where padded
    makes one. Packing pays where padding is large and attention is flash-attn varlen (GPU)."""
    token_budget: int = 0
    """Most tokens in one packed micro-batch. 0 = micro_batch_size x this step's longest
    sequence on the rank (never more micro-batches than the padded path)."""

    def __post_init__(self):
        _check(self.token_budget >= 0, "token_budget", f"must be >= 0, got {self.token_budget}")


@dataclass
class EvalConfig:
    """Evaluation (staged.eval.evaluate) on held-out sets at stage ends and, with ``every``, during
    a stage; off while both lists are empty. Results go into the metrics JSONL (and TensorBoard,
    under eval/) as ``kind = "eval"`` records. An eval lost to a crash is redone on resume."""

    synthetic: list[str] = field(default_factory=list)
    """Synthetic eval sets (perception / textual / visual / caption), each ``n`` samples generated
    with ``seed``: one benchmark per kind."""
    files: list[str] = field(default_factory=list)
    """Benchmark files (JSONL / Parquet, as ``python -m staged.eval --data``): one benchmark per file."""
    n: int = 64
    """Synthetic: samples per set; files: the first n rows of each (0 = all rows)."""
    max_new_tokens: int = 64
    """Response token limit of the evaluation."""
    batch_size: int = 32
    """Prompts per generate call."""
    seed: int | None = None
    """Synthetic eval data seed; None = the run seed + 1,000,003 (disjoint from the stages' seeds)."""
    stages: str = "all"
    """Evaluate at the end of every stage (all) or of the last one only (last)."""
    image_dir: str | None = None
    """Directory that relative image paths in ``files`` are resolved against (None: each file's own)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Column mapping of ``files`` (as a stage's data.fields)."""
    every: int = 0
    """Also evaluate after every this many global steps, inside a stage (0 = stage ends only). A
    step that is both only evaluates once."""
    temperature: float = 0.0
    """Sampling temperature of the evaluation; 0 = greedy (one argmax completion per prompt)."""
    top_p: float = 1.0
    """Nucleus threshold when sampling (temperature > 0)."""
    samples: int = 1
    """Completions per prompt when sampling (accuracy is their mean; pass@k is logged too).
    (``n`` above is the number of prompts per set.)"""

    def __post_init__(self):
        for k in self.synthetic:
            _check(k in SYNTHETIC_KINDS, "synthetic", f"expected any of {SYNTHETIC_KINDS}, got {k!r}")
        _check(self.n >= 0 and (self.n >= 1 or not self.synthetic), "n",
               f"must be >= 1 with synthetic sets (>= 0 with files only), got {self.n}")
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.stages in ("all", "last"), "stages", f"expected all or last, got {self.stages!r}")
        _check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        _check(self.every == 0 or self.enabled, "every",
               f"every={self.every} needs eval sets: set eval.synthetic or eval.files")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must lie in (0, 1], got {self.top_p}")
        _check(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}")
        _check(self.samples == 1 or self.temperature > 0, "samples",
               f"{self.samples} completions per prompt need temperature > 0 (greedy gives one)")
        if self.fields:
            from staged.data.formats import check_fields

            try:
                check_fields(self.fields)
            except ValueError as e:
                raise ValueError(str(e)) from None

    @property
    def enabled(self) -> bool:
        return bool(self.synthetic or self.files)


@dataclass
class TrainConfig:
    """A whole run: model, precision, parallelism, outputs and the ordered stages."""

    model: str = "embedded"
    """A local HF checkpoint directory, a Hugging Face model id whose snapshot is in the local HF
    cache (``Qwen/Qwen3-VL-8B-Instruct``), or ``embedded`` for the tiny built-in Qwen2.5-VL."""
    embedded_dir: str = "outputs/embedded-model"
    """Where the embedded checkpoint is built (once) and loaded from. Its weights follow ``seed``:
    seed 0's live here, another seed's beside it in ``<embedded_dir>-seed<seed>`` (runs of
    different seeds at once never rebuild each other's)."""
    precision: str = "auto"
    """auto (bf16 params / fp32 reductions on GPU, fp32 on CPU), bf16 or fp32."""
    attn_implementation: str = "sdpa"
    """Attention backend handed to the model loader (sdpa, eager, flash_attention_2)."""
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""
    dist_timeout_s: float = 600.0
    """Seconds a rank waits in a collective before it gives up (ranks > 1): a rank that died,
    stopped or hangs ends the job after this long instead of torch's 30 minutes. Must exceed the
    longest time one rank works alone while the others wait: rank 0 reading the checkpoint, an HF
    export, the slowest rank's rollout."""
    cpu_threads: int = 1
    """CPU runs: torch intra-op threads (0 = torch's default). The embedded model's matrices are
    too small to gain from more threads, and spinning OpenMP threads on shared cores can be 10x
    slower than one."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Stage-end evaluation on held-out sets (off by default)."""
    packing: PackingTrainConfig = field(default_factory=PackingTrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    output_dir: str = "outputs/default"
    """Metrics JSONL, TensorBoard events, plot and HF exports go here."""
    checkpoint_dir: str = ""
    """DCP checkpoints; empty = <output_dir>/checkpoints."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many global steps (0 = only at stage ends)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk (0 = keep all)."""
    resume: str = "auto"
    """auto (continue from the newest complete checkpoint, if any) or never (start fresh and
    delete checkpoints already in checkpoint_dir)."""
    export_hf: bool = True
    """Write an HF safetensors checkpoint (with processor files) at each stage end."""
    export_dtype: str = "auto"
    """Floating-point dtype of the HF exports: auto (the source checkpoint's, from its config.json:
    a bf16 model exports at half the size of the fp32 master weights), bf16, fp16 or fp32."""
    seed: int = 0
    """Seeds data order, synthetic data, sampling (per global sample index) and init RNGs."""
    max_consecutive_bad_steps: int = 3
    """Steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run."""
    finished_check_every: int = 8
    """Rollout on CUDA: look at which sequences finished (a host sync) every this many tokens."""
    image_cache_mb: int = 1024
    """Decoded images kept per rank (an LRU over file-backed images, in MB of RGB pixels): images are
    decoded when a step uses them, not when the data loads."""
    tensorboard: bool = True
    """Also write TensorBoard events when tensorboard is installed."""
    plot: bool = True
    """Save reward / response-length curves as a PNG at the end (when matplotlib is installed)."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0)."""
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self):
        _check(bool(self.model), "model", "must be a checkpoint path or 'embedded'")
        _check(self.precision in ("auto", "bf16", "fp32"), "precision",
               f"expected auto, bf16 or fp32, got {self.precision!r}")
        _check(self.device in ("auto", "cuda", "cpu"), "device",
               f"expected auto, cuda or cpu, got {self.device!r}")
        _check(self.dist_timeout_s > 0, "dist_timeout_s", f"must be > 0, got {self.dist_timeout_s}")
        _check(self.cpu_threads >= 0, "cpu_threads", f"must be >= 0, got {self.cpu_threads}")
        _check(self.checkpoint_every >= 0, "checkpoint_every",
               f"must be >= 0, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 0, "keep_checkpoints",
               f"must be >= 0, got {self.keep_checkpoints}")
        _check(self.resume in ("auto", "never"), "resume",
               f"expected auto or never, got {self.resume!r}")
        _check(self.export_dtype in ("auto", "bf16", "fp16", "fp32"), "export_dtype",
               f"expected auto, bf16, fp16 or fp32, got {self.export_dtype!r}")
        _check(self.max_consecutive_bad_steps >= 1, "max_consecutive_bad_steps",
               f"must be >= 1, got {self.max_consecutive_bad_steps}")
        _check(self.image_cache_mb >= 0, "image_cache_mb", f"must be >= 0, got {self.image_cache_mb}")
        _check(self.finished_check_every >= 1, "finished_check_every",
               f"must be >= 1, got {self.finished_check_every}")
        _check(len(self.stages) >= 1, "stages", "a run needs at least one [[stages]] entry")
        # the decode attention kernels are CUDA's (flash-attn's, our Triton one): refused up front
        # on a CPU run rather than at its first rollout
        _check(self.device != "cpu" or self.rollout.attention in ("auto", "torch"), "rollout.attention",
               f"{self.rollout.attention!r} runs on CUDA only; device = 'cpu' (use 'auto' or 'torch')")
        if self.rollout.engine == "paged" and self.rollout.kv_cache_tokens:
            # what the engine would refuse at the stage's first rollout (KVCacheTooSmall), refused
            # before the model loads where the longest prompt is known; counted in whole blocks as
            # the engine counts (at the smallest block it may pick when block_size = 0)
            bs = self.rollout.block_size or 16
            for s in self.stages:
                limit = s.data.max_prompt_tokens
                if s.type != "grpo" or not limit or (s.steps is not None and s.sft_warmup_steps >= s.steps):
                    continue  # no rollout: an sft stage, or a grpo one of format warm-up steps only
                need = _row_blocks(limit, s.grpo.max_response_tokens, bs)
                _check(need <= self.rollout.kv_cache_tokens // bs, "rollout.kv_cache_tokens",
                       f"{self.rollout.kv_cache_tokens} tokens cannot hold one row of stage {s.name!r}: a prompt "
                       f"of up to data.max_prompt_tokens={limit} + grpo.max_response_tokens="
                       f"{s.grpo.max_response_tokens} needs at least {need * bs} ({need} blocks of {bs} tokens)")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, "stages", f"stage names must be unique, repeated: {dup}")

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.output_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------
# building dataclasses from nested dicts (TOML) with errors that name the key


def _strip_optional(tp):
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _build(tp, value, where: str):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: may not be empty")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown config key {'.'.join(filter(None, [where, unknown[0]]))!r}"
                             f" (known keys here: {', '.join(sorted(known))})")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except ValueError as e:
            if not where:
                raise
            name = f" (stage {value['name']!r})" if tp is StageConfig and "name" in value else ""
            raise ValueError(f"{where}.{e}{name}") from None
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_build(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested dict (a parsed TOML file)."""
    return _build(TrainConfig, d, "")


# ------------------------------------------------------------------------------------------
# command-line overrides


def _parse_value(text: str) -> Any:
    """A TOML literal (1e-6, true, ["vision"], "x") or else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``d[a][b][i]... = value`` for the dotted ``key``; unknown keys raise ValueError."""
    parts = key.split(".")
    node: Any = d
    tp: Any = TrainConfig
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        tp, _ = _strip_optional(tp)
        if typing.get_origin(tp) is list:
            if not part.isdigit():
                raise ValueError(f"override {key!r}: {here!r} needs a list index, got {part!r}")
            idx = int(part)
            if idx >= len(node):
                raise ValueError(f"override {key!r}: index {idx} is out of range "
                                 f"({len(node)} entries at {'.'.join(parts[:depth])!r})")
            (tp,) = typing.get_args(tp)
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not dataclasses.is_dataclass(tp):
            raise ValueError(f"override {key!r}: {'.'.join(parts[:depth])!r} is not a table")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ValueError(f"unknown config key {here!r} (known keys here: "
                             f"{', '.join(sorted(hints))})")
        tp = hints[part]
        if last:
            node[part] = value
        else:
            inner, _ = _strip_optional(tp)
            if part not in node or node[part] is None:
                node[part] = [] if typing.get_origin(inner) is list else {}
            node = node[part]


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "--c.d", "x", "--e=2"]`` -> ``[("a.b", 1), ("c.d", "x"), ("e", 2)]``."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            body = a[2:]
            if "=" in body:
                k, v = body.split("=", 1)
            else:
                if i + 1 >= len(args):
                    raise ValueError(f"override {a!r} has no value")
                k, v = body, args[i + 1]
                i += 1
        elif "=" in a:
            k, v = a.split("=", 1)
        else:
            raise ValueError(f"cannot parse argument {a!r}: expected key.sub=value or --key.sub value")
        out.append((k.replace("-", "_"), _parse_value(v)))
        i += 1
    return out


# ------------------------------------------------------------------------------------------
# loading


# Names a recipe is also known by (the issue that asked for the release's merged run called it this).
RECIPE_ALIASES = {"paper_merged_freeze_vision": "paper_merged_freeze_vision_qwen2_5_vl"}


def builtin_config_path(name: str) -> Path:
    """Path of a shipped recipe in ``staged/configs`` (``default``, ``paper_qwen2_5_vl``, ``paper_qwen3_vl``)."""
    name = RECIPE_ALIASES.get(name, name)
    return Path(str(resources.files("staged") / "configs" / f"{name}.toml"))


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        shipped = builtin_config_path(str(path).removesuffix(".toml"))
        if shipped.exists():
            p = shipped
        else:
            raise FileNotFoundError(f"config {path!r} not found (shipped recipes: "
                                    f"{sorted(q.stem for q in shipped.parent.glob('*.toml'))})")
    with open(p, "rb") as f:
        return tomllib.load(f)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a TOML recipe (the embedded default when ``path`` is None) and apply overrides."""
    d = load_toml(path if path is not None else builtin_config_path("default"))
    for k, v in parse_overrides(list(overrides or [])):
        apply_override(d, k, v)
    return from_dict(d)


def from_cli(argv: list[str] | None = None) -> TrainConfig:
    """``[--config recipe.toml] [key.sub=value | --key.sub value]...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ValueError("--config needs a path")
            path = argv[i + 1]
            i += 2
        elif argv[i].startswith("--config="):
            path = argv[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return load_config(path, rest)
