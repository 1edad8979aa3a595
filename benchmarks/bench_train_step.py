"""One GRPO step: staged's trainer vs TRL's GRPOTrainer, same model and data, at two shapes.

What is compared (every knob that changes the work is the same on both sides):

  model     ``staged.models.embedded.build_embedded_checkpoint`` (seed 0, fp32 weights, untied
            lm_head), loaded by each side from the same directory:
              embedded   the tiny default (V = 300, 0.9M parameters); 8 prompts x G = 8, <= 16
                         new tokens
              realistic  the rollout benchmark's Qwen2.5-VL shape (hidden 256, 4 layers, 82M
                         parameters) with the tokenizer padded to the real 151,936-token
                         vocabulary (every id decodes); 8 prompts x G = 5, <= 64 new tokens
  data      the synthetic *textual* stage ("What is 3 + 4?"), text-only: TRL gets each prompt as
            the same chat-templated string our trainer tokenizes (identical prompt tokens); the
            vision tower is in both models but sees no image (TRL's VLM path needs a full
            transformers processor with torchvision, which the embedded checkpoint does not need);
            the same 256 prompts, each side drawing its batches with its own shuffle
  step      the shape's prompts x G completions and token cap (temperature 1, top-p 1; the vision
            placeholder tokens are suppressed on both sides), reward = the paper's reward through
            ``staged.rewards.compute_rewards`` (TRL calls it as its reward function), group
            advantages with std normalisation, loss ``grpo`` (eps 0.2 / 0.3, beta 0: no reference
            model, on-policy: no old-log-prob pass), all 64 sequences in one micro-batch, AdamW
            lr 5e-4 constant, grad-norm clip 1.0; no gradient checkpointing; fp32 on CPU
            (bf16 autocast / bf16 mixed precision on CUDA)
  threads   1 torch thread on CPU for both (the trainer's own ``cpu_threads`` default)

Implementations, each in its own subprocess (so that peak RSS is its own):

  staged            ``staged.train.train`` on a one-stage config; its ``grpo_step`` is wrapped with
                    a wall clock (rollout with a KV cache, rewards, advantages, fused log-prob +
                    GRPO loss, backward, optimizer step); padded micro-batch (the default)
  staged packed     the same with ``packing.enabled``: the policy forward on packed sequences
                    (planner + varlen attention; on a CPU a per-sequence SDPA loop)
  trl               ``trl.GRPOTrainer.train()``; a callback times on_step_begin -> on_step_end
                    (generation, rewards, loss, backward, optimizer step: the same span)
  trl+staged loss   the same TRL trainer with ``staged.kernels.trl_adapter.patch_grpo_trainer``

The implementations run in alternating rounds (staged, staged packed, trl, trl+staged loss, staged,
...; 2 rounds of 1 warm-up + 5 timed steps each; CUDA: 1 round of 8; --quick: 1 round of 3 steps,
staged and trl only), so that load from other processes on a shared machine falls on all of them
alike; the timed steps of all rounds are pooled.
Per step: wall-clock median and 20/80 %, ``cpu_ms`` (process CPU time: the steadier number on a
busy machine), completion tokens per row (the two samplers draw different tokens; a fresh model
rarely stops early, so both run ~16 tokens), peak RSS of the whole process (``resource.getrusage``
ru_maxrss: imports + model + data + steps) and ``steps_rss_extra_mb``, the peak during the timed
steps above the resident memory just before them (Linux VmHWM, reset through /proc/self/clear_refs).
``time_vs_trl`` / ``cpu_time_vs_trl`` = TRL's median / ours (> 1: we are faster); ``rss_vs_trl`` =
our peak RSS / TRL's (< 1: we use less). The untrained model scores 0 on every completion, so the
advantages (and the gradients) are 0 on both sides: the work per step does not depend on that.
On this model (V = 300, 0.9M parameters) the step is decode + forward/backward through the
transformer layers; what the fused log-prob saves grows with V x tokens (see linear_logprob).

    python -m benchmarks.bench_train_step [--device cpu|cuda] [--quick]
    python -m benchmarks --only train_step
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import hwm_mb, peak_rss_mb, quantiles_ms, reset_peak_rss, rss_mb

LR = 5e-4
NUM_SAMPLES = 256
DATA_SEED = 1000   # the textual stage's synthetic seed when it is stage 1 of a seed-0 run
IMPLS = ("staged", "staged packed", "trl", "trl+staged loss")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    size: str                   # staged.models.embedded SIZES preset
    vocab_size: int | None      # None: the embedded tokenizer's own 300 tokens
    prompts: int
    group: int
    max_new: int


SHAPES = {
    # the embedded default as `make demo` trains it: the step is decode + tiny transformer layers
    "embedded": Shape("embedded", "tiny", None, prompts=8, group=8, max_new=16),
    # the rollout benchmark's model (hidden 256, 4 layers, 82M parameters) at the real vocabulary
    # (the tokenizer padded to 151,936 decodable tokens): the lm_head, the sampler and the
    # log-prob over V dominate, as they do at scale
    "realistic": Shape("realistic", "bench", 151_936, prompts=8, group=5, max_new=64),
}
# the embedded shape's numbers, read by tests and older callers
PROMPTS, GROUP, MAX_NEW = SHAPES["embedded"].prompts, SHAPES["embedded"].group, SHAPES["embedded"].max_new


def _setup_text(device: str, shape: Shape) -> str:
    model = ("embedded Qwen2.5-VL" if shape.vocab_size is None else
             f"Qwen2.5-VL-shaped 82M, V={shape.vocab_size}")
    return (f"{model}, textual, {shape.prompts} prompts x G={shape.group}, <= {shape.max_new} new tokens, "
            f"{'fp32 1 thread' if device == 'cpu' else 'bf16'}")


# ---------------------------------------------------------------------------------------------
# the clock around each step


class _Clock:
    """Wall times of the steps and the RSS around them; the first ``warmup`` steps are dropped."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device = warmup, device
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.base_mb = None
        self.hwm_ok = False
        self._t0 = 0.0

    def _sync(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def begin(self):
        if len(self.times) == self.warmup:   # the first timed step: memory baseline from here on
            self.hwm_ok = reset_peak_rss()
            self.base_mb = rss_mb()
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.reset_peak_memory_stats()
        self._sync()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def end(self):
        self._sync()
        self.times.append((time.perf_counter() - self._t0) * 1e3)
        self.cpu.append((time.process_time() - self._c0) * 1e3)

    def result(self, **extra) -> dict:
        timed = self.times[self.warmup:]
        hwm = hwm_mb() if self.hwm_ok else None
        out = {"step_ms": timed, "cpu_ms": self.cpu[self.warmup:], "warmup_ms": self.times[:self.warmup],
               "peak_rss_mb": peak_rss_mb(),
               "steps_rss_extra_mb": (hwm - self.base_mb) if (hwm is not None and self.base_mb is not None)
               else None}
        if self.device.startswith("cuda"):
            import torch

            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out.update(extra)
        return out


def _samples():
    from staged.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset("textual", NUM_SAMPLES, seed=DATA_SEED)


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own process)


