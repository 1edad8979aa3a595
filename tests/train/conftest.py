"""Fixtures of the trainer tests: one
uninterrupted reference run of the tiny config that several tests compare against."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test modules import train_helpers by name
from train_helpers import run_train, write_tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, embedded_dir) -> Path:
    """One uninterrupted single-process run of the tiny config; returns its output dir."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "out"
    cfg = write_tiny_config(root / "tiny.toml", out, embedded_dir)
    run_train(["--config", str(cfg)], cwd=root)
    return out
