"""What makes a checkpoint ours: the run identity checked before a resume, the run lock of an
output directory, and the up-front check that the output directories are writable.

Identity. Every checkpoint's trainer state records the model (path and a fingerprint of its
weight files), the stage list (names and types) and the config fields that change training
(with their hash). A resume compares them with the run being started and refuses, in one
message, when anything that shaped the saved weights differs: another model of the same
architecture would otherwise continue silently from the old model's weights, and a changed
stage list would resume into the wrong stage. Changes that cannot matter to the weights trained
so far (logging, evaluation, checkpoint cadence, steps of a stage not started yet, the model's
path when its weights are the same) are allowed and listed.

Lock. Rank 0 holds ``<output_dir>/.staged.lock`` (an flock, released by the kernel when the
process dies, however it dies) for the whole run: a second run in the same directory would
interleave metrics.jsonl and prune the first run's checkpoints. A lock left by a dead run is
simply taken over; the file's pid/host/time only feed the message.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class RefuseStart(RuntimeError):
    """The run cannot start as configured; the message says why and what to do. The trainer
    prints it as one message (no traceback) and exits with status 2."""

    one_message = True


# ------------------------------------------------------------------------------------------
# identity

# Run-level fields that do not change what is trained (where it is written, how it is shown,
# how often it is saved, how long ranks wait, the parallel layout, the rollout engine: its
# completions do not depend on engine, slots or cache size). Everything else does.
SAFE_RUN_FIELDS = ("embedded_dir", "device", "cpu_threads", "dist_timeout_s", "fsdp", "rollout", "eval", "output_dir",
                   "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "export_hf", "export_dtype",
                   "max_consecutive_bad_steps", "finished_check_every", "tensorboard", "plot", "progress",
                   "image_cache_mb",
                   "model")  # the model is compared by its weights' fingerprint, not by its path
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def model_fingerprint(path: str | Path, *, samples: int = 16, block: int = 1 << 16) -> str:
    """A hash of the model's weight files: names, sizes and ``samples`` blocks of each file's
    bytes at fixed offsets. Two checkpoints of one architecture have the same names and sizes
    (and safetensors headers), so bytes are sampled; a few MiB read, not the whole model, and no
    mtimes, so a copied model keeps its fingerprint."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for i in range(samples):
                fh.seek(max(0, (size - block) * i // max(1, samples - 1)))
                h.update(fh.read(block))
    return h.hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(d, list) and prefix == "stages":
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"stages[{i}]"))
        return out
    return {prefix: d}


def training_fields(cfg) -> dict[str, Any]:
    """The config fields that change training, flattened (``stages[1].grpo.beta``)."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SAFE_RUN_FIELDS}
    return _flatten(json.loads(json.dumps(d)))  # JSON round trip: what the checkpoint will hold


_NO_DEFAULT = object()


def field_default(key: str) -> Any:
    """The default of a flattened config field (``stages[1].grpo.ppo_epochs`` -> 1). A field added
    to the config keeps the old behaviour at its default, so a checkpoint written before it existed
    may resume when it has that value."""
    from staged.config import StageConfig, TrainConfig

    if key.startswith("stages["):
        flat = _flatten(json.loads(json.dumps(dataclasses.asdict(StageConfig()))))
        return flat.get(key[key.index("]") + 2:], _NO_DEFAULT)
    run = {k: v for k, v in dataclasses.asdict(TrainConfig(stages=[StageConfig()])).items() if k != "stages"}
    return _flatten(json.loads(json.dumps(run))).get(key, _NO_DEFAULT)


def run_identity(cfg, model_path: str | Path) -> dict[str, Any]:
    fields = training_fields(cfg)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k in SAFE_RUN_FIELDS and k not in ("model", "resume")}
    return {
        "settings": _flatten(json.loads(json.dumps(settings))),  # free to change; listed when they do
        "model": str(Path(model_path).resolve()),
        "model_fingerprint": model_fingerprint(model_path),
        "stages": [[s.name, s.type] for s in cfg.stages],
        "config_hash": hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16],
        "config": fields,
    }


def _later_stage_steps(key: str, stage: int) -> bool:
    """``stages[i].steps`` (or ``.epochs``) of a stage after the checkpoint's one: not trained yet, free
    to change."""
    if not (key.startswith("stages[") and key.endswith(("].steps", "].epochs"))):
        return False
    return int(key[len("stages["):key.index("]")]) > stage


def compare_identity(saved: dict[str, Any], current: dict[str, Any], stage: int) -> tuple[list[str], list[str]]:
    """(differences that forbid the resume, allowed differences), each a readable line.
    ``stage``: the checkpoint's stage index."""
    unsafe, safe = [], []
    if saved["model_fingerprint"] != current["model_fingerprint"]:
        unsafe.append(f"model: the checkpoint was trained from {saved['model']} (weights fingerprint "
                      f"{saved['model_fingerprint']}), this run loads {current['model']} (weights fingerprint "
                      f"{current['model_fingerprint']})")
    elif saved["model"] != current["model"]:
        safe.append(f"model path: {saved['model']} -> {current['model']} (same weights)")
    if saved["stages"] != current["stages"]:
        fmt = lambda st: ", ".join(f"{n} ({t})" for n, t in st)  # noqa: E731
        unsafe.append(f"stages: the checkpoint's run has [{fmt(saved['stages'])}], this run has "
                      f"[{fmt(current['stages'])}]")
    a, b = saved["config"], current["config"]
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") == b.get(k, "<unset>"):
            continue
        if k not in a and b[k] == field_default(k):  # added since the checkpoint, at the default: the old behaviour
            continue
        line = f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        if _later_stage_steps(k, stage):
            safe.append(line)
        elif not (k.startswith("stages[") and saved["stages"] != current["stages"]):  # said once above
            unsafe.append(line)
    a, b = saved.get("settings", {}), current.get("settings", {})
    safe += [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
             if a.get(k, "<unset>") != b.get(k, "<unset>")]
    return unsafe, safe