def staged_config(model_dir: str, out_dir: str, device: str, steps: int, *, packed: bool = False,
                  shape: Shape = SHAPES["embedded"]):
    """The one-stage run our side trains (a validated ``staged.config.TrainConfig``); ``packed``:
    the policy forward on packed micro-batches (``packing.enabled``) instead of padded ones."""
    from staged.config import from_dict

    extra = {"packing": {"enabled": True}} if packed else {}
    PROMPTS, GROUP, MAX_NEW = shape.prompts, shape.group, shape.max_new
    return from_dict({**extra,
        "model": model_dir, "output_dir": out_dir, "seed": 0,
        "device": device, "precision": "fp32" if device == "cpu" else "bf16", "cpu_threads": 1,
        "export_hf": False, "tensorboard": False, "plot": False, "progress": False, "resume": "never",
        "stages": [{
            "name": "textual", "data": {"synthetic": "textual", "num_samples": NUM_SAMPLES, "seed": DATA_SEED},
            "reward": {"kind": "paper", "format_weight": 0.1}, "freeze": [], "steps": steps,
            "lr": LR, "schedule": "constant", "max_grad_norm": 1.0,
            "batch": {"prompts_per_step": PROMPTS, "group_size": GROUP, "micro_batch_size": PROMPTS * GROUP},
            "grpo": {"loss_type": "grpo", "eps_low": 0.2, "eps_high": 0.3, "beta": 0.0, "temperature": 1.0,
                     "top_p": 1.0, "max_response_tokens": MAX_NEW, "old_logp": "recompute"},
        }],
    })


