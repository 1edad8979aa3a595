"""Hard time limits for verifier work that can hang: a pool of worker processes, killed and respawned
when a job overruns.

Why processes, and not signals or threads: sympy (under math-verify) spends its time in long C-level
loops (big-integer powers, factorials) that never return to the interpreter, so SIGALRM handlers
and thread timeouts never run; `10^{10^{10}}` keeps one CPU busy for minutes. A worker process can
always be killed. So:

    pool = WorkerPool("math", preload=("math_verify",), memory_mb=4096)
    results = pool.run([Job("math_verify", ("\\\\sqrt{4}", "2")), ...], timeout=1.0)
    results[i].status   # "ok" | "timeout" | "error"; .value: the return value or the error text

* Workers are plain `python _worker.py` subprocesses talking pickle frames over pipes (not
  multiprocessing: its spawn start method re-imports the parent's __main__, i.e. torch and the
  whole trainer, in every worker). They preload their imports (and warm math-verify's parser)
  before saying "ready"; a job's clock starts when it is handed to a ready worker, so start-up time
  is never charged to a job.
* A job that overruns: its worker gets SIGKILL, the job is a "timeout", and a fresh worker starts
  right away in the background; the other workers keep going. A worker that dies mid-job (a crash,
  the memory limit): "error".
* Workers are started on demand (no more than there are jobs), kept between calls, die with the
  parent (PR_SET_PDEATHSIG on Linux, EOF on their stdin otherwise), run in their own session (a
  Ctrl-C to the trainer is not theirs), and have an address-space limit (memory_mb) where the OS
  allows one.
* One pool per (purpose, process): `get_pool(...)` makes them lazily; a forked child gets its own.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import selectors
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("_worker.py")
STARTUP_TIMEOUT_S = 120.0  # a cold worker imports sympy + antlr: seconds, not minutes
MAX_START_FAILURES = 3  # consecutive workers dying before "ready": the pool is broken
_HDR = struct.Struct("<Q")


def default_workers() -> int:
    """$STAGED_VERIFIER_WORKERS, else min(4, CPUs): each rank of a node has its own pool."""
    env = os.environ.get("STAGED_VERIFIER_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class Job:
    kind: str  # "math_verify" | "call" (see _worker.JOBS)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    timeout: float | None = None  # seconds; None: the timeout given to run()


@dataclass
class Result:
    status: str  # "ok" | "timeout" | "error"
    value: object = None  # the job's return value ("ok") or what went wrong

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Worker:
    def __init__(self, preload: tuple[str, ...], memory_mb: int):
        cfg = {"sys_path": [p for p in sys.path if p] or [os.getcwd()], "parent_pid": os.getpid(),
               "preload": list(preload), "memory_mb": memory_mb}
        if "" in sys.path:  # the parent imports from its working directory: so does the worker
            cfg["sys_path"].insert(0, os.getcwd())
        self.proc = subprocess.Popen([sys.executable, "-u", str(WORKER_SCRIPT), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                     start_new_session=True, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = bytearray()
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None  # index into the current run's jobs
        self.deadline = 0.0

    def send(self, job: Job) -> None:
        data = pickle.dumps((job.kind, job.args, job.kwargs), protocol=4)
        self.proc.stdin.write(_HDR.pack(len(data)) + data)
        self.proc.stdin.flush()

    def read(self) -> list | None:
        """Frames that arrived (possibly none); None at EOF (the worker died)."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buf += chunk
        frames = []
        while len(self.buf) >= _HDR.size:
            n = _HDR.unpack_from(self.buf)[0]
            if len(self.buf) < _HDR.size + n:
                break
            frames.append(pickle.loads(bytes(self.buf[_HDR.size:_HDR.size + n])))
            del self.buf[:_HDR.size + n]
        return frames

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait for anyone
            pass


