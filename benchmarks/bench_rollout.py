"""Rollout engines side by side in one run: the paged engine (group-shared prefill, paged KV
cache, continuous batching) vs the plain decode loop (engine "simple") vs transformers'
``generate()``, on a Qwen2.5-VL-shaped model with the real 151,936-token vocabulary. The old
loop now shares the new sampler; "round-1 loop" is the old loop with the round-1 sampler too
(full-vocabulary log_softmax + fp64 cumsum per token): the loop as it was before this engine.

Shapes (prompts x G = 5 samples, one image each):
  short  8 prompts, 64 vision tokens per image, 64 new tokens, no early end;
  long   4 prompts, 256 vision tokens per image, 256 new tokens, lengths varied by an end-token
         set of ~1/128 of the vocabulary (so rows end at different steps, as real completions do);
  text   8 prompts of ~140 text tokens, no image, 64 new tokens: the textual stage's rows, where
         transformers' own continuous batching (``generate_batch``, text-only requests; G samples
         as ``num_return_sequences``) applies and runs beside the others.
Rows report wall time (the median of ``STAGED_BENCH_REPS`` timed calls, 3 by default, taken in
turns across the implementations after a warm-up call of each), tokens/s over the completion
tokens of the median call, peak memory read on the warm-up call (on a CPU ``peak_extra_mb``, its
resident peak above the resident memory before it; on CUDA the allocator's peak,
``peak_gpu_mb``), the paged engine's prefill /
decode split, its decode time as a % of the read bound (decoder + lm_head weights and the live KV
read once per step, over the copy bandwidth measured in the same run), and ``same_alone``: of
three rows decoded again alone, how many got the tokens they got in the batch (a row's completion
must not depend on its neighbours).
``make gpu-check`` runs the same in bf16 on CUDA, the paged
engine with its decode steps as CUDA graphs and without, and with the torch decode attention in
place of the Triton kernel (``rollout_at_scale``, bench_rollout_at_scale.py: the engine at the GPU
goal's shape).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import time

import torch

from benchmarks.common import PeakExtraRSS, quantiles_ms

PATCH = 14
VOCAB = 151_936


def round1_sample_tokens(logits, u, temperature, top_p, suppress=None, **_):
    """The round-1 sampler, kept here as the baseline of the "round-1 loop" row: a full-vocabulary
    log_softmax, exp and fp64 cumsum per token (same distribution and uniforms as today's)."""
    if suppress is not None:
        logits = logits.masked_fill(suppress, float("-inf"))
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    probs = logp_all.exp()
    if top_p < 1.0:
        sp, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sp, dim=-1) - sp
        sp = sp.masked_fill(before >= top_p, 0.0)
        cdf = torch.cumsum(sp.double(), dim=-1)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_(max=probs.shape[-1] - 1)
        tokens = order.gather(-1, pos).squeeze(-1)
    else:
        cdf = torch.cumsum(probs.double(), dim=-1)
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_(max=probs.shape[-1] - 1).squeeze(-1)
    return tokens, logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def round1(fn):
    """``fn`` with the simple engine's sampler swapped for the round-1 one."""
    import staged.rollout.simple as simple

    def run():
        saved, simple.sample_tokens = simple.sample_tokens, round1_sample_tokens
        try:
            return fn()
        finally:
            simple.sample_tokens = saved
    return run


