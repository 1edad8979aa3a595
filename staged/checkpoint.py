"""Checkpoints: sharded DCP saves written atomically, resume, and HF exports.

Layout under the checkpoint directory::

    step-00000040/            a complete checkpoint (the name appears only once it is complete)
        .metadata, __0_0.distcp, ...   DCP shards: model (+ reference model), optimizer
        rng-rank0.pt, rng-rank1.pt     torch / python / numpy (/ cuda) RNG states of each rank
        checksums-rank0.json, ...      size and CRC-32 of every file the rank wrote (rank 0: also
                                       .metadata and trainer_state.json)
        trainer_state.json             stage index, stage step, global step, bad-step counter,
                                       the run's identity (staged.resume), ...
    .tmp-step-00000040/       being written; never picked up, removed at the next start
    damaged-step-00000044/    failed verification at a start; set aside, never picked up again

A checkpoint is written into ``.tmp-<name>`` by all ranks, then rank 0 renames it to ``<name>``
(an atomic rename on POSIX filesystems) after a barrier. A run killed at any moment therefore
leaves either a complete checkpoint or a temp dir that :func:`latest` ignores.

Resume verifies the checkpoint it picks (:func:`latest_intact`): every file listed in the
checksum manifests must exist with its size and CRC-32 (the ranks share the reading). A damaged or
incomplete newest checkpoint is named in a warning, set aside, and the next newest one is tried.
Checksums, not just sizes: a block of garbage inside a shard loads without any error and trains
on destroyed weights.

The learning-rate schedule is a pure function of the stage step, so the trainer state holds all
there is of the "scheduler". Data position = (stage index, stage step): the data order of a
stage is a function of the seed and the epoch.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import zlib
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
_SUMS = re.compile(r"^checksums-rank(\d+)\.json$")


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
    with _disk_errors(tmp):
        before = set(os.listdir(tmp))
        dcp.save(_app_state(model, optimizer, ref_model), checkpoint_id=str(tmp))
        rng = f"rng-rank{dist_info.rank}.pt"
        torch.save(_rng_state(dist_info.device), tmp / rng)
        # DCP names each rank's shard files __<rank>_<i>.distcp; they are this rank's to checksum.
        mine = [f for f in set(os.listdir(tmp)) - before if f.startswith(f"__{dist_info.rank}_")] + [rng]
        if not dist_info.is_main:
            _write_checksums(tmp, dist_info.rank, mine)
    barrier()
    if dist_info.is_main:
        state = dict(trainer_state, world_size=dist_info.world_size, has_ref_model=ref_model is not None,
                     checksums=True)
        with _disk_errors(tmp):
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            _write_checksums(tmp, 0, mine + [".metadata", STATE_FILE])
        if final.exists():  # the same step saved again (e.g. a stage end right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written (damaged, unreadable, disk full); names the file
    or directory. Printed as one message, without a traceback (staged.parallel.fail)."""

    one_message = True


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    try:
        state = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read the trainer state: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(state).__name__}")
    return state


# ------------------------------------------------------------------------------------------
# integrity: per-file checksums written at save, verified before a resume


def _crc32(path: Path, chunk: int = 8 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _write_checksums(ckpt: Path, rank: int, files: list[str]) -> None:
    sums = {f: {"size": (ckpt / f).stat().st_size, "crc32": _crc32(ckpt / f)} for f in sorted(files)}
    (ckpt / f"checksums-rank{rank}.json").write_text(json.dumps(sums, indent=1) + "\n")


def _manifest(ckpt: Path) -> dict[str, dict] | None:
    """Every checksummed file of the checkpoint, or None for a checkpoint written before checksums.
    Raises CheckpointError when the manifests themselves are missing or unreadable."""
    state = read_trainer_state(ckpt)
    if not state.get("checksums"):
        return None
    names = {p.name for p in ckpt.iterdir() if _SUMS.match(p.name)}
    world = state.get("world_size", 1)
    missing = [f"checksums-rank{r}.json" for r in range(world) if f"checksums-rank{r}.json" not in names]
    if missing:
        raise CheckpointError(f"{ckpt / missing[0]}: missing (incomplete checkpoint)")
    out: dict[str, dict] = {}
    for n in sorted(names):
        try:
            out.update(json.loads((ckpt / n).read_text()))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt / n}: unreadable checksum manifest: {e}") from None
    return out


