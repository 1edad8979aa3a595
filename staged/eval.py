"""Evaluation: accuracy and response length per benchmark, greedy or sampled.

    python -m staged.eval --model DIR --data wemath.jsonl realworldqa.parquet [--greedy]
                          [--temperature 1.0 --samples 8] [--max-new-tokens 2048] [--batch-size 16]
                          [--out results/] [--image-dir images/] [--format auto] [--task math]

Loads the checkpoint (load_model_and_processor) and each file (load_dataset_files: EasyR1 / verl /
TRL-style rows, JSONL or Parquet), generates with the trainer's rollout engine (staged.rollout), scores
with compute_rewards (the accuracy term: the per-task verifier, math-verify for free-form math when
installed), and prints a Markdown table:

    | benchmark | n | k | accuracy (%) | pass@k (%) | format (%) | tokens | truncated (%) |

Benchmarks: one per file (named by the file's stem), split further by a row's extra["benchmark"] or
extra["data_source"] (verl's column) when present, so one merged file can hold several. Rows
without a `task` are graded as "math" (letters as multiple choice, numbers numerically, the rest
symbolically): right for MathVista / WeMath / RealWorldQA-style MCQ and free-form rows.

Numbers: accuracy = mean over all n x k completions (mean@k); pass@k = share of rows with at least one
correct completion (k > 1); tokens = mean completion length in tokens, the end-of-turn token
included; truncated = completions that hit --max-new-tokens without ending. "average" is the mean over
benchmarks (each benchmark counts once, as papers report it), "all" pools every completion.

--out DIR gets results.json (everything above, the settings, and the verifier failure counts),
results.md (the table) and completions.jsonl (one line per completion: benchmark, row, sample, prompt,
answer, completion, accuracy, format, tokens, truncated).

`evaluate(model, processor, {"name": samples, ...})` is the same thing for the trainer's stage-end
evaluation; under torch.distributed every rank takes a share of the batches and all get the results.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

from staged.data.prompting import build_generation_batch
from staged.data.sample import Sample
from staged.rewards import compute_rewards, get_verifier_spec, with_image_geometry
from staged.rewards.compute import DEFAULT_TIMEOUT_S
from staged.rollout import SamplingParams, generate, row_seed, select_rows

# Greedy decoding through the sampling engine: at this temperature every token but the argmax has
# probability exp(-(gap in logits) / T) = 0 in fp32 for gaps > ~1e-4, so the inverse-CDF draw
# returns the argmax (exact ties aside).
GREEDY_TEMPERATURE = 1e-6
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
BENCHMARK_KEYS = ("benchmark", "data_source")


# ------------------------------------------------------------------------------------------------
# sampling setup


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def sampling_params(model, processor, *, max_new_tokens: int, temperature: float, top_p: float = 1.0
                    ) -> SamplingParams:
    """EOS from the generation config and the tokenizer; vision placeholders and vocabulary rows the
    tokenizer does not use are never sampled (as in training)."""
    tok = _tokenizer(processor)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tok.unk_token_id:
        eos.add(im_end)
    suppress = {tok.convert_tokens_to_ids(t) for t in VISION_TOKENS} - {None, tok.unk_token_id}
    vocab = model.config.get_text_config().vocab_size
    suppress |= set(range(len(tok), vocab))
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          eos_token_ids=tuple(sorted(eos)), pad_token_id=int(pad),
                          suppress_token_ids=tuple(sorted(suppress)))


def _patch_size(processor) -> int:
    ip = getattr(processor, "image_processor", None)
    return int(getattr(ip, "patch_size", 14) or 14)


# ------------------------------------------------------------------------------------------------
# the evaluation loop


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate(model, processor, datasets: dict[str, list[Sample]], *, greedy: bool = True, temperature: float = 1.0,
             top_p: float = 1.0, samples: int = 1, max_new_tokens: int = 1024, batch_size: int = 8,
             system_prompt: str | None = None, seed: int = 0, reward_fn=None, timeout: float = DEFAULT_TIMEOUT_S,
             device: torch.device | str | None = None, progress: bool = True, keep_completions: bool = True,
             prompt_template: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """Generate for every sample of every benchmark and score the answers.

    datasets: benchmark name -> samples. greedy: one argmax completion per sample (temperature,
    top_p and samples ignored); else `samples` completions per sample at `temperature` / `top_p`.
    batch_size: prompts per generate call (each with its k samples). reward_fn: a user reward
    function for the accuracy term instead of the per-task verifiers (see staged.rewards.user).
    prompt_template, min_pixels, max_pixels: as a stage's (staged.data.prompting).

    Returns {"benchmarks": {name: metrics}, "average": .., "all": .., "settings": .., "seconds": ..,
    "completions": [per-completion records] (when keep_completions)}; metrics: n, k, accuracy,
    pass@k, format, response_tokens, truncated, verifier_errors, verifier_timeouts (fractions in
    [0, 1], tokens a mean). The model is left in the mode it came in.
    """
    if not datasets:
        raise ValueError("evaluate: no datasets")
    empty = [name for name, ss in datasets.items() if not ss]
    if empty:
        raise ValueError(f"evaluate: benchmark(s) {empty} have no samples")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"evaluate: batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    k = 1 if greedy else int(samples)
    if k < 1:
        raise ValueError(f"evaluate: samples must be >= 1, got {samples}")
    if not greedy and not temperature > 0:
        raise ValueError(f"evaluate: temperature must be > 0 when sampling (use greedy), got {temperature}")
    if reward_fn is None:  # an unknown task fails now, not after the first batch's generation
        for task in sorted({s.task for ss in datasets.values() for s in ss}):
            get_verifier_spec(task)
    t_start = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    sp = sampling_params(model, processor, max_new_tokens=max_new_tokens,
                         temperature=GREEDY_TEMPERATURE if greedy else float(temperature),
                         top_p=1.0 if greedy else float(top_p))
    eos = torch.tensor(sp.eos_token_ids, dtype=torch.long)
    tok = _tokenizer(processor)
    patch = _patch_size(processor)

    # every (benchmark, first row, last row) batch, the same list on every rank
    names = list(datasets)
    batches = [(b, r, min(r + batch_size, len(datasets[name])))
               for b, name in enumerate(names) for r in range(0, len(datasets[name]), batch_size)]
    rank, world = _dist()
    mine = batches[rank::world]
    # every rank makes the same number of generate calls (FSDP gathers in each): pad with repeats
    n_calls = math.ceil(len(batches) / world)
    padded = mine + [mine[-1] if mine else batches[0]] * (n_calls - len(mine))

    records: list[dict] = []
    failures: dict[str, list[int]] = {}  # benchmark -> [verifier errors, verifier timeouts]
    bar = _progress(sum(len(v) for v in datasets.values()), progress and rank == 0)
    for call, (b, r0, r1) in enumerate(padded):
        name = names[b]
        chunk = datasets[name][r0:r1]
        base = build_generation_batch(processor, chunk, system_prompt=system_prompt, prompt_template=prompt_template,
                                      min_pixels=min_pixels, max_pixels=max_pixels)
        base["images_per_row"] = [len(s.images) for s in chunk]
        rows = [j for j in range(len(chunk)) for _ in range(k)]
        batch = select_rows(base, rows)
        seeds = torch.tensor([row_seed(seed, b, r0 + j, i) for j in range(len(chunk)) for i in range(k)])
        ro = generate(model, batch, sp, seeds=seeds, device=device, dtype=dtype)
        if call >= len(mine):
            continue  # a padding call: its results belong to another rank
        ids, mask = ro.completion_ids.cpu(), ro.completion_mask.cpu()
        lengths = mask.sum(-1).tolist()
        texts = [tok.decode(ids[i, :n].tolist(), skip_special_tokens=True) for i, n in enumerate(lengths)]
        ended = [n > 0 and bool(torch.isin(ids[i, n - 1], eos)) for i, n in enumerate(lengths)]
        graded = _with_geometry(chunk, base, patch)
        row_samples = [graded[j] for j in rows]
        scores = compute_rewards(texts, row_samples, reward_fn=reward_fn, timeout=timeout)
        for i, j in enumerate(rows):
            s = chunk[j]
            records.append({
                "benchmark": name, "row": r0 + j, "sample": i % k, "prompt": s.prompt, "answer": s.answer,
                "task": s.task, "completion": texts[i], "accuracy": float(scores["accuracy"][i]),
                "format": float(scores["format"][i]), "reward": float(scores["reward"][i]),
                "response_tokens": int(lengths[i]), "truncated": (not ended[i]) and lengths[i] >= max_new_tokens,
            })
        fails = failures.setdefault(name, [0, 0])
        fails[0] += int(scores["verifier_errors"])
        fails[1] += int(scores["verifier_timeouts"])
        bar.update(len(chunk))
    bar.close()

    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (records, failures))
        records, failures = [], {}
        for recs, fails in gathered:
            records += recs
            for name, (e, t) in fails.items():
                acc = failures.setdefault(name, [0, 0])
                acc[0] += e
                acc[1] += t
    records.sort(key=lambda x: (names.index(x["benchmark"]), x["row"], x["sample"]))

    results = summarize(records, names, k, failures)
    results["settings"] = {"greedy": greedy, "temperature": None if greedy else float(temperature),
                           "top_p": None if greedy else float(top_p), "samples": k,
                           "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed,
                           "system_prompt": system_prompt, "prompt_template": prompt_template,
                           "min_pixels": min_pixels, "max_pixels": max_pixels, "reward_fn": reward_fn if isinstance(reward_fn, str)
                           else None, "verifier_timeout_s": timeout}
    results["seconds"] = time.perf_counter() - t_start
    if keep_completions:
        results["completions"] = records
    return results


def _with_geometry(chunk: list[Sample], base: dict, patch: int) -> list[Sample]:
    """Grounding rows learn the resized image geometry (verify_bbox rescales predicted boxes with it)."""
    grid = base.get("image_grid_thw")
    out, at = [], 0
    for s in chunk:
        n = len(s.images)
        if s.task == "bbox" and n and grid is not None:
            s = with_image_geometry(s, grid[at:at + n], patch)
        out.append(s)
        at += n
    return out


def summarize(records: list[dict], names: list[str], k: int, failures: dict | None = None) -> dict:
    """Per-benchmark metrics from per-completion records (see evaluate); failures: benchmark ->
    [verifier errors, verifier timeouts]."""
    failures = failures or {}

    def metrics(recs: list[dict], which: list[str]) -> dict:
        n_comp = len(recs)
        rows: dict = OrderedDict()
        for r in recs:
            rows.setdefault((r["benchmark"], r["row"]), []).append(r["accuracy"])
        out = {"n": len(rows), "k": k, "completions": n_comp,
               "accuracy": sum(r["accuracy"] for r in recs) / n_comp,
               "format": sum(r["format"] for r in recs) / n_comp,
               "response_tokens": sum(r["response_tokens"] for r in recs) / n_comp,
               "truncated": sum(r["truncated"] for r in recs) / n_comp,
               "verifier_errors": sum(failures.get(w, [0, 0])[0] for w in which),
               "verifier_timeouts": sum(failures.get(w, [0, 0])[1] for w in which)}
        if k > 1:
            out[f"pass@{k}"] = sum(max(v) >= 1.0 for v in rows.values()) / len(rows)
        return out

    bench = OrderedDict((name, metrics([r for r in records if r["benchmark"] == name], [name])) for name in names)
    keys = ["accuracy", "format", "response_tokens", "truncated"] + ([f"pass@{k}"] if k > 1 else [])
    average = {key: sum(m[key] for m in bench.values()) / len(bench) for key in keys}
    return {"benchmarks": bench, "average": average, "all": metrics(records, names)}


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, desc="eval", unit="prompt", dynamic_ncols=True, file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# reporting


def markdown_table(results: dict) -> str:
    """The results as a Markdown table (percentages with 2 decimals, tokens with 1)."""
    k = results["all"]["k"]
    pk = f"pass@{k}"
    head = ["benchmark", "n", "k", "accuracy (%)"] + ([f"{pk} (%)"] if k > 1 else []) + \
           ["format (%)", "tokens", "truncated (%)"]

    def row(name, m, n="", kk=""):
        cells = [name, str(n), str(kk), f"{100 * m['accuracy']:.2f}"]
        if k > 1:
            cells.append(f"{100 * m[pk]:.2f}")
        cells += [f"{100 * m['format']:.2f}", f"{m['response_tokens']:.1f}", f"{100 * m['truncated']:.2f}"]
        return "| " + " | ".join(cells) + " |"

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, m in results["benchmarks"].items():
        lines.append(row(name, m, m["n"], m["k"]))
    if len(results["benchmarks"]) > 1:
        lines.append(row("average", results["average"]))
        lines.append(row("all", results["all"], results["all"]["n"], k))
    return "\n".join(lines)


def write_results(results: dict, out_dir) -> Path:
    """results.json (without the completions), results.md, completions.jsonl into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {key: v for key, v in results.items() if key != "completions"}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results) + "\n")
    with open(out / "completions.jsonl", "w") as f:
        for r in results.get("completions", []):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out