class WorkerPool:
    """Up to `size` worker processes for one purpose (their imports: `preload`)."""

    def __init__(self, name: str, *, size: int | None = None, preload: tuple[str, ...] = (),
                 memory_mb: int = 0):
        self.name = name
        self.size = size or default_workers()
        self.preload = tuple(preload)
        self.memory_mb = memory_mb
        self.workers: list[_Worker] = []
        self.broken: str | None = None  # why no worker can start; set after MAX_START_FAILURES
        self.start_failures = 0
        self.pid = os.getpid()
        self._lock = threading.Lock()

    # -- lifecycle

    def _spawn(self) -> _Worker:
        w = _Worker(self.preload, self.memory_mb)
        self.workers.append(w)
        return w

    def _retire(self, w: _Worker, sel: selectors.BaseSelector | None) -> None:
        if sel is not None:
            try:
                sel.unregister(w.fd)
            except (KeyError, ValueError):
                pass
        w.kill()
        self.workers.remove(w)

    def close(self) -> None:
        if os.getpid() != self.pid:  # a forked child must not kill its parent's workers
            self.workers.clear()
            return
        for w in list(self.workers):
            w.kill()
        self.workers.clear()

    def warm(self, n: int | None = None, *, wait: bool = True) -> int:
        """Start workers up to `n` (default: the pool size) and, with wait, block until they are ready
        (e.g. at trainer start, so that the first step does not wait for sympy's import). Returns how
        many are ready."""
        with self._lock:
            if self.broken:
                return 0
            while len(self.workers) < (n or self.size):
                self._spawn()
            if not wait:
                return sum(w.ready for w in self.workers)
            end = time.monotonic() + STARTUP_TIMEOUT_S
            with selectors.DefaultSelector() as sel:
                for w in self.workers:
                    if not w.ready:
                        sel.register(w.fd, selectors.EVENT_READ, w)
                while sel.get_map() and time.monotonic() < end:
                    for key, _ in sel.select(timeout=max(0.0, end - time.monotonic())):
                        w = key.data
                        frames = w.read()
                        if frames is None:  # died while starting: run() will report it
                            sel.unregister(w.fd)
                            continue
                        if any(f[0] == "ready" for f in frames):
                            w.ready = True
                            sel.unregister(w.fd)
            return sum(w.ready for w in self.workers)

    # -- running

    def run(self, jobs: list[Job], *, timeout: float = 1.0) -> list[Result]:
        """Run jobs on the workers, at most one per worker at a time; each gets `job.timeout` (or
        `timeout`) seconds from the moment a ready worker receives it. Never raises for a job."""
        if not jobs:
            return []
        with self._lock:
            return self._run(jobs, timeout)

    def _run(self, jobs: list[Job], timeout: float) -> list[Result]:
        results: list[Result | None] = [None] * len(jobs)
        if self.broken:
            return [Result("error", self.broken) for _ in jobs]
        queue = deque(range(len(jobs)))
        while len(self.workers) < min(self.size, len(jobs)):
            self._spawn()
        sel = selectors.DefaultSelector()
        for w in self.workers:
            sel.register(w.fd, selectors.EVENT_READ, w)

        def replace(w: _Worker) -> None:
            # the replacement starts now, in the background: the next call finds it warm
            self._retire(w, sel)
            if not self.broken:
                nw = self._spawn()
                sel.register(nw.fd, selectors.EVENT_READ, nw)

        def fail_all(why: str) -> None:
            for i in range(len(jobs)):
                if results[i] is None:
                    results[i] = Result("error", why)
            queue.clear()

        try:
            while queue or any(w.job is not None for w in self.workers):
                now = time.monotonic()
                for w in list(self.workers):  # hand out work
                    if w.ready and w.job is None and queue:
                        i = queue.popleft()
                        w.job, w.deadline = i, now + (jobs[i].timeout or timeout)
                        try:
                            w.send(jobs[i])
                        except OSError:  # died since its last frame: the read below sees the EOF
                            pass
                if not self.workers:
                    fail_all(f"verifier pool {self.name!r}: no worker")
                    break
                waits = [w.deadline - now for w in self.workers if w.job is not None]
                waits += [w.started + STARTUP_TIMEOUT_S - now for w in self.workers if not w.ready]
                for key, _ in sel.select(timeout=max(0.0, min(waits)) if waits else None):
                    w: _Worker = key.data
                    frames = w.read()
                    if frames is None:  # the worker died (or closed its stdout: it is exiting)
                        try:
                            code = w.proc.wait(timeout=0.5)
                        except subprocess.TimeoutExpired:
                            code = None
                        if w.job is not None:
                            results[w.job] = Result("error", f"verifier worker died (exit code {code})")
                            w.job = None
                        if not w.ready:
                            self.start_failures += 1
                            if self.start_failures >= MAX_START_FAILURES:
                                self.broken = (f"verifier pool {self.name!r}: {self.start_failures} workers "
                                               f"died while starting (last exit code {code}); see stderr")
                                log.error(self.broken)
                                self._retire(w, sel)
                                fail_all(self.broken)
                                break
                        replace(w)
                        continue
                    for status, value in frames:
                        if status == "ready":
                            w.ready, self.start_failures = True, 0
                        elif w.job is not None:
                            results[w.job] = Result(status, value)
                            w.job = None
                now = time.monotonic()
                for w in list(self.workers):  # enforce the limits
                    if w.job is not None and now > w.deadline:
                        results[w.job] = Result("timeout", f"over {jobs[w.job].timeout or timeout:g} s")
                        w.job = None
                        replace(w)
                    elif not w.ready and now > w.started + STARTUP_TIMEOUT_S:
                        self.broken = f"verifier pool {self.name!r}: a worker did not start in {STARTUP_TIMEOUT_S:g} s"
                        log.error(self.broken)
                        fail_all(self.broken)
                        replace(w)
        finally:
            sel.close()
        return [r if r is not None else Result("error", "not run") for r in results]


# ------------------------------------------------------------------------------------------------
# one pool per purpose and process

_POOLS: dict[str, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(name: str, **kwargs) -> WorkerPool:
    """The process's pool called `name`, made on first use with `kwargs` (see WorkerPool)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(name)
        if pool is not None and pool.pid != os.getpid():  # inherited through fork: not ours
            pool.workers.clear()
            pool = None
        if pool is None:
            pool = _POOLS[name] = WorkerPool(name, **kwargs)
        return pool


def shutdown_pools() -> None:
    """Kill every worker of this process (also run at exit)."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


atexit.register(shutdown_pools)
