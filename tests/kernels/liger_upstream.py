"""Run Liger-Kernel's own GRPO test file against ``staged.kernels.FusedLinearGRPOLoss``.

Liger's ``test/chunked_loss/test_grpo_loss.py`` is not copied into this repository: point
``LIGER_KERNEL_SRC`` at a Liger-Kernel checkout (0.8.5's tests) and this module copies the file,
with its ``test/utils.py`` and ``test/conftest.py``, into a temporary tree, changes only the two
imports of the class under test (``LigerFusedLinearGRPOLoss`` and ``LigerFusedLinearGRPOFunction``
become ours; Liger's ``liger_fused_linear_grpo`` stays Liger's, so the functional test compares
the two) and runs pytest on it in a subprocess.

    python tests/kernels/liger_upstream.py /path/to/Liger-Kernel [--all | --heavy] [--log FILE]
                                           [-- extra pytest args, e.g. node ids]

``--all`` runs the whole file, ``--heavy`` only what the subsample leaves out (its complement);
extra arguments go to pytest as they are (node ids are ``test/chunked_loss/test_grpo_loss.py::...``,
relative to the temporary tree; given node ids, only those run, within the selection).
``--log FILE`` streams pytest's output there as it runs.

Every failure must be one of ``DOCUMENTED_FAILURES`` — the differences the README's table lists
(``Using the fused loss in your trainer``); anything else is a bug.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SWAPS = {
    "from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss":
        "from staged.kernels import FusedLinearGRPOLoss as LigerFusedLinearGRPOLoss",
    "from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction":
        "from staged.kernels import LigerFusedLinearGRPOFunction",
}

# test id pattern -> the README row that explains it
DOCUMENTED_FAILURES = {
    r"test_sequence_level_rejects_unsupported_loss_types\[(cispo|sapo)\]":
        "sequence-level cispo / sapo: TRL trains them, Liger raises",
    r"test_correctness\[.*-sequence-luspo-.*0\.1-0\.2-0\.2-1\.0-.*\]":
        "luspo with a KL term: TRL sums each sequence's masked loss, Liger averages loss * len unmasked",
    r"test_correctness\[.*-sequence-luspo-.*\]":
        "luspo over masked positions: Liger weights every position, masked ones too",
    r"test_functional_correctness\[.*-8-128-1024-4096\]":
        "KL past ref - logp = 80: Liger's own loss is inf there (e^y overflows fp32), ours finite",
}

# A CPU-sized subsample (615 of 1590 tests, 65 s on two shared cores; the other 975, --heavy,
# took 45 min): the large shapes (8x128x1024x4096, 1x4096x256x5000) are dropped, and bf16
# test_correctness keeps its bias=False half. Liger's own triton_grpo_loss and chunk_forward tests
# do not involve the class under test.
SUBSAMPLE_K = ("not 4096 and not 5000 and not triton_grpo_loss and not selective_chunk "
               "and not True-1.0-dtype0")
SUBSAMPLE = ["-k", SUBSAMPLE_K]
HEAVY = ["-k", f"not ({SUBSAMPLE_K})"]   # the complement: the rest of the file


def build_tree(src: Path, dst: Path) -> Path:
    test_file = src / "test" / "chunked_loss" / "test_grpo_loss.py"
    if not test_file.exists():
        raise FileNotFoundError(f"{test_file} not found (LIGER_KERNEL_SRC must be a Liger-Kernel checkout)")
    text = test_file.read_text()
    for old, new in SWAPS.items():
        if old not in text:
            raise RuntimeError(f"Liger's test file no longer contains {old!r}: the import swap needs updating")
        text = text.replace(old, new)
    (dst / "test" / "chunked_loss").mkdir(parents=True)
    (dst / "test" / "__init__.py").write_text("")
    (dst / "test" / "chunked_loss" / "__init__.py").write_text("")
    (dst / "test" / "utils.py").write_text((src / "test" / "utils.py").read_text())
    conftest = src / "test" / "conftest.py"
    if conftest.exists():
        (dst / "test" / "conftest.py").write_text(conftest.read_text())
    out = dst / "test" / "chunked_loss" / "test_grpo_loss.py"
    out.write_text(text)
    return out


def run(src: str | os.PathLike, extra=(), subsample=True, timeout=None, select=None, log=None):
    """Returns (counts, failed_ids, raw output). ``select``: the pytest selection, default
    ``SUBSAMPLE`` (``subsample=True``) or the whole file; ``HEAVY`` is the complement of the
    subsample. ``log``: a file that receives pytest's output as it runs. ``timeout`` default: 30 min
    for the subsample, 4 h otherwise (1590 tests in all; the 8x128x1024x4096 / 1x4096x256x5000
    shapes take seconds each under TRITON_INTERPRET: 45 min for --heavy on two shared cores)."""
    if select is None:
        select = SUBSAMPLE if subsample else []
    if timeout is None:
        timeout = 1800 if select is SUBSAMPLE else 4 * 3600
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        test = build_tree(Path(src), tmp)
        env = dict(os.environ, PYTHONPATH=str(tmp) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("TRITON_INTERPRET", "1")
        # node ids among the extra arguments select by themselves: the file would add all of it
        files = [] if any("::" in a for a in extra) else [str(test)]
        cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rf", "-p", "no:cacheprovider",
               "--rootdir", str(tmp), "-o", "addopts=", *select, *extra]
        log_path = Path(log) if log else tmp / "pytest.log"
        with open(log_path, "w") as f:
            subprocess.run(cmd, cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        out = log_path.read_text()
    failed = re.findall(r"^FAILED \S+::(\S+)", out, flags=re.M)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", out)}
    return counts, failed, out


def undocumented(failed):
    return [f for f in failed if not any(re.fullmatch(p, f) for p in DOCUMENTED_FAILURES)]


if __name__ == "__main__":
    args = sys.argv[1:]
    extra = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    log = None
    if "--log" in args:
        i = args.index("--log")
        log, args = args[i + 1], args[:i] + args[i + 2:]
    select = HEAVY if "--heavy" in args else [] if "--all" in args else SUBSAMPLE
    src = next((a for a in args if not a.startswith("--")), os.environ.get("LIGER_KERNEL_SRC"))
    if not src:
        sys.exit(__doc__)
    counts, failed, out = run(src, extra, select=select, log=log)
    print(out[-6000:])
    print("counts:", counts)
    bad = undocumented(failed)
    print(f"{len(failed)} failed, {len(bad)} not documented:", *bad, sep="\n  ")
    sys.exit(1 if bad else 0)