def check_resume(ckpt: Path, state: dict[str, Any], current: dict[str, Any], ckpt_dir: Path, output_dir: Path,
                 log=print) -> None:
    """Refuse (RefuseStart) to resume ``ckpt`` into a run it does not belong to; log allowed changes."""
    saved = state.get("identity")
    if int(state.get("stage", 0)) >= len(current["stages"]):
        raise RefuseStart(f"cannot resume from {ckpt}: it is in stage {state.get('stage')} "
                          f"({state.get('stage_name')!r}) but this run has {len(current['stages'])} stages. To start "
                          f"over, set resume=never (deletes the checkpoints in {ckpt_dir}) or choose another "
                          f"output_dir (now {output_dir})")
    if saved is None:
        log(f"[resume] {ckpt.name} records no run identity (written by an older staged): not checked")
        return
    unsafe, safe = compare_identity(saved, current, int(state.get("stage", 0)))
    if unsafe:
        raise RefuseStart(
            f"cannot resume from {ckpt}: it belongs to a different run. What differs:\n  - " + "\n  - ".join(unsafe)
            + f"\nTo start over, set resume=never (deletes the checkpoints in {ckpt_dir}) or choose another "
              f"output_dir (now {output_dir}); to continue the old run, run it with its old config.")
    if safe:
        log(f"[resume] {ckpt.name}: allowed changes since it was saved: " + "; ".join(safe))


# ------------------------------------------------------------------------------------------
# directories: writable, and locked by one run


def check_writable(*dirs: str | Path, rank: int = 0) -> None:
    """Create each directory and a file in it, so that a read-only or full location is found
    before the model is loaded, not at the first checkpoint."""
    for d in dict.fromkeys(Path(x) for x in dirs):
        probe = d / f".write-test-{rank}-{os.getpid()}"
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise RefuseStart(f"{d} is not writable ({type(e).__name__}: {e.strerror or e}); the run writes "
                              f"its checkpoints and metrics there. Fix the permissions or choose another "
                              f"output_dir / checkpoint_dir") from None


LOCK_FILE = ".staged.lock"


class RunLock:
    """flock on ``<dir>/.staged.lock``, held until :meth:`release` or the process ends."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                   if holder else "another process")
            raise RefuseStart(f"{self.path.parent} is in use by a live run ({who}): two runs in one output_dir "
                              f"would mix their metrics and checkpoints. Wait for it or stop it, or choose another "
                              f"output_dir") from None
        # Ours now (a dead holder's lock is released by the kernel): say who holds it.
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = release  # a train() that raised in-process (staged.ablation runs several) lets go too
