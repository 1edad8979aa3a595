"""The paged rollout engine's decode at the GPU goal's shape, as a % of the weight + KV read bound (CUDA only; in ``make gpu-check``).

Text-only rows of a model whose weights, not its kernel launches, set a decode step's floor: two
of Qwen2.5-VL-7B's decoder layers (hidden 3,584, 28 query / 4 kv heads, MLP 18,944) and its head
(V = 151,936), ~3 GB in bf16, at 64 and 128 rows (the issue's goal: >= 60% at batch >= 64). With
the decode steps as CUDA graphs and without; at 128 rows also in one 128-row pass per step instead
of the default two 64-row ones (each pass reads the weights). Decode time is the device's (CUDA
events), over the steps that captured no graph. Its own benchmark, after ``rollout``: a time-out
here leaves that one's rows recorded.
"""
from __future__ import annotations

import time

import torch

from benchmarks.bench_rollout import VOCAB, decode_weight_bytes, qwen2_5_vl, read_bound_pct

# The GPU goal's shape: decode at batch >= 64 of a model whose weights, not its launches, set the
# step time -- Qwen2.5-VL-7B's decoder layer (hidden 3,584, 28 query / 4 kv heads, MLP 18,944) and
# head (V = 151,936), two layers of it (~3 GB in bf16: a step's floor ~0.6 ms on an H100's HBM).
AT_SCALE = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=2, num_attention_heads=28,
                num_key_value_heads=4, mrope_section=[16, 24, 24])
AT_SCALE_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, mrope_section=[2, 3, 3])


def build_text_model(device, dtype, dims: dict, vocab: int):
    """A Qwen2.5-VL with the text stack of ``dims`` and a minimal vision tower (text-only rows)."""
    dims = dict(dims)
    mrope = dims.pop("mrope_section")
    return qwen2_5_vl(device, dtype, vocab=vocab, text=dims, mrope_section=mrope,
                      vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[0]))


def decode_at_scale(device, dtype, limits: dict | None, *, dims: dict = AT_SCALE, vocab: int = VOCAB,
                    row_counts=(64, 128), prompt_len: int = 256, new: int = 64) -> list[dict]:
    """The paged engine's decode on text-only rows of a 7B-layer-shaped model, as a % of the weight
    + KV read bound: ``row_counts`` rows (prompts of ``prompt_len`` tokens, 4 samples each), no
    early end; with the decode steps as CUDA graphs and without (on CUDA). At 128 rows the default
    64-row fixed-shape passes read the weights twice a step: the row with ``invariant_rows`` =
    rows says what that costs."""
    from staged.rollout import SamplingParams, generate, row_seed

    dev = torch.device(device)
    model = build_text_model(dev, dtype, dims, vocab)
    weight_bytes = decode_weight_bytes(model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in row_counts:
        G = 4
        prompts = torch.randint(3, vocab - 20, (-(-n // G), prompt_len), generator=gen)
        ids = prompts.repeat_interleave(G, 0)[:n]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "prompt_index": [r // G for r in range(n)]}
        seeds = torch.tensor([row_seed(1, 0, i) for i in range(n)])
        case = f"at scale: 7B layers x{dims['num_hidden_layers']}, {n} rows, {prompt_len}-token prompts, {new} new"
        if dims is not AT_SCALE:
            case = f"at scale (tiny dims): {n} rows"
        variants = [("paged", dict(cuda_graphs=True))]
        if dev.type == "cuda":
            variants.append(("paged, no CUDA graphs", dict(cuda_graphs=False)))
            if n > 64:
                variants.append((f"paged, {n}-row passes", dict(cuda_graphs=True, invariant_rows=n)))
        params = [SamplingParams(max_new_tokens=new, eos_token_ids=(2,), pad_token_id=0, engine="paged", batch_size=n,
                                 suppress_token_ids=(2,), **kw) for _, kw in variants]
        # one warm-up per row count (the allocator, Triton's compiles, the attention's device check);
        # graphs are captured per rollout anyway: those steps are left out of the step time below
        generate(model, batch, params[0], seeds=seeds, device=dev, dtype=dtype)
        for (impl, _), sp in zip(variants, params):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = generate(model, batch, sp, seeds=seeds, device=dev, dtype=dtype)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            stats = out.stats
            n_tok = int(out.completion_mask.sum())
            steady = max(1, stats["steady_decode_steps"])
            row = {"case": case, "impl": impl, "median_ms": dt * 1e3, "p20_ms": dt * 1e3, "p80_ms": dt * 1e3,
                   "completion_tokens": n_tok, "tokens_per_s": n_tok / dt, "prefill_ms": stats["prefill_s"] * 1e3,
                   "decode_ms": stats["decode_s"] * 1e3, "decode_step_ms": stats["steady_decode_s"] * 1e3 / steady,
                   "cache_mb": stats["cache_mb"]}
            if dev.type == "cuda":
                row["attention"] = stats["attention"]
                row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            if "graph_replays" in stats:
                row["graphs"] = f'{stats["graph_captures"]} captured, {stats["graph_replays"]} replays'
            if limits and limits.get("copy_gbps"):
                row["pct_of_read_bound"] = read_bound_pct(weight_bytes, stats, limits["copy_gbps"])
            rows.append(row)
    del model
    return rows


def run(device: str = "cpu", limits: dict | None = None, quick: bool = False) -> list[dict]:
    if not str(device).startswith("cuda"):
        return [{"case": "rollout at scale", "impl": "paged",
                 "note": "n/a: the 7B-layer shape is a GPU benchmark (tiny dims run in tests/test_benchmarks.py)"}]
    if quick:
        return decode_at_scale(device, torch.bfloat16, limits, dims=AT_SCALE_TINY, vocab=1000, row_counts=(8,),
                               prompt_len=16, new=8)
    return decode_at_scale(device, torch.bfloat16, limits)
