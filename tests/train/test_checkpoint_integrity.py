"""Checkpoints that survive damage: checksums at save, the newest intact one at resume, errors that
name the file or directory (a full disk, an invalid trainer_state.json). In-process, world of one."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from staged import checkpoint, parallel


@pytest.fixture(scope="module")
def dist_info():
    return parallel.init_distributed("cpu")


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


def _save(root, step, d, m, opt):
    return checkpoint.save(root, step, model=m, optimizer=opt, dist_info=d,
                           trainer_state={"stage": 0, "stage_step": step, "global_step": step})


def _shard(ckpt):
    return next(ckpt.glob("__0_*.distcp"))


def _garble(f, at=512, n=4096):
    b = bytearray(f.read_bytes())
    b[at:at + n] = bytes((x ^ 0x5A) for x in b[at:at + n])  # same size: only a checksum sees it
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["garbled", "truncated", "deleted", "manifest", "state"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, dist_info, damage):
    m, opt = _model()
    root = tmp_path / "ck"
    for step in (2, 4, 6):
        _save(root, step, dist_info, m, opt)
    newest = root / "step-00000006"
    if damage == "garbled":
        _garble(_shard(newest))
    elif damage == "truncated":
        f = _shard(newest)
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "deleted":
        _shard(newest).unlink()
    elif damage == "manifest":
        (newest / "checksums-rank0.json").unlink()
    else:
        (newest / checkpoint.STATE_FILE).write_text("{\n")
    said = []
    assert checkpoint.latest_intact(root, dist_info, warn=said.append) == root / "step-00000004"
    assert len(said) == 1 and str(newest) in said[0], said
    assert (root / "damaged-step-00000006").is_dir() and not newest.exists()  # set aside, never retried
    assert checkpoint.list_checkpoints(root)[-1] == root / "step-00000004"
    # the intact one loads, and a fresh save after the fallback is verified again
    checkpoint.load(root / "step-00000004", model=m, optimizer=opt, dist_info=dist_info)
    _save(root, 5, dist_info, m, opt)
    assert checkpoint.latest_intact(root, dist_info, warn=said.append) == root / "step-00000005"


def test_intact_checkpoints_pass_and_old_ones_are_accepted(tmp_path, dist_info):
    m, opt = _model()
    ck = _save(tmp_path, 1, dist_info, m, opt)
    assert checkpoint.check_checkpoint(ck, dist_info) == []
    state = json.loads((ck / checkpoint.STATE_FILE).read_text())
    assert state["checksums"] is True
    del state["checksums"]  # as written before checksums existed: not verifiable, still usable
    (ck / checkpoint.STATE_FILE).write_text(json.dumps(state))
    _garble(_shard(ck))
    assert checkpoint.check_checkpoint(ck, dist_info) == []


def test_invalid_trainer_state_names_the_file(tmp_path):
    ck = tmp_path / "step-00000003"
    ck.mkdir()
    (ck / checkpoint.STATE_FILE).write_text("{ not json")
    with pytest.raises(checkpoint.CheckpointError, match=r"step-00000003/trainer_state\.json: cannot read"):
        checkpoint.read_trainer_state(ck)


def test_load_error_names_the_checkpoint(tmp_path, dist_info):
    m, opt = _model()
    ck = _save(tmp_path, 1, dist_info, m, opt)
    (ck / ".metadata").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=str(ck)):
        checkpoint.load(ck, model=m, optimizer=opt, dist_info=dist_info)


@pytest.mark.parametrize("where", ["dcp", "torch.save"])
def test_disk_full_names_directory_and_free_space(tmp_path, dist_info, monkeypatch, where):
    from torch.distributed.checkpoint import filesystem

    m, opt = _model()
    _save(tmp_path, 1, dist_info, m, opt)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "dcp":
        monkeypatch.setattr(filesystem, "_write_item", full)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(checkpoint.CheckpointError) as e:
        _save(tmp_path, 2, dist_info, m, opt)
    msg = str(e.value)
    assert "disk full" in msg and str(tmp_path) in msg and "MiB free" in msg, msg
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000001"  # the half-written one is never picked
