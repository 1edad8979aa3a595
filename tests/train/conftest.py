"""Fixtures of the trainer tests: the warm checkpoint the compared runs start from, and one
uninterrupted reference run of the tiny config that several tests compare against."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test modules import train_helpers by name
from train_helpers import run_train, warm_up, write_tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory, embedded_dir) -> Path:
    """The embedded model after a short caption SFT (earns GRPO rewards); an HF checkpoint dir."""
    return warm_up(tmp_path_factory.mktemp("warm"), embedded_dir)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, warm_model) -> Path:
    """One uninterrupted single-process run of the tiny config; returns its output dir."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "out"
    cfg = write_tiny_config(root / "tiny.toml", out, warm_model)
    run_train(["--config", str(cfg)], cwd=root)
    return out


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL checkpoint (built from config, save_pretrained; deepstack from both
    tower blocks into decoder layers 0 and 1) with the embedded tokenizer and processor."""
    from staged.models.embedded import build_qwen3_vl_checkpoint

    return build_qwen3_vl_checkpoint(tmp_path_factory.mktemp("qwen3") / "model", seed=0, deepstack=(0, 1))