def verify_files(ckpt: Path, manifest: dict[str, dict], rank: int = 0, world_size: int = 1) -> list[str]:
    """Check this rank's share of the manifest (every world_size-th file). Returns problems, each
    naming its file."""
    bad = []
    for i, (name, want) in enumerate(sorted(manifest.items())):
        if i % world_size != rank:
            continue
        f = ckpt / name
        try:
            size = f.stat().st_size
        except OSError:
            bad.append(f"{f}: missing")
            continue
        if size != want["size"]:
            bad.append(f"{f}: {size} bytes, expected {want['size']} (truncated or overwritten)")
        elif _crc32(f) != want["crc32"]:
            bad.append(f"{f}: checksum mismatch (damaged contents)")
    return bad


def check_checkpoint(ckpt: Path, dist_info: Dist) -> list[str]:
    """Problems of checkpoint ``ckpt`` (empty = intact), the same list on every rank. Collective."""
    from staged.parallel import all_gather_object

    try:
        manifest = _manifest(ckpt)
        bad = verify_files(ckpt, manifest, dist_info.rank, dist_info.world_size) if manifest else []
    except CheckpointError as e:
        bad = [str(e)]
    return sorted({b for part in all_gather_object(bad) for b in part})


def latest_intact(root: str | Path, dist_info: Dist, *, warn=print) -> Path | None:
    """The newest checkpoint that passes :func:`check_checkpoint`, or None. Newer ones that fail
    are named with their problems and renamed ``damaged-step-*`` (kept for inspection, never tried
    again). Collective."""
    for ckpt in reversed(list_checkpoints(root)):
        bad = check_checkpoint(ckpt, dist_info)
        if not bad:
            return ckpt
        aside = ckpt.with_name("damaged-" + ckpt.name)
        if dist_info.is_main:
            shown = "\n  ".join(bad[:5]) + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else "")
            warn(f"[checkpoint] WARNING: {ckpt} is damaged or incomplete; moved to {aside.name} and not used:\n"
                 f"  {shown}")
            if aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt, aside)
        barrier()
    return None


# ------------------------------------------------------------------------------------------
# disk errors during a save


def _errors_in(exc: BaseException):
    """exc and every exception inside it: causes, contexts, DCP's per-rank failures."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for v in (getattr(e, "failures", None) or {}).values():  # CheckpointException: rank -> (exc, trace)
            todo.append(v[0] if isinstance(v, tuple) else v)


class _disk_errors:
    """Turn a failed write into one error naming the directory and its free space. A full disk
    shows up as OSError(ENOSPC), or from torch.save's zip writer as "unexpected pos N vs M"."""

    def __init__(self, where: Path):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        if exc is None or isinstance(exc, KeyboardInterrupt):
            return False
        errs = list(_errors_in(exc))
        if not any(isinstance(e, OSError) or "unexpected pos" in str(e) or "PytorchStreamWriter" in str(e)
                   for e in errs):
            return False
        try:
            free = shutil.disk_usage(self.where if self.where.exists() else self.where.parent).free
            free_s = f"{free / 2**20:,.1f} MiB free"
        except OSError:
            free, free_s = None, "free space unknown"
        full = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in errs) or (
            free is not None and free < 64 * 2**20)
        first = next((e for e in errs if isinstance(e, OSError)), errs[-1])
        what = "disk full" if full else f"{type(first).__name__}: {str(first).strip().splitlines()[0][:300]}"
        raise CheckpointError(f"saving checkpoint {self.where.name.removeprefix('.tmp-')} into {self.where.parent} "
                              f"failed: {what} ({free_s} there). The half-written {self.where.name} is removed at "
                              f"the next start; earlier checkpoints are intact") from None


