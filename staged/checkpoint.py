"""Checkpoints: sharded DCP saves written atomically, resume, and HF exports.

Layout under the checkpoint directory::

    step-00000040/            a complete checkpoint (the name appears only once it is complete)
        .metadata, __0_0.distcp, ...   DCP shards: model (+ reference model), optimizer
        rng-rank0.pt, rng-rank1.pt     torch / python / numpy (/ cuda) RNG states of each rank
        trainer_state.json             stage index, stage step, global step, bad-step counter, ...
    .tmp-step-00000040/       being written; never picked up, removed at the next start

A checkpoint is written into ``.tmp-<name>`` by all ranks, then rank 0 renames it to ``<name>``
(an atomic rename on POSIX filesystems) after a barrier. A run killed at any moment therefore
leaves either a complete checkpoint or a temp dir that :func:`latest` ignores.

The learning-rate schedule is a pure function of the stage step, so the trainer state holds all
there is of the "scheduler". Data position = (stage index, stage step): the data order of a
stage is a function of the seed and the epoch.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from staged.parallel import Dist, barrier, broadcast_object

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def clean_temp(root: str | Path, dist_info: Dist) -> None:
    """Remove half-written ``.tmp-*`` dirs left by a killed run (rank 0; everyone waits)."""
    root = Path(root)
    if dist_info.is_main and root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
    barrier()


def remove_all(root: str | Path, dist_info: Dist) -> int:
    """Delete every checkpoint under root (``resume = "never"``). Returns how many."""
    found = list_checkpoints(root)
    if dist_info.is_main:
        for p in found:
            shutil.rmtree(p)
    barrier()
    return len(found)


# ------------------------------------------------------------------------------------------
# RNG


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------
# save / load


def _app_state(model, optimizer, ref_model) -> dict[str, Any]:
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    if ref_model is not None:
        state["ref_model"] = get_model_state_dict(ref_model)
    return state


def save(root: str | Path, global_step: int, *, model, optimizer, ref_model=None,
         trainer_state: dict[str, Any], dist_info: Dist, keep: int = 0) -> Path:
    """Write checkpoint ``step-<global_step>`` atomically; prune to the newest ``keep`` (0 = all)."""
    root = Path(root)
    name = checkpoint_name(global_step)
    final, tmp = root / name, root / f".tmp-{name}"
    if dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    dcp.save(_app_state(model, optimizer, ref_model), checkpoint_id=str(tmp))
    torch.save(_rng_state(dist_info.device), tmp / f"rng-rank{dist_info.rank}.pt")
    barrier()
    if dist_info.is_main:
        state = dict(trainer_state, world_size=dist_info.world_size, has_ref_model=ref_model is not None)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():  # the same step saved again (e.g. a stage end right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def load(path: str | Path, *, model, optimizer=None, ref_model=None, dist_info: Dist) -> dict[str, Any]:
    """Load a checkpoint into an already built (and sharded) model / optimizer / reference model
    and restore this rank's RNG states. ``optimizer=None`` loads the weights only (a new stage
    starting from the checkpoint). Returns the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    if ref_model is not None and not state.get("has_ref_model"):
        raise ValueError(f"{path}: the stage uses a reference model (beta > 0) but the checkpoint has none")
    app = _app_state(model, optimizer, ref_model)
    dcp.load(app, checkpoint_id=str(path))
    if optimizer is None:
        set_model_state_dict(model, app["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=app["model"], optim_state_dict=app["optim"])
    if ref_model is not None:
        set_model_state_dict(ref_model, app["ref_model"])
    rng_file = path / f"rng-rank{dist_info.rank}.pt"
    if state.get("world_size") != dist_info.world_size or not rng_file.is_file():
        if dist_info.is_main:
            print(f"[checkpoint] {path.name}: saved with world size {state.get('world_size')}, resuming with "
                  f"{dist_info.world_size}: RNG states are not restored (the run will not be bit-identical)")
    else:
        _set_rng_state(torch.load(rng_file, weights_only=False), dist_info.device)
    return state


def copy_weights(src, dst) -> None:
    """dst's parameters := src's (both sharded the same way): a local copy of each shard."""
    set_model_state_dict(dst, get_model_state_dict(src))


# ------------------------------------------------------------------------------------------
# HF export


def export_hf(model, processor, out_dir: str | Path, dist_info: Dist) -> Path:
    """Gather the full state dict on rank 0 (CPU) and write an HF safetensors checkpoint with
    processor files, loadable by ``from_pretrained``. Collective: every rank must call it."""
    out_dir = Path(out_dir)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_info.is_main:
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        _save_processor(processor, tmp, model.config.model_type)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    del sd
    barrier()
    return broadcast_object(out_dir)


_PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                    "qwen3_vl": "Qwen3VLProcessor", "qwen3_vl_moe": "Qwen3VLProcessor"}


def _save_processor(processor, out_dir: Path, model_type: str) -> None:
    from staged.models.loading import VLProcessor

    if isinstance(processor, VLProcessor):  # staged's torchvision-free stand-in: name the real class
        processor.save_pretrained(out_dir, processor_class=_PROCESSOR_CLASS.get(model_type))
    else:
        processor.save_pretrained(out_dir)
