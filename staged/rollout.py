"""Rollout: sample completions for a batch of prompts with a KV cache.

The interface is small so a faster engine (vLLM, SGLang) can replace it: ``generate(model,
batch, params, seeds=...) -> Rollout``. The default engine is a hand-written decode loop over
``model(..., cache=DynamicCache, use_cache=True)``:

* sampling is an inverse-CDF draw with one uniform per row and token, the uniform a hash of
  (the row's seed, token index) computed on the device — no ``torch.multinomial``, no
  generator state, and no host sync. A row's completion depends only on its own seed and
  prompt, never on which other rows share the batch or the rank, so 1 and N ranks (and a
  resumed run) sample the same completions;
* temperature and top-p as in vLLM/TRL; the log-prob we report is that of the tempered full
  distribution (what the trainer recomputes), not of the top-p truncation;
* the finished mask stays on the device; the loop looks at "all finished" only every
  ``check_every`` tokens (the one host sync of the loop, named below).

Position ids are computed here, once, on the host copy of the prompt batch (mrope for
Qwen-VL: 3 rows — temporal, height, width — that differ on image tokens), and the trainer
reuses them for the policy and reference forwards, so sampling and training see the same
positions.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from staged.models.loading import base_model
from staged.parallel import gathered_for_generation
from staged.vision_dummy import gather_vision

# ------------------------------------------------------------------------------------------
# interface


@dataclass
class SamplingParams:
    """What the engine needs to know (built from a stage's GRPOConfig)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    check_every: int = 8
    """Tokens between looks at the 'all finished' flag (each look is a host sync)."""
    batch_size: int = 0
    """Rows per decode loop; 0 = all rows at once."""
    suppress_token_ids: tuple[int, ...] = ()
    """Never sampled: vision placeholders (an <|image_pad|> in a completion would break the
    training forward's image-feature scatter) and vocabulary rows the tokenizer does not use."""


@dataclass
class Rollout:
    """Completions for B prompt rows (a row = one prompt copy; G rows per GRPO group).

    prompt_ids      [B, Tp] int64  left-padded prompts, as given
    prompt_mask     [B, Tp] int64
    completion_ids  [B, Tc] int64  sampled tokens; ``pad_token_id`` after the end
    completion_mask [B, Tc] int64  1 on sampled tokens, the EOS included
    logprobs        [B, Tc] fp32   log-prob of each sampled token under the sampling policy
                                   (tempered, full distribution); 0 on padding
    position_ids    [3, B, Tp+Tc]  int64 positions of the whole sequence (host tensor)
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    position_ids: torch.Tensor

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


# ------------------------------------------------------------------------------------------
# per-row randomness: counter-based, so a row's draws depend on its seed only

_M32 = 0xFFFFFFFF


def row_seed(*keys: int) -> int:
    """A 62-bit seed from integer keys (e.g. run seed, step, global row index): splitmix64."""
    x = 0x2545F4914F6CDD1D
    for k in keys:
        x = (x ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x >> 2


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 without overflow (split c in 16-bit halves)."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32 finaliser: a bijection on 32-bit values with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform_from_seed(seeds: torch.Tensor, t: int) -> torch.Tensor:
    """One uniform in (0, 1) per row for token index ``t``; seeds [B] int64 (any 62-bit values)."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    x = _mix32((lo + t) & _M32)
    x = _mix32(x ^ hi)
    return (x.double() + 0.5) / 4294967296.0


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float,
                  suppress: torch.Tensor | None = None):
    """Draw one token per row by inverse CDF. logits [B, V] fp32, u [B] in (0, 1), suppress [V]
    bool (tokens never drawn).

    Returns (tokens [B] int64, logp [B] fp32 of the token under the distribution drawn from,
    softmax(logits / T) over the tokens not suppressed)."""
    if suppress is not None:
        logits = logits.masked_fill(suppress, float("-inf"))
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    probs = logp_all.exp()
    if top_p < 1.0:
        # vLLM/TRL nucleus: keep the smallest prefix of the sorted distribution whose mass
        # reaches top_p (the first token always stays), renormalise by drawing within it.
        sp, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sp, dim=-1) - sp
        sp = sp.masked_fill(before >= top_p, 0.0)
        cdf = torch.cumsum(sp.double(), dim=-1)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_(max=probs.shape[-1] - 1)
        tokens = order.gather(-1, pos).squeeze(-1)
    else:
        cdf = torch.cumsum(probs.double(), dim=-1)
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_(max=probs.shape[-1] - 1)
        tokens = tokens.squeeze(-1)
    return tokens, logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------------------
# positions