def qwen2_5_vl(device, dtype, *, vocab: int, text: dict, vision: dict, mrope_section: list[int]):
    """A randomly initialised Qwen2.5-VL (seed 0) with the text stack ``text`` and vision tower
    ``vision`` (their sizes), built in ``dtype`` on ``device`` (no host copy of a multi-GB model)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=vocab, max_position_embeddings=8192, pad_token_id=0, eos_token_id=2,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section}, **text)
    vision = dict(patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  out_hidden_size=text["hidden_size"], **vision)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 10, video_token_id=vocab - 9,
                           vision_start_token_id=vocab - 8, vision_end_token_id=vocab - 7)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.config.get_text_config()._attn_implementation_internal = "sdpa"
    return model


def build_model(device, dtype, quick: bool):
    return qwen2_5_vl(device, dtype, vocab=1000 if quick else VOCAB,
                      text=dict(hidden_size=64 if quick else 256, intermediate_size=128 if quick else 1024,
                                num_hidden_layers=2 if quick else 4, num_attention_heads=4, num_key_value_heads=2),
                      vision=dict(depth=2, hidden_size=64 if quick else 256, intermediate_size=128 if quick else 512,
                                  num_heads=4, fullatt_block_indexes=[1]),
                      mrope_section=[2, 3, 3] if quick else [8, 12, 12])


def make_batch(model, prompts: int, group: int, vision_tokens: int, gen, text_len: int = 20):
    """``prompts`` prompts x ``group`` rows: an image of ``vision_tokens`` tokens and ~``text_len``
    text tokens each; text only when ``vision_tokens`` is 0 (``prompt_ids`` then lists them)."""
    cfg = model.config
    V = cfg.get_text_config().vocab_size
    if not vision_tokens:
        prompts_ids = [torch.randint(3, V - 20, (text_len + 3 * i,), generator=gen).tolist() for i in range(prompts)]
        rows = [ids for ids in prompts_ids for _ in range(group)]
        T = max(len(r) for r in rows)
        return {"input_ids": torch.tensor([[0] * (T - len(r)) + r for r in rows]),
                "attention_mask": torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]),
                "prompt_index": [r // group for r in range(len(rows))], "prompt_ids": prompts_ids}
    side = int(round((vision_tokens * 4) ** 0.5))
    rows, pix, grids = [], [], []
    for i in range(prompts):
        text = torch.randint(3, V - 20, (text_len + 3 * i,), generator=gen).tolist()
        ids = [cfg.vision_start_token_id] + [cfg.image_token_id] * vision_tokens + [cfg.vision_end_token_id] + text
        p = torch.randn(side * side, 3 * 2 * PATCH * PATCH, generator=gen)
        for _ in range(group):
            rows.append(ids)
            pix.append(p)
            grids.append([1, side, side])
    T = max(len(r) for r in rows)
    return {"input_ids": torch.tensor([[0] * (T - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]),
            "pixel_values": torch.cat(pix), "image_grid_thw": torch.tensor(grids),
            "images_per_row": [1] * len(rows), "prompt_index": [r // group for r in range(len(rows))]}


def end_tokens(V: int, fraction: float, gen) -> tuple[int, ...]:
    if fraction <= 0:
        return (2,)
    return tuple(sorted(set(torch.randint(3, V - 20, (max(1, int(V * fraction)),), generator=gen).tolist()) | {2}))


def same_alone(model, batch: dict, params, seeds, out, device, dtype) -> str:
    """How many of a few rows (first, middle, last) get the same tokens decoded alone (one row, one
    slot) as in the timed batch run ``out``: all of them when a row's completion ignores the rows
    beside it (exact on a CPU; on CUDA, where cuBLAS picks its kernels by the row count, this
    counts the rows whose tokens flipped)."""
    from staged.rollout import generate, select_rows

    B = out.completion_ids.shape[0]
    rows = sorted({0, B // 2, B - 1})
    same = 0
    for r in rows:
        alone = generate(model, select_rows(batch, [r]), dataclasses.replace(params, batch_size=1),
                         seeds=seeds[[r]], device=device, dtype=dtype)
        T = alone.completion_ids.shape[1]
        same += int(torch.equal(alone.completion_ids[0].cpu(), out.completion_ids[r, :T].cpu())
                    and not out.completion_mask[r, T:].any())
    return f"{same}/{len(rows)}"


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: the decoder layers, the final norm and the lm_head.
    Not the vision tower (prefill only) and not the input embedding table (a step reads one row of
    it per token; an untied table is as large as the lm_head, so counting it would double the bound
    of a small model). A tied lm_head is the embedding's tensor: counted once, as the lm_head."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if ".visual." not in f".{n}" and (p is not embed or p is head))


def read_bound_pct(weight_bytes: int, stats: dict, copy_gbps: float) -> float:
    """Decode time as a % of its floor: every step reads the decoder + lm_head weights once and
    each live row's K/V, at the copy bandwidth measured in the same run. Over the steady steps
    (those that did not capture a CUDA graph) where the engine reports them."""
    steps, kv, secs = stats["decode_steps"], stats["kv_tokens_read"], stats["decode_s"]
    if stats.get("steady_decode_steps"):
        steps, kv, secs = stats["steady_decode_steps"], stats["steady_kv_tokens_read"], stats["steady_decode_s"]
    read = weight_bytes * steps + kv * stats["kv_bytes_per_token"]
    return 100 * read / (copy_gbps * 1e9) / secs


def completion_tokens(impl: str, out, eos) -> tuple[int, dict]:
    """(completion tokens, the engine's stats) of one call's output: ours a Rollout; transformers'
    ``generate()`` the ids after the prompt (counted up to and with the first end token);
    ``generate_batch`` the completions' token lists."""
    if impl == "transformers continuous batching":
        return sum(len(t) for t in out), {}
    if impl == "transformers generate()":
        ended = torch.isin(out, torch.tensor(eos, device=out.device)).long()
        return int(((ended.cumsum(-1) - ended) == 0).sum()), {}
    return int(out.completion_mask.sum()), out.stats or {}


def run(device: str = "cpu", limits: dict | None = None, quick: bool = False) -> list[dict]:
    from staged.rollout import SamplingParams, generate, row_seed

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_model(dev, dtype, quick)
    V = model.config.get_text_config().vocab_size
    weight_bytes = decode_weight_bytes(model)
    shapes = ([("quick", 2, 3, 16, 8, 0.0)] if quick else
              [("short", 8, 5, 64, 64, 0.0), ("long", 4, 5, 256, 256, 1 / 128), ("text", 8, 5, 0, 64, 0.0)])
    if os.environ.get("STAGED_BENCH_GPU_CHECK") == "1":  # make gpu-check's time budget: the short shape
        shapes = shapes[:1]
    reps = int(os.environ.get("STAGED_BENCH_REPS", 1 if quick else 3))
    rows = []
    for name, P, G, vt, new, end_frac in shapes:
        gen = torch.Generator().manual_seed(0)
        batch = make_batch(model, P, G, vt, gen, text_len=128 if not vt else 20)
        prompt_ids = batch.pop("prompt_ids", None)
        eos = end_tokens(V, end_frac, gen)
        B = batch["input_ids"].shape[0]
        seeds = torch.tensor([row_seed(0, 0, i) for i in range(B)])
        case = (f"{name}: {P}x{G} rows, {vt} vis tok, {new} new, V={V}" if vt else
                f"{name}: {P}x{G} rows, ~140-token prompts, {new} new, V={V}")
        sup = tuple(range(V - 10, V))

        def ours(engine, slots=0, graphs=True, attention="auto"):
            sp = SamplingParams(max_new_tokens=new, eos_token_ids=eos, pad_token_id=0, engine=engine, batch_size=slots,
                                suppress_token_ids=sup, cuda_graphs=graphs, attention=attention)

            def fn():
                return generate(model, batch, sp, seeds=seeds, device=dev, dtype=dtype)
            fn.params = sp
            return fn

        def hf_generate():
            inputs = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "image_grid_thw") if k in batch}
            if "pixel_values" in batch:
                inputs["pixel_values"] = batch["pixel_values"].to(dev, dtype)
            if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
                # transformers >= 5.x takes the image tokens' rope positions from this (1 = image);
                # without it, it silently falls back to text positions for the image rows
                inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=0, do_sample=True, temperature=1.0,
                                     top_p=1.0, top_k=0, eos_token_id=list(eos), pad_token_id=0)
            return out[:, inputs["input_ids"].shape[1]:]

        def hf_continuous_batching():
            """transformers' own paged engine (``generate_batch``: text-only requests), G samples of
            each prompt as its ``num_return_sequences``; returns the completions' token lists."""
            from transformers import GenerationConfig

            cfg = GenerationConfig(max_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                   num_return_sequences=G, eos_token_id=list(eos), pad_token_id=0)
            kw = {}
            try:  # its cache sized to this batch, as ours is: by default it takes most of free memory
                # and zero-fills it on every call (5 of its 19 s on a CPU); 16-token pages and a wide
                # batch were its fastest of the settings tried (12.3 s)
                from transformers.generation.configuration_utils import ContinuousBatchingConfig

                pages = sum(G * -(-(len(p) + new) // 16) for p in prompt_ids)
                for size_key in ("page_size", "block_size"):  # "block_size" up to transformers 5.16
                    try:
                        kw["continuous_batching_config"] = ContinuousBatchingConfig(
                            **{size_key: 16}, num_blocks=pages + 16, max_batch_tokens=8192)
                        break
                    except TypeError:
                        continue
            except ImportError:
                pass
            with torch.no_grad():
                out = model.generate_batch(prompt_ids, generation_config=cfg, progress_bar=False, **kw)
            return [o.generated_tokens for o in out.values()]

        impls = {"paged": ours("paged"), "simple (old loop)": ours("simple"),
                 **({"paged, no CUDA graphs": ours("paged", graphs=False),
                     "paged, torch attention": ours("paged", attention="torch")} if dev.type == "cuda" else {}),
                 "round-1 loop": round1(ours("simple")), "transformers generate()": hf_generate,
                 **({"transformers continuous batching": hf_continuous_batching}
                    if prompt_ids is not None and hasattr(model, "generate_batch") else {})}
        # Each implementation's first call is its warm-up (allocator, kernels) and where its host
        # memory is read: the heap trimmed first (PeakExtraRSS), which makes the call that follows
        # fault its pages in afresh -- 0.3-0.7 s on this CPU, so never a timed one. The timed calls
        # then go round the implementations REPS times, so that a change in the machine's load
        # (a shared CPU) falls on all of them alike; each row reports the median.
        peak = {}
        for impl, fn in impls.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with PeakExtraRSS() as host_mem:
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            peak[impl] = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else host_mem.mb)
        runs = {impl: [] for impl in impls}
        for _ in range(reps):
            for impl, fn in impls.items():
                t0 = time.perf_counter()
                out = fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                runs[impl].append((time.perf_counter() - t0, out))
        for impl, fn in impls.items():
            timed = sorted(runs[impl], key=lambda r: r[0])
            dt, out = timed[len(timed) // 2]  # the median run (its stats: the prefill / decode split)
            n_tok, stats = completion_tokens(impl, out, eos)
            row = {"case": case, "impl": impl,
                   **quantiles_ms([t * 1e3 for t, _ in runs[impl]]),
                   "completion_tokens": n_tok, "tokens_per_s": n_tok / dt, "reps": reps}
            if stats:
                row.update(prefill_ms=stats["prefill_s"] * 1e3, decode_ms=stats["decode_s"] * 1e3,
                           cache_mb=stats["cache_mb"])
                if dev.type == "cuda":
                    row["attention"] = stats["attention"]
                if "graph_replays" in stats:
                    row["graphs"] = f'{stats["graph_captures"]} captured, {stats["graph_replays"]} replays'
                    if not stats["cuda_graphs"]:
                        row["graphs"] += " (capture failed: eager)"
                if limits and limits.get("copy_gbps"):
                    row["pct_of_read_bound"] = read_bound_pct(weight_bytes, stats, limits["copy_gbps"])
            if peak[impl] is not None:
                row["peak_gpu_mb" if dev.type == "cuda" else "peak_extra_mb"] = peak[impl]
            if impl.startswith("paged"):
                row["same_alone"] = same_alone(model, batch, fn.params, seeds, out, dev, dtype)
            rows.append(row)
        base = {r["impl"]: r["tokens_per_s"] for r in rows if r["case"] == case}
        for r in rows:
            if r["case"] == case:
                r["x_vs_generate"] = r["tokens_per_s"] / base["transformers generate()"]
                r["x_vs_old_loop"] = r["tokens_per_s"] / base["simple (old loop)"]
                r["x_vs_round1"] = r["tokens_per_s"] / base["round-1 loop"]
    return rows