def _params_without_optimizer_state(path: Path, app: dict[str, Any]) -> set[str]:
    """Parameters the checkpoint holds no optimizer state for: trainable ones that had no gradient
    yet when it was saved (the vision tower of a text-only stage). A fresh optimizer's state dict
    has every parameter's, so those keys are let go missing, and nothing else: a missing weight is
    an error naming it."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    try:
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path / '.metadata'}: cannot read the checkpoint's metadata: "
                              f"{type(e).__name__}: {e}") from None
    missing = set(flatten_state_dict(app)[0]) - saved
    weights = sorted(k for k in missing if not k.startswith("optim.state."))
    if weights:
        raise CheckpointError(f"{path}: the checkpoint lacks {len(weights)} entries this run needs "
                              f"(first: {weights[0]})")
    names = {n for n, _ in app["model"].items()} if "optim" in app else set()
    return {n for n in names if any(k.startswith(f"optim.state.{n}.") for k in missing)}


def load(path: str | Path, *, model, optimizer=None, ref_model=None, dist_info: Dist) -> dict[str, Any]:
    """Load a checkpoint into an already built (and sharded) model / optimizer / reference model
    and restore this rank's RNG states. ``optimizer=None`` loads the weights only (a new stage
    starting from the checkpoint). Returns the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    if ref_model is not None and not state.get("has_ref_model"):
        raise CheckpointError(f"{path}: the stage uses a reference model (beta > 0) but the checkpoint has none")
    app = _app_state(model, optimizer, ref_model)
    no_state = _params_without_optimizer_state(path, app)
    try:
        dcp.load(app, checkpoint_id=str(path), planner=dcp.DefaultLoadPlanner(allow_partial_load=bool(no_state)))
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        detail = next((x for x in _errors_in(e) if x is not e and not hasattr(x, "failures")), e)
        raise CheckpointError(f"{path}: cannot load the checkpoint: {type(detail).__name__}: "
                              f"{str(detail).strip().splitlines()[0][:300] if str(detail).strip() else ''}") from None
    if optimizer is None:
        set_model_state_dict(model, app["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=app["model"], optim_state_dict=app["optim"])
        for name, p in model.named_parameters():  # as at save: no state until their first gradient
            if name in no_state:
                optimizer.state.pop(p, None)
    if ref_model is not None:
        set_model_state_dict(ref_model, app["ref_model"])
    rng_file = path / f"rng-rank{dist_info.rank}.pt"
    if state.get("world_size") != dist_info.world_size or not rng_file.is_file():
        if dist_info.is_main:
            print(f"[checkpoint] {path.name}: saved with world size {state.get('world_size')}, resuming with "
                  f"{dist_info.world_size}: RNG states are not restored (the run will not be bit-identical)")
    else:
        try:
            rng = torch.load(rng_file, weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{rng_file}: cannot read the RNG state: {type(e).__name__}: {e}") from None
        _set_rng_state(rng, dist_info.device)
    return state


def copy_weights(src, dst) -> None:
    """dst's parameters := src's (both sharded the same way): a local copy of each shard."""
    set_model_state_dict(dst, get_model_state_dict(src))


# ------------------------------------------------------------------------------------------
# HF export


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def export_dtype(setting: str, model_path: str | Path) -> torch.dtype:
    """The HF export's dtype: ``setting`` (bf16 / fp16 / fp32), or for ``auto`` the source
    checkpoint's own (``dtype`` / ``torch_dtype`` in its config.json; fp32 when it says nothing)."""
    if setting != "auto":
        return _DTYPES[setting]
    f = Path(model_path) / "config.json"
    try:
        conf = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read the model config: {type(e).__name__}: {e}") from None
    text = conf.get("text_config") if isinstance(conf.get("text_config"), dict) else {}
    name = conf.get("dtype") or conf.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name), torch.float32)


def _set_config_dtype(f: Path, name: str) -> None:
    conf = json.loads(f.read_text())
    for c in [conf] + [v for v in conf.values() if isinstance(v, dict)]:
        if "dtype" in c or c is conf:
            c["dtype"] = name
        c.pop("torch_dtype", None)
    f.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def export_hf(model, processor, out_dir: str | Path, dist_info: Dist, dtype: torch.dtype | None = None) -> Path:
    """Gather the full state dict on rank 0 (CPU) and write an HF safetensors checkpoint with
    processor files, loadable by ``from_pretrained``; floating tensors in ``dtype`` (None: as
    trained, fp32). Collective: every rank must call it."""
    out_dir = Path(out_dir)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_info.is_main:
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        if dtype is not None:  # save_pretrained writes the in-memory (fp32) dtype; say what the files hold
            _set_config_dtype(tmp / "config.json", str(dtype).removeprefix("torch."))
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
