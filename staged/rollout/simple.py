"""The plain decode loop (engine "simple"): every row prefilled on its own (G copies of a prompt
through the vision tower and the decoder), transformers' DynamicCache, all rows decoded until
the chunk ends. Kept as the reference the paged engine is measured and tested against.

The finished mask stays on the device; the loop looks at "all finished" only every
``check_every`` tokens (the one host sync of the loop, named below).
"""
from __future__ import annotations

import torch

from staged.rollout.interface import SamplingParams, cache_kwarg, model_inputs, select_rows
from staged.rollout.sampler import sample_tokens, suppress_mask, uniform_from_seed


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
    ckw = cache_kwarg(model)

    ids = torch.full((B, params.max_new_tokens), params.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, params.max_new_tokens), dtype=torch.long, device=device)
    logps = torch.zeros((B, params.max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    attn = inputs["attention_mask"]
    V = model.config.get_text_config().vocab_size
    suppress = suppress_mask(params.suppress_token_ids, V, device)

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


def generate_simple(model, batch: dict, params: SamplingParams, seeds: torch.Tensor, device, dtype):
    """(ids, mask, logps) [B, Tc] of every row, in chunks of ``params.batch_size`` rows."""
    B = batch["input_ids"].shape[0]
    step = params.batch_size or B
    parts = [_generate_chunk(model, select_rows(batch, list(range(s, min(B, s + step)))), params,
                             seeds[s:s + step], device, dtype) for s in range(0, B, step)]
    Tc = max(p[0].shape[1] for p in parts)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, Tc - x.shape[1]), value=value)

    return (torch.cat([pad(p[0], params.pad_token_id) for p in parts]), torch.cat([pad(p[1], 0) for p in parts]),
            torch.cat([pad(p[2], 0.0) for p in parts]))
