"""Process groups and FSDP2: how the model is cut into sharded units, kept out of the loop.

Units, bottom-up (torchtitan's order):
  1. the vision tower as ONE unit — its blocks are small and run once per image, and the textual
     stage freezes it whole: one unit means one all-gather per forward and no reduce-scatter at
     all while it is frozen;
  2. each text decoder block — the classic FSDP unit: peak memory is one gathered block plus the
     sharded rest, and the next block's all-gather overlaps this block's compute;
  3. the root (embeddings, final norm, lm_head and anything left over). lm_head lives here, so
     its weight is only a full tensor inside the root's forward: :func:`bind_forward_method`
     registers our hidden-state + fused log-prob method as an FSDP forward, so the gather and the
     gradient reduce-scatter happen the FSDP way instead of reading a DTensor shard.

Precision: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on GPU (fp32 master
weights and optimizer state, bf16 compute, fp32 gradient reduction); plain fp32 on CPU.

One code path for any world size: launched by torchrun we join its process group (NCCL on GPU,
gloo on CPU); a plain ``python -m staged.train`` makes a world of one in-process (a HashStore, no
env vars), so FSDP2 and DCP run the same code with one rank.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from staged.models.loading import decoder_layers, vision_module


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ------------------------------------------------------------------------------------------
# process group


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> Dist:
    """Join torchrun's process group, or make a world of one. Idempotent.

    ``timeout_s`` bounds every collective: a rank that waits longer for its peers (one died
    without torchrun noticing, is stopped, or hangs outside any collective) raises instead of
    blocking, and :func:`fail` ends it. It must exceed the longest stretch one rank works alone
    while the others wait (rank 0 reading the checkpoint, an HF export, the slowest rollout)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but torch.cuda.is_available() is False")
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:  # torchrun (or equivalent)
            dist.init_process_group(backend, timeout=timeout)
        else:  # a single process: an in-memory store, no rendezvous, no env vars
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, mesh)


def destroy_distributed() -> bool:
    """Tear the process group down; True when it spanned several ranks."""
    if not dist.is_initialized():
        return False
    several = dist.get_world_size() > 1
    # Tear down together: a gloo rank that destroys its group while a peer still has traffic
    # in flight (rank 0 writing the summary, say) can abort the peer.
    try:
        if several:
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return several


def _is_comm_error(exc: BaseException) -> bool:
    """A collective that failed because of a peer (gone, stopped, timed out), not this rank's own
    error. Gloo raises plain RuntimeErrors, so their messages are matched too."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in (
        "Connection closed by peer", "Connection reset by peer", "Timed out waiting", "gloo/transport",
        "NCCL", "ProcessGroup", "Broken pipe"))


def _first_failure(rank: int) -> tuple[bool, int | None]:
    """(this rank is the first of the job to fail, the first one's rank). Counted in the job's
    c10d store (torchrun's agent hosts it, so it outlives any rank); unreachable = first."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        n = store.add("staged/failures", 1)
        if n == 1:
            store.set("staged/first_failure", str(rank))
            return True, rank
        return False, int(store.get("staged/first_failure").decode())
    except Exception:  # noqa: BLE001 (the store went with its host: say everything)
        return True, rank


def abort_process_group(wait_s: float = 10.0) -> None:
    """Abort the process group instead of a barrier: peers that wait inside a collective get an
    error (or torchrun's SIGTERM) instead of the ``timeout_s`` hang. In a thread, bounded: a
    backend whose abort blocks must not keep a failed process alive."""
    import threading

    def _abort():
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:  # noqa: BLE001 (a backend without abort: os._exit below ends us anyway)
            pass

    t = threading.Thread(target=_abort, daemon=True)
    t.start()
    t.join(wait_s)


def fail(exc: BaseException) -> None:
    """End a multi-rank process that is unwinding from ``exc``; with one rank, return (the caller
    re-raises as usual).

    Whatever the other ranks are doing, this rank must not wait for them (a barrier in teardown is
    what turned one rank's CUDA OOM into a 30-minute hang). The first failing rank of the job
    prints its traceback; a rank whose collective broke because of that failure, or that failed
    later, prints one line; then the process group is aborted and the process exits non-zero
    (torchrun then stops the rest of the job)."""
    import sys
    import traceback

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    rank = dist.get_rank()
    first, first_rank = _first_failure(rank)
    if getattr(exc, "one_message", False):  # the user's to fix (staged.resume.RefuseStart): no traceback
        if first:
            print(f"staged.train: {exc}", file=sys.stderr)
    elif isinstance(exc, KeyboardInterrupt):
        print(f"[rank {rank}] interrupted", file=sys.stderr)
    elif _is_comm_error(exc) and not first:
        print(f"[rank {rank}] stopping: a collective failed after rank {first_rank} failed", file=sys.stderr)
    elif _is_comm_error(exc):
        line = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"[rank {rank}] stopping: a collective failed: the other ranks are gone, or did not answer within "
              f"dist_timeout_s ({type(exc).__name__}: {line})", file=sys.stderr)
    elif first:
        print(f"[rank {rank}] failed:\n" + "".join(traceback.format_exception(exc)).rstrip(), file=sys.stderr)
    else:
        line = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"[rank {rank}] also failed ({type(exc).__name__}: {line}); rank {first_rank}'s traceback came "
              f"first", file=sys.stderr)
    sys.stderr.flush()
    abort_process_group()
    exit_now(2 if getattr(exc, "one_message", False) else 130 if isinstance(exc, KeyboardInterrupt) else 1)