# ------------------------------------------------------------------------------------------------
# loading benchmark files


def load_benchmarks(paths, *, image_dir=None, format: str = "auto", default_task: str = "math",
                    on_bad_row: str = "error", limit: int | None = None, fields: dict | None = None,
                    verify_images: bool = True) -> dict[str, list[Sample]]:
    """One benchmark per file (its stem; made unique with the parent folder when two files share one),
    split by extra["benchmark"] / extra["data_source"] when rows carry them. limit: first N rows per
    benchmark."""
    from staged.data.files import load_dataset_files

    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    out: dict[str, list[Sample]] = OrderedDict()
    for p, stem in zip(paths, stems):
        name = stem if stems.count(stem) == 1 else f"{p.parent.name}/{stem}"
        ds = load_dataset_files([p], image_dir=image_dir, format=format, on_bad_row=on_bad_row,
                                default_task=default_task, fields=fields, verify_images=verify_images)
        if ds.skipped:
            print(ds.report(), file=sys.stderr)
        for s in ds.samples:
            key = next((str(s.extra[f]) for f in BENCHMARK_KEYS if s.extra.get(f) not in (None, "")), None)
            out.setdefault(key or name, []).append(s)
    if limit is not None:
        out = OrderedDict((n, ss[:limit]) for n, ss in out.items())
    return out