def position_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """[3, B, T] positions of a left-padded batch (padding gets 0). Run on host tensors: the
    model's ``get_rope_index`` walks each row in Python."""
    base = base_model(model)
    if image_grid_thw is None or not hasattr(base, "get_rope_index"):
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
    kwargs = dict(image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    if "mm_token_type_ids" in inspect.signature(base.get_rope_index).parameters:
        image_id = base.config.image_token_id
        kwargs["mm_token_type_ids"] = (input_ids == image_id).int()
    pos, _ = base.get_rope_index(input_ids, **kwargs)
    return pos.masked_fill(attention_mask.unsqueeze(0) == 0, 0)


def extend_positions(prompt_pos: torch.Tensor, n: int) -> torch.Tensor:
    """Append ``n`` text positions after each row's prompt: [3, B, Tp] -> [3, B, Tp + n]."""
    nxt = prompt_pos.amax(dim=(0, 2)) + 1  # [B]
    tail = nxt[:, None] + torch.arange(n, dtype=prompt_pos.dtype)
    return torch.cat([prompt_pos, tail.unsqueeze(0).expand(3, -1, -1)], dim=-1)


# ------------------------------------------------------------------------------------------
# batch plumbing


def images_per_row(batch: dict) -> list[int]:
    n = batch.get("images_per_row")
    if n is not None:
        return list(n)
    return [0] * batch["input_ids"].shape[0]


def select_rows(batch: dict, rows: list[int]) -> dict:
    """Rows of a generation batch (pixel_values / image_grid_thw follow their rows)."""
    out = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows]}
    per_row = images_per_row(batch)
    out["images_per_row"] = [per_row[r] for r in rows]
    if "position_ids" in batch:
        out["position_ids"] = batch["position_ids"][:, rows]
    grid = batch.get("image_grid_thw")
    if grid is not None and sum(per_row) > 0:
        img_start = [0]
        for k in per_row:
            img_start.append(img_start[-1] + k)
        patches = grid.prod(-1).tolist()
        patch_start = [0]
        for p in patches:
            patch_start.append(patch_start[-1] + p)
        imgs = [i for r in rows for i in range(img_start[r], img_start[r + 1])]
        if imgs:
            out["image_grid_thw"] = grid[imgs]
            out["pixel_values"] = torch.cat([batch["pixel_values"][patch_start[i]:patch_start[i + 1]] for i in imgs])
    return out


def model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The keys the model's forward takes, on ``device`` (pixel values in the compute dtype)."""
    out = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "position_ids")
           if k in batch}
    if "pixel_values" in batch:
        out["pixel_values"] = batch["pixel_values"].to(device, dtype, non_blocking=True)
        out["image_grid_thw"] = batch["image_grid_thw"].to(device, non_blocking=True)
    return out


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the KV cache ``cache``, earlier releases ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ------------------------------------------------------------------------------------------
# the decode loop


@torch.no_grad()
def _generate_chunk(model, batch: dict, params: SamplingParams, seeds: torch.Tensor, device, dtype):
    from transformers import DynamicCache

    B, Tp = batch["input_ids"].shape
    prompt_pos = batch["position_ids"]
    next_pos = (prompt_pos.amax(dim=(0, 2)) + 1).to(device)  # [B]
    inputs = model_inputs(batch, device, dtype)
    seeds = seeds.to(device)
    eos = torch.tensor(sorted(set(params.eos_token_ids)), dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    ckw = _cache_kwarg(model)

    ids = torch.full((B, params.max_new_tokens), params.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, params.max_new_tokens), dtype=torch.long, device=device)
    logps = torch.zeros((B, params.max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    attn = inputs["attention_mask"]
    V = model.config.get_text_config().vocab_size
    suppress = None
    if params.suppress_token_ids:
        suppress = torch.zeros(V, dtype=torch.bool, device=device)
        suppress[torch.tensor([i for i in params.suppress_token_ids if i < V], dtype=torch.long, device=device)] = True

    out = model(**inputs, use_cache=True, logits_to_keep=1, **{ckw: cache})  # prefill
    n = 0
    for t in range(params.max_new_tokens):
        logits = out.logits[:, -1].float()
        tok, lp = sample_tokens(logits, uniform_from_seed(seeds, t), params.temperature, params.top_p,
                                suppress)
        live = ~finished
        tok = torch.where(live, tok, torch.full_like(tok, params.pad_token_id))
        ids[:, t] = tok
        mask[:, t] = live.long()
        logps[:, t] = torch.where(live, lp, torch.zeros_like(lp))
        finished = finished | torch.isin(tok, eos)
        n = t + 1
        if n == params.max_new_tokens:
            break
        # Host sync (the only one in the loop): every check_every tokens, stop when all rows are done.
        if n % params.check_every == 0 and bool(finished.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = (next_pos + t).view(1, B, 1).expand(3, B, 1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                    **{ckw: cache})
    return ids[:, :n], mask[:, :n], logps[:, :n]


def generate(model, batch: dict, params: SamplingParams, *, seeds: torch.Tensor,
             device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Rollout:
    """Sample one completion per row of ``batch`` (a host-side generation batch: left-padded
    ``input_ids`` / ``attention_mask``, optional ``pixel_values`` / ``image_grid_thw`` /
    ``images_per_row``). ``seeds`` [B] int64: row i's draws are a function of seeds[i] alone."""
    device = device or next(model.parameters()).device
    B = batch["input_ids"].shape[0]
    if seeds.shape != (B,):
        raise ValueError(f"seeds: expected shape ({B},) (one per row), got {tuple(seeds.shape)}")
    if not params.eos_token_ids:
        raise ValueError("SamplingParams.eos_token_ids is empty: generation would never stop early")
    batch = dict(batch)
    if "position_ids" not in batch:
        batch["position_ids"] = position_ids(model, batch["input_ids"], batch["attention_mask"],
                                             batch.get("image_grid_thw"))
    step = params.batch_size or B
    was_training = model.training
    model.eval()
    parts = []
    try:
        with gathered_for_generation(model):
            # Ranks > 1: gather the vision tower up front on every rank, with or without images in
            # its rows, so that its one all-gather lines up (staged.vision_dummy).
            gather_vision(model)
            for s in range(0, B, step):
                rows = list(range(s, min(B, s + step)))
                parts.append(_generate_chunk(model, select_rows(batch, rows), params, seeds[rows], device, dtype))
    finally:
        model.train(was_training)
    Tc = max(p[0].shape[1] for p in parts)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, Tc - x.shape[1]), value=value)

    ids = torch.cat([pad(p[0], params.pad_token_id) for p in parts])
    mask = torch.cat([pad(p[1], 0) for p in parts])
    logps = torch.cat([pad(p[2], 0.0) for p in parts])
    return Rollout(prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], completion_ids=ids,
                   completion_mask=mask, logprobs=logps,
                   position_ids=extend_positions(batch["position_ids"], Tc))
