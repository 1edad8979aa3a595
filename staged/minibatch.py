"""Mini-batch updates of one GRPO rollout step (``batch.mini_batch_prompts``, ``grpo.ppo_epochs``).

EasyR1 / verl sample a rollout batch, compute the old log-probs in one no-grad pass, then make
``ppo_epochs`` passes over mini-batches of the rollout's prompts, one optimizer update each (the
paper's release: 512 prompts x 5 per rollout, mini-batches of 128 prompts: 4 updates). Here:

* Which prompts: mini-batch k of K holds the step's prompts i (global index) with i % K == k.
  A rank holds prompts [r * P/W, (r + 1) * P/W), so its share of mini-batch k is its local
  prompts j with j % K == k (P/W is a multiple of K when mini_batch_prompts divides by W): the
  same global mini-batches on any number of ranks, and every rank holds M/W prompts of each.
  The G rows of a prompt stay together. Every epoch visits the mini-batches in the same order.
* Old log-probs (``grpo.old_logp = "recompute"``): the step's first update is on-policy (the
  log-probs detached: ratio 1 in value, as with one update); every later update measures the
  ratio against the log-probs of the policy that sampled: those of mini-batch 0 come from that
  first update's own forward, the others from one no-grad pass before the first update.
  ``"rollout"``: the sampler's log-probs, every update.
* Normalisation: each update is a loss of its own, normalised over its mini-batch as TRL does
  with ``steps_per_generation``: per-sequence losses average over the mini-batch's rows, dapo /
  cispo divide by the mini-batch's completion tokens over all ranks.
* The reference model's log-probs are computed once per rollout step, in the same pass.
* The lr schedule counts rollout steps (as verl / EasyR1): all updates of one step share its lr.
  AdamW's own step counter (bias correction) counts updates; it lives in the optimizer state and
  is checkpointed with it, at rollout-step boundaries only, so a resume is exact.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


def mini_batch_rows(num_prompts: int, group_size: int, num_mini_batches: int) -> list[list[int]]:
    """This rank's rollout rows of each mini-batch: local prompt j goes to mini-batch j % K, with
    its ``group_size`` consecutive rows. K = 1: all rows in order (one update, today's step)."""
    if num_prompts % num_mini_batches:
        raise ValueError(f"mini-batches: {num_prompts} prompts on this rank do not split into {num_mini_batches} "
                         f"mini-batches (batch.mini_batch_prompts must divide by the world size)")
    return [[j * group_size + k for j in range(m, num_prompts, num_mini_batches) for k in range(group_size)]
            for m in range(num_mini_batches)]


def update_schedule(num_mini_batches: int, ppo_epochs: int) -> list[int]:
    """The mini-batch index of each optimizer update, in order: epoch after epoch."""
    return [m for _ in range(ppo_epochs) for m in range(num_mini_batches)]


@dataclass
class MiniBatch:
    """One mini-batch on this rank: its rollout rows, ``micro()`` its micro-batches (padded ones are
    built anew at each use, packed ones are kept), the global completion-token count (dapo's
    normaliser) and, by micro-batch index, the log-probs computed once per rollout step:
    reference (beta > 0) and old (for the updates after the first)."""

    rows: list[int]
    micro: Callable[[], Iterable]
    num_items: int = 0
    ref_logp: dict[int, torch.Tensor] = field(default_factory=dict)
    old_logp: dict[int, torch.Tensor] = field(default_factory=dict)