def _staged_worker(model_dir: str, out_dir: str, device: str, warmup: int, steps: int, packed: bool,
                   shape: Shape) -> dict:
    import staged.train as T

    cfg = staged_config(model_dir, out_dir, device, warmup + steps, packed=packed, shape=shape)
    clock = _Clock(warmup, device)
    inner = T.grpo_step
    lengths, rewards = [], []

    def timed_step(*args, **kwargs):
        clock.begin()
        rec = inner(*args, **kwargs)
        clock.end()
        if len(clock.times) > warmup:
            lengths.append(rec["response_length"])
            rewards.append(rec["reward"])
        return rec

    T.grpo_step = timed_step   # train() looks the step function up in its module at each step
    try:
        T.train(cfg)
    finally:
        T.grpo_step = inner
        from staged import parallel

        parallel.destroy_distributed()
    return clock.result(completion_tokens=statistics.mean(lengths), reward=statistics.mean(rewards))


def _trl_worker(model_dir: str, out_dir: str, device: str, warmup: int, steps: int, fused: bool,
                shape: Shape) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from staged.data.prompting import prompt_text
    from staged.models.loading import load_processor
    from staged.rewards import compute_rewards

    if device == "cpu":
        torch.set_num_threads(1)
    processor = load_processor(model_dir)
    tok = processor.tokenizer
    tok.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    samples = _samples()
    ds = Dataset.from_dict({"prompt": [prompt_text(processor, s) for s in samples], "idx": list(range(len(samples)))})
    lengths, rewards = [], []

    def reward(completions, idx, **kwargs):
        r = compute_rewards(list(completions), [samples[i] for i in idx], kind="paper", format_weight=0.1)["reward"]
        rewards.append(float(r.mean()))
        return r.tolist()

    # the tokens our sampler never draws (vision placeholders; see staged.train.sampling_params)
    vision = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    suppress = sorted({tok.convert_tokens_to_ids(t) for t in vision} - {None, tok.unk_token_id})
    clock = _Clock(warmup, device)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.end()

    args = dict(
        output_dir=out_dir, per_device_train_batch_size=shape.prompts * shape.group, num_generations=shape.group,
        gradient_accumulation_steps=1, steps_per_generation=1, max_completion_length=shape.max_new,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="grpo", epsilon=0.2, epsilon_high=0.3,
        scale_rewards="group", learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=1.0, max_steps=warmup + steps, logging_steps=warmup + steps,
        report_to="none", use_cpu=device == "cpu", bf16=device != "cpu", gradient_checkpointing=False,
        save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
        generation_kwargs={"suppress_tokens": suppress},
    )
    # older TRL releases lack some of these fields: drop them and say so, rather than fail
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    dropped = sorted(k for k in args if k not in known)
    args = GRPOConfig(**{k: v for k, v in args.items() if k in known})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    if fused:
        from staged.kernels.trl_adapter import patch_grpo_trainer

        patch_grpo_trainer(trainer)
    trainer.train()
    for h in trainer.state.log_history:
        if "completions/mean_length" in h:
            lengths.append(h["completions/mean_length"])
    timed_rewards = rewards[warmup:] or rewards
    return clock.result(completion_tokens=statistics.mean(lengths) if lengths else None,
                        completion_tokens_note="mean over all steps (TRL logs it once)",
                        reward=statistics.mean(timed_rewards),
                        note=f"GRPOConfig without {dropped} (older TRL)" if dropped else None)


def worker(impl: str, model_dir: str, device: str, warmup: int, steps: int, shape: str = "embedded") -> dict:
    sh = SHAPES[shape]
    with tempfile.TemporaryDirectory(prefix="staged-bench-") as out:
        if impl in ("staged", "staged packed"):
            return _staged_worker(model_dir, out, device, warmup, steps, packed=impl == "staged packed", shape=sh)
        if impl in ("trl", "trl+staged loss"):
            return _trl_worker(model_dir, out, device, warmup, steps, fused=impl != "trl", shape=sh)
    raise ValueError(f"unknown implementation {impl!r}; known: {IMPLS}")


