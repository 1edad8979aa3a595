"""A verifier worker process: runs jobs one at a time for staged.rewards.sandbox, which kills it
when a job overruns its time limit. Started by path (`python -u _worker.py CONFIG_JSON`), so it
imports neither torch nor the `staged` package unless a job asks for them.

Protocol over the pipes (stdout is kept for it; anything a job prints goes to stderr):
  frame   = 8-byte little-endian length + pickle
  to us   = (kind, args, kwargs)                 kind: "math_verify" | "call"
  from us = ("ready", None) once, after the preloads; then ("ok", value) | ("error", "Type: msg")
Values are converted to plain Python (float, bool, None, str, lists and dicts of those) here, so the
parent never unpickles an object of a class it did not send.
"""
import json
import sys

if __name__ == "__main__":
    CONFIG = json.loads(sys.argv[1])
    sys.path[:] = CONFIG["sys_path"]  # the parent's import path, and not this script's folder
else:  # imported (by a test, a linter): nothing runs
    CONFIG = {}

import importlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import struct  # noqa: E402

_HDR = struct.Struct("<Q")


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the parent dies, even mid-job in a C loop."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != CONFIG.get("parent_pid"):  # the parent died before prctl
            os._exit(0)
    except Exception:  # noqa: BLE001 - best effort (not Linux)
        pass


def _limit_memory(mb: int) -> None:
    if mb <= 0:
        return
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        want = mb << 20
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    except Exception:  # noqa: BLE001 - best effort (not POSIX)
        pass


# ------------------------------------------------------------------------------------------------
# jobs

_MV = None


def _math_verify():
    global _MV
    if _MV is None:
        import math_verify

        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # "timeout disabled": we are the timeout
        _MV = math_verify
    return _MV


def math_verify_job(pred: str, answer: str) -> bool:
    """math-verify's symbolic equivalence of two boxed answers; its own signal-based timeouts are off
    (whole seconds only): the parent's kill is the time limit."""
    mv = _math_verify()
    cfg = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    gold = mv.parse("\\boxed{" + answer + "}", extraction_config=cfg, parsing_timeout=None)
    got = mv.parse("\\boxed{" + pred + "}", extraction_config=cfg, parsing_timeout=None)
    if not gold or not got:
        return False
    return bool(mv.verify(gold, got, timeout_seconds=None))


_FUNCS: dict = {}


def call_job(spec: str, path: list, args: tuple, kwargs: dict):
    """Import `module:function` (once; `path`: the parent's sys.path now) and call it."""
    fn = _FUNCS.get(spec)
    if fn is None:
        for p in reversed(path):
            if p not in sys.path:
                sys.path.insert(0, p)
        mod, _, name = spec.partition(":")
        fn = importlib.import_module(mod)
        for part in name.split("."):
            fn = getattr(fn, part)
        _FUNCS[spec] = fn
    return fn(*args, **kwargs)


JOBS = {"math_verify": math_verify_job, "call": call_job}


def plain(value, depth: int = 0):
    """The job's return value as plain Python (numbers through float(): numpy / torch scalars too)."""
    if depth > 3:
        raise TypeError("return value nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    try:
        return float(value)
    except Exception:  # noqa: BLE001
        raise TypeError(f"unsupported return type {type(value).__name__}") from None


# ------------------------------------------------------------------------------------------------
# the loop


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def main() -> None:
    _die_with_parent()
    out_fd = os.dup(1)
    os.dup2(2, 1)  # a job's print() must not corrupt the protocol

    def send(obj) -> None:
        data = pickle.dumps(obj, protocol=4)
        view = memoryview(_HDR.pack(len(data)) + data)
        while view:
            view = view[os.write(out_fd, view):]

    _limit_memory(int(CONFIG.get("memory_mb", 0)))
    for name in CONFIG.get("preload", []):
        importlib.import_module(name)
    if "math_verify" in CONFIG.get("preload", []):
        math_verify_job("x^2+\\frac{1}{2}", "x^{2}+0.5")  # warm the parser: the first real job is timed
    send(("ready", None))

    in_fd = sys.stdin.fileno()
    while True:
        hdr = _read_exact(in_fd, _HDR.size)
        if hdr is None:
            return  # the parent closed the pipe
        payload = _read_exact(in_fd, _HDR.unpack(hdr)[0])
        if payload is None:
            return
        try:
            kind, args, kwargs = pickle.loads(payload)
            reply = ("ok", plain(JOBS[kind](*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt from a job included
            try:
                msg = f"{type(e).__name__}: {e}"
            except BaseException:  # noqa: BLE001 - str() of a sympy object can itself fail
                msg = type(e).__name__
            reply = ("error", msg[:500])
        send(reply)


if __name__ == "__main__":
    main()
