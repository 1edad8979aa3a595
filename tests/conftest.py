"""Test-wide setup: Triton kernels run under the interpreter on machines without CUDA.

TRITON_INTERPRET must be set before triton is first imported, hence here and at import time.
"""
import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may touch the network


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory):
    """The embedded default's checkpoint (tiny Qwen2.5-VL, tokenizer, processor), built offline
    once per session."""
    from staged.models.embedded import build_embedded_checkpoint

    return build_embedded_checkpoint(tmp_path_factory.mktemp("embedded") / "model", seed=0)


@pytest.fixture(scope="session")
def embedded(embedded_dir):
    import warnings

    from staged.models.loading import load_model_and_processor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "using VLProcessor because AutoProcessor failed" without torchvision
        model, processor = load_model_and_processor(embedded_dir)
    return model, processor


@pytest.fixture
def device() -> str:
    """Where kernel tests put tensors: CUDA when present, else CPU under TRITON_INTERPRET."""
    return "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none here (kernels are checked under "
                                   "TRITON_INTERPRET and AOT-compiled instead)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    AOT_REPORT = getattr(terminalreporter.config, "_staged_aot_report", None)
    if not AOT_REPORT:
        return
    tr = terminalreporter
    tr.section("AOT compile: registers / spills / shared memory per kernel")
    tr.write_line(f"{'kernel':64s} {'sm':>3s} {'regs':>5s} {'spill B':>8s} {'smem B':>7s} "
                  f"{'dots':>8s} {'tma':>4s}")
    for r in AOT_REPORT:
        tr.write_line(f"{r['kernel'][:64]:64s} {r['cc']:>3d} {r['registers']:>5d} "
                      f"{r['spill_stores'] + r['spill_loads']:>8d} {r['shared_bytes']:>7d} "
                      f"{r.get('dots', ''):>8s} {'yes' if r.get('tma') else '-':>4s}")


def pytest_report_header(config):
    try:
        import triton
    except ImportError:
        return "triton: not installed"
    mode = "interpreted (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"
    line = f"triton {triton.__version__}: kernels {mode}"
    major_minor = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if mode.startswith("interpreted") and major_minor < (3, 7):
        line += " -- WARNING: the interpreted kernel tests need triton >= 3.7"
    return line