# ------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m staged.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face checkpoint directory (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="benchmark files (JSONL / Parquet)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding, one completion per row (default)")
    mode.add_argument("--temperature", type=float, default=None, help="sample at this temperature instead")
    p.add_argument("--samples", type=int, default=1, help="completions per row when sampling (k; pass@k reported)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when sampling")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="response token limit (the paper's: 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--out", default=None, help="write results.json, results.md and completions.jsonl here")
    p.add_argument("--image-dir", default=None, help="where relative image paths live (default: next to each file)")
    p.add_argument("--format", default="auto", choices=["auto", "easyr1", "verl", "trl"], help="row format")
    p.add_argument("--task", default="math", help="verifier for rows without a task (default math)")
    p.add_argument("--system-prompt", default=None, help="a system message for every prompt")
    p.add_argument("--prompt-template", default=None, metavar="JINJA",
                   help="a jinja template for the user turn ({{ content }} = the prompt), a .jinja file, or a "
                        "shipped one (math, math_release), as a stage's prompt_template")
    p.add_argument("--min-pixels", type=int, default=None, help="scale smaller images up to this many pixels")
    p.add_argument("--max-pixels", type=int, default=None, help="scale larger images down to this many pixels")
    p.add_argument("--reward-fn", default=None, metavar="MODULE:FUNCTION", help="user accuracy function")
    p.add_argument("--verifier-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per verifier call")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each benchmark")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of failing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.temperature is None and a.samples != 1:
        p.error("--samples needs --temperature (greedy decoding gives one completion per row)")
    if a.temperature is not None and not a.temperature > 0:
        p.error(f"--temperature must be > 0, got {a.temperature} (use --greedy)")
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.prompt_template is not None:
        from staged.data.prompting import load_template

        try:
            a.prompt_template = load_template(a.prompt_template)
        except ValueError as e:
            p.error(str(e))
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    from staged.models.loading import load_model_and_processor

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    datasets = load_benchmarks(a.data, image_dir=a.image_dir, format=a.format, default_task=a.task,
                               on_bad_row="skip" if a.skip_bad_rows else "error", limit=a.limit)
    model, processor = load_model_and_processor(a.model, dtype=dtype, device=device)
    print(f"eval: {a.model} on {device} ({str(dtype).replace('torch.', '')}); "
          + ", ".join(f"{n} ({len(s)} rows)" for n, s in datasets.items()), file=sys.stderr)
    greedy = a.temperature is None
    results = evaluate(model, processor, datasets, greedy=greedy, temperature=a.temperature or 1.0, top_p=a.top_p,
                       samples=a.samples, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                       system_prompt=a.system_prompt, seed=a.seed, reward_fn=a.reward_fn,
                       prompt_template=a.prompt_template, min_pixels=a.min_pixels, max_pixels=a.max_pixels,
                       timeout=a.verifier_timeout, device=device, progress=not a.no_progress)
    results["settings"].update(model=str(a.model), data=[str(p) for p in a.data], device=str(device),
                               dtype=str(dtype).replace("torch.", ""))
    print(markdown_table(results))
    if a.out:
        out = write_results(results, a.out)
        print(f"eval: wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'completions.jsonl'} "
              f"({results['seconds']:.1f} s)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