def run_worker(impl: str, model_dir: str, device: str, warmup: int, steps: int, shape: str = "embedded",
               timeout: float = 1200) -> dict:
    """``worker`` in a fresh interpreter: its own imports, its own peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.bench_train_step", "--worker", impl, "--model-dir", model_dir,
           "--device", device, "--warmup", str(warmup), "--steps", str(steps), "--shape", shape]
    p = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{") and '"step_ms"' in ln]
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise RuntimeError(err[-1][:160] if err else f"worker exited {p.returncode}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# rows


def _has_packing() -> bool:
    from staged.config import TrainConfig

    return "packing" in {f.name for f in dataclasses.fields(TrainConfig)}


def _missing_trl() -> str | None:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure: skip with the reason
        return f"{type(exc).__name__}: {exc}"
    return None


def run(device: str = "cpu", limits: dict | None = None, quick: bool = False, shapes: tuple[str, ...] | None = None
        ) -> list[dict]:
    """Rows for benchmarks/__main__.py, per shape (quick: the embedded shape only). The
    implementations run in alternating rounds (staged, trl, trl+staged loss, staged, trl, ...),
    each round a fresh process with its own warm-up, so that load from other processes on a shared
    machine falls on all of them alike; the timed steps of all rounds are pooled. ``cpu_ms``
    (process CPU time per step) is the steadier number there."""
    from staged.models.embedded import build_embedded_checkpoint

    dev = "cuda" if device.startswith("cuda") else "cpu"
    shapes = shapes or (("embedded",) if quick else tuple(SHAPES))
    missing = _missing_trl()
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        rounds, warmup, steps = (1, 1, 3) if quick else (2, 1, 5) if name == "embedded" else (2, 1, 2)
        if dev == "cuda" and not quick:
            rounds, steps = 1, 8   # a GPU of one's own: no neighbours to spread over rounds
        impls = ("staged", "trl") if quick else IMPLS
        case = _setup_text(dev, shape)
        got: dict[str, list[dict]] = {i: [] for i in impls}
        notes: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="staged-bench-model-") as tmp:
            model_dir = str(build_embedded_checkpoint(Path(tmp) / name, seed=0, size=shape.size,
                                                      vocab_size=shape.vocab_size))
            for _ in range(rounds):
                for impl in impls:
                    if impl in notes:
                        continue
                    if impl.startswith("trl") and missing:
                        notes[impl] = f"skipped: trl/datasets not importable ({missing})"
                        continue
                    if impl == "staged packed" and not _has_packing():
                        notes[impl] = "skipped: this trainer has no packing option"
                        continue
                    try:
                        got[impl].append(run_worker(impl, model_dir, dev, warmup, steps, shape=name))
                    except Exception as exc:  # noqa: BLE001 - one failing side is reported, the others run
                        notes[impl] = f"failed: {str(exc)[:160]}"
        rows += _rows(case, impls, got, notes, dev)
    return rows


def _rows(case: str, impls, got: dict, notes: dict, dev: str) -> list[dict]:
    rows = []
    for impl in impls:
        ms = [t for m in got[impl] for t in m["step_ms"]]
        if impl in notes or not ms:
            rows.append({"case": case, "impl": impl, "note": notes.get(impl, "no timed steps")})
            continue
        cpu = [t for m in got[impl] for t in m["cpu_ms"]]
        tok = [m["completion_tokens"] for m in got[impl] if m.get("completion_tokens") is not None]
        extra = [m["steps_rss_extra_mb"] for m in got[impl] if m.get("steps_rss_extra_mb") is not None]
        row = {"case": case, "impl": impl, **quantiles_ms(ms), "cpu_ms": statistics.median(cpu), "steps": len(ms),
               "completion_tokens": statistics.mean(tok) if tok else None,
               "peak_rss_mb": max(m["peak_rss_mb"] for m in got[impl]),
               "steps_rss_extra_mb": max(extra) if extra else None}
        note = next((m["note"] for m in got[impl] if m.get("note")), None)
        if note:
            row["note"] = note
        if dev == "cuda":
            row["peak_gpu_mb"] = max(m.get("peak_gpu_mb") or 0.0 for m in got[impl])
        rows.append(row)
    trl = next((r for r in rows if r["impl"] == "trl" and r.get("median_ms")), None)
    for r in rows:
        if trl and r.get("median_ms"):
            r["time_vs_trl"] = trl["median_ms"] / r["median_ms"]
            r["cpu_time_vs_trl"] = trl["cpu_ms"] / r["cpu_ms"]
            r["rss_vs_trl"] = r["peak_rss_mb"] / trl["peak_rss_mb"]
    return rows


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one round of 3 timed steps, staged and trl only")
    p.add_argument("--worker", choices=IMPLS, help="(internal) run one implementation, print JSON")
    p.add_argument("--shape", choices=tuple(SHAPES), action="append",
                   help="shape(s) to run (default: all; --quick: embedded)")
    p.add_argument("--model-dir")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    if args.worker:
        res = worker(args.worker, args.model_dir, args.device, args.warmup, args.steps, (args.shape or ["embedded"])[0])
        print(json.dumps(res), flush=True)
        return 0
    from benchmarks.common import markdown_table

    print(markdown_table(run(args.device, quick=args.quick, shapes=tuple(args.shape) if args.shape else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
