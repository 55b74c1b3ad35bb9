"""Runs inside the Debian 13 root started as soon as the session knows its tests, so that
they overlap the host's own tests instead of following them.

Why: on a Debian 12 CI machine the suite is two halves of about 25 minutes each, the host's
tests and the same release-dependent tests again in the root (tests/debian13/test_debian13.py);
each half is one serial stream of short processes (virsh, nsenter, iptables, Python) that
leaves the machine's second core idle much of the time. Started early, the root's half runs
beside the host's; the test that owns a run still decides on it, with the same output and
the same assertions as when it ran the suite itself.

How: a test function names its run with ``starts_early(start)`` (``start()`` returns the
run, or None where the test would skip); tests/conftest.py moves such tests to the end of
the session and calls ``start()`` for those selected once collection is done. The test
calls the same ``start()``: it gets the run begun at collection, or begins it then (a test
run alone). ``stop_all()`` ends whatever a session leaves running (its end, ^C, ``-x``).
KVMUFW_EARLY=0 starts nothing early: each run starts when its test does, as before.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from debian13.root import ensure_root, root_command, root_env

_RUNS: dict[str, Run] = {}
_LOCK = threading.Lock()


def enabled() -> bool:
    return os.environ.get("KVMUFW_EARLY", "1") != "0"


def can_enter_root() -> bool:
    """Root, with what ensure_root() and run_in_root() need (a test without them skips or
    fails by need_root_tools(), and begins no run)."""
    return os.geteuid() == 0 and all(
        shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
        for tool in ("debootstrap", "unshare", "pivot_root"))


@dataclass
class Result:
    returncode: int | None  # None: killed at its timeout
    stdout: str
    stderr: str
    ready: float            # seconds until the root was ready (ensure_root)
    ran: float              # seconds the command ran, from the root ready to its end


@dataclass
class Run:
    """``argv`` run inside the root (after ensure_root()) in a thread of its own, its
    output in unnamed files, killed with all its namespace once ``timeout`` seconds have
    passed since it began."""
    name: str
    argv: list[str]
    timeout: float
    began: float = field(default_factory=time.monotonic)
    _ready: float | None = None
    _ended: float | None = None
    _proc: subprocess.Popen | None = None
    _stopped: bool = False  # stop() called: no command begins after it
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _error: BaseException | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    _out: IO[str] | None = None
    _err: IO[str] | None = None

    def start(self) -> None:
        threading.Thread(target=self._main, name=f"early-{self.name}", daemon=True).start()

    def _main(self) -> None:
        try:
            ensure_root()
            self._ready = time.monotonic()
            self._out = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
            self._err = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
            # a session (process group) of its own: stop() kills unshare and, through its
            # --kill-child, the namespace's PID 1 and everything in it; so does the end of
            # this thread, which waits for it: pytest killed (SIGTERM) leaves nothing behind
            with self._guard:  # stop() while the root was made ready: nothing begins
                if self._stopped:
                    raise RuntimeError(f"{self.name}: stopped before its command began")
                self._proc = subprocess.Popen(
                    ["setpriv", "--pdeathsig", "KILL", "--",
                     *root_command(["bash", "-c", 'cd /src && exec "$@"', "cd", *self.argv])],
                    env=root_env(), stdin=subprocess.DEVNULL, stdout=self._out,
                    stderr=self._err, start_new_session=True)
            try:
                self._proc.wait(timeout=max(0.0, self.began + self.timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop()
            self._ended = time.monotonic()
        except BaseException as exc:  # handed to the test that waits: its failure
            self._error = exc
        finally:
            self._done.set()

    def stop(self) -> None:
        with self._guard:
            self._stopped = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def wait(self) -> Result:
        """Wait for the run's end (at most its timeout); its result. An error of the
        root's build is raised here, in the test."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._proc is not None and self._ready is not None and self._ended is not None
        killed = self._proc.returncode == -signal.SIGKILL and \
            self._ended >= self.began + self.timeout
        outputs = []
        for f in (self._out, self._err):
            assert f is not None
            f.seek(0)
            outputs.append(f.read())
        return Result(None if killed else self._proc.returncode, outputs[0], outputs[1],
                      self._ready - self.began, self._ended - self._ready)


def run(name: str, argv: list[str], timeout: float) -> Run:
    """The run called ``name``: the one begun already, or a new one begun now."""
    with _LOCK:
        if name not in _RUNS:
            _RUNS[name] = Run(name, argv, timeout)
            _RUNS[name].start()
        return _RUNS[name]


def starts_early(start: Callable[[], Run | None]) -> Callable:
    """Decorator of a test whose run ``start()`` begins at collection (see above)."""
    def mark(test: Callable) -> Callable:
        test.start_early = start  # type: ignore[attr-defined]
        return test
    return mark


def start_selected(items: list) -> list[str]:
    """tests/conftest.py, collection done: begin the runs of the selected tests; the
    node ids of those begun."""
    if not enabled():
        return []
    begun = []
    for item in items:
        start = getattr(getattr(item, "obj", None), "start_early", None)
        if start is not None and start() is not None:
            begun.append(item.nodeid)
    return begun


def stop_all() -> None:
    for each in list(_RUNS.values()):
        each.stop()