def exit_now(code: int = 0) -> None:
    """End a multi-rank process without interpreter finalization. Gloo's worker threads can
    still hold work objects that reference tensors, and destroying those while the interpreter
    is being torn down aborts the process ("terminate called without an active exception",
    pytorch/pytorch#179291) after all work is done. Everything is written and flushed by now;
    reward workers die with their parent (PR_SET_PDEATHSIG)."""
    import gc
    import os
    import sys

    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned). A no-op with one rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ------------------------------------------------------------------------------------------
# FSDP2


def mixed_precision(precision: str, device: torch.device) -> tuple[MixedPrecisionPolicy, torch.dtype]:
    """(FSDP policy, compute dtype). ``auto`` = bf16 compute / fp32 reduce on GPU, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), torch.bfloat16
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32), torch.float32


def parallelize(model: nn.Module, dist_info: Dist, *, precision: str = "auto",
                activation_checkpointing: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Apply activation checkpointing and ``fully_shard`` (vision tower, each decoder block, root).

    Parameters that should stay frozen must have ``requires_grad = False`` before this call
    (the trainer also flips ``requires_grad`` per stage afterwards: FSDP2 copies the flag from
    the sharded parameter to the gathered one at every all-gather, so that is safe).
    """
    mp, _ = mixed_precision(precision, dist_info.device)
    if activation_checkpointing:
        # Non-reentrant torch.utils.checkpoint inside each HF GradientCheckpointingLayer (decoder and
        # vision blocks). FSDP2's pre-forward hook sees the recompute and lets its pre-backward
        # unshard stand.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model._staged_reshard_after_forward = reshard_after_forward  # restored by gathered_for_generation
    kw = dict(mesh=dist_info.mesh, mp_policy=mp)
    fully_shard(vision_module(model), reshard_after_forward=reshard_after_forward, **kw)
    for block in decoder_layers(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    # The root keeps its parameters gathered from forward to backward (FSDP's own default for roots).
    fully_shard(model, **kw)
    return model


def shard_from_rank0(model: nn.Module, dist_info: Dist, **parallelize_kwargs) -> nn.Module:
    """:func:`parallelize` a model whose real weights exist on rank 0 only.

    Why: every rank loading the fp32 checkpoint costs world_size copies of it in host memory
    before sharding (8 ranks x 28 GB for a 7B model). So with more than one rank, rank 0 loads the
    checkpoint and the others build the same model on the meta device (``load_model_and_processor(
    meta=True)``); every rank applies the same freezing and ``fully_shard`` (shapes are all FSDP
    needs); then the meta ranks materialise their shards (``to_empty``) and the weights arrive
    from rank 0: ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` scatters
    parameters and persistent buffers, and every buffer is also broadcast explicitly, because
    state dicts leave out the non-persistent ones (the text and vision rotary ``inv_freq`` of
    Qwen-VL), which ``to_empty`` leaves as uninitialised memory. Peak host memory: one full copy
    on rank 0, one shard elsewhere. With one rank this is exactly :func:`parallelize`.
    """
    if dist_info.world_size == 1:
        return parallelize(model, dist_info, **parallelize_kwargs)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if dist_info.is_main and on_meta:
        raise ValueError(f"rank 0 must hold the real weights, but {len(on_meta)} parameters are on meta "
                         f"(first: {on_meta[0]})")
    if not dist_info.is_main and len(on_meta) != len(list(model.parameters())):
        raise ValueError(f"rank {dist_info.rank}: expected a meta-device model, but "
                         f"{len(list(model.parameters())) - len(on_meta)} parameters hold data")
    # Rank 0's full tensors, taken before fully_shard swaps the parameters for DTensor shards.
    full = model.state_dict() if dist_info.is_main else {}
    parallelize(model, dist_info, **parallelize_kwargs)
    if not dist_info.is_main:
        model.to_empty(device=dist_info.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for b in model.buffers():  # FSDP2 does not shard buffers: whole tensors, same order on every rank
        dist.broadcast(b, src=0)
    del full
    return model


def bind_forward_method(model: nn.Module, name: str, fn) -> None:
    """Make ``model.<name>(...)`` call ``fn(model, ...)`` as an FSDP forward: the root's parameters
    (embeddings, norm, lm_head) are gathered before ``fn`` runs and their gradients are
    reduce-scattered after backward, exactly as for ``model(...)``. A plain bind without FSDP."""
    setattr(model, name, types.MethodType(fn, model))
    register_fsdp_forward_method(model, name)  # no-op when the model is not an FSDPModule


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module):
    """Keep every unit's parameters gathered across the many small forwards of a rollout (one
    all-gather per unit per rollout instead of one per token), then free them again."""
    mods = fsdp_modules(model)
    inner = getattr(model, "_staged_reshard_after_forward", True)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
        for m in mods:  # the root never reshards after forward (see parallelize)
            m.set_reshard_after_forward(inner and m is not model, recurse=False)


def reshard(model: nn.Module) -> None:
    """Free a root's gathered parameters. A root keeps them from forward to backward; a model
    that never runs backward (the reference) calls this after its forward."""
    if isinstance(model, FSDPModule):
        model.reshard()


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient L2 norm over all ranks (a plain tensor), clipping to ``max_norm`` when > 0."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"),
                                          error_if_nonfinite=False, foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor (FSDP2): the norm is already reduced over ranks
        norm = norm.full_tensor()
    return norm
