"""Run one command: feed it stdin, capture its stdout and stderr, bound its run time.

Not the ``subprocess`` module on purpose: importing it (threading, selectors, signal,
contextlib, locale ...) takes about as long as the interpreter takes to start, and a hook
runs at most two commands on libvirt's critical path. This is the part of it they need:
``posix_spawn`` (vfork: nothing of the parent is copied), three pipes and ``poll``.
"""

from __future__ import annotations

import os
import select
import time

from .errors import ApplyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

CHUNK = 65536


def communicate(argv: list[str], stdin: bytes | None = None, timeout: float = 60,
                meanwhile: Callable[[], object] | None = None) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr) of ``argv`` (found on PATH unless it has a ``/``).
    Without ``stdin`` the command reads /dev/null, never the caller's stdin. A negative
    status is the signal that ended it. FileNotFoundError when there is no such command,
    TimeoutError (the command killed and reaped) when it runs longer than ``timeout``.
    ``meanwhile`` runs while the command does (on the other core), once the first
    pipeful of ``stdin`` is written; the command is waited for and reaped whatever it
    raises, and what it raises is raised then."""
    out_r, out_w = os.pipe()  # os.pipe() fds are close-on-exec: only the dups reach it
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin is not None else (-1, -1)
    actions = [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2),
               (os.POSIX_SPAWN_DUP2, in_r, 0) if stdin is not None
               else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    ours = {out_r, err_r} | ({in_w} if stdin is not None else set())
    try:
        spawn = os.posix_spawn if "/" in argv[0] else os.posix_spawnp
        try:
            pid = spawn(argv[0], list(argv), os.environ, file_actions=actions)
        finally:
            for fd in (out_w, err_w, in_r):
                if fd >= 0:
                    os.close(fd)
        data = stdin or b""
        failed: BaseException | None = None
        if meanwhile is not None:
            if in_w >= 0:
                os.set_blocking(in_w, False)
                try:
                    data = data[os.write(in_w, data[:CHUNK]):]
                except (BlockingIOError, BrokenPipeError):
                    pass  # _exchange writes it, or learns it stopped reading
                if not data:  # all of it: the end of its input, before our work
                    os.close(in_w)
                    ours.discard(in_w)
                    in_w = -1
            try:
                meanwhile()
            except BaseException as exc:  # the command still runs: reap it first
                failed = exc
        try:
            output = _exchange(pid, out_r, err_r, in_w, data, time.monotonic() + timeout,
                               ours)
        except BaseException:  # killed and reaped: meanwhile's failure came first
            if failed is None:
                raise
            raise failed from None  # the timeout stays its __context__
        _, status = os.waitpid(pid, 0)
        if failed is not None:
            raise failed
        return os.waitstatus_to_exitcode(status), output[out_r], output[err_r]
    finally:
        for fd in ours:
            os.close(fd)


def _exchange(pid: int, out_r: int, err_r: int, in_w: int, data: bytes, deadline: float,
              ours: set[int]) -> dict[int, bytes]:
    """Write ``data`` to ``in_w`` while reading ``out_r`` and ``err_r`` until both end
    (closing each fd as it is done with and dropping it from ``ours``)."""
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(err_r, select.POLLIN)
    pending = memoryview(data)
    if in_w >= 0:
        os.set_blocking(in_w, False)  # a write never waits for the reader: poll decides
        poller.register(in_w, select.POLLOUT)
    busy = set(ours)
    while busy:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise TimeoutError
        for fd, _event in poller.poll(left * 1000):
            if fd == in_w:
                try:
                    pending = pending[os.write(fd, pending[:CHUNK]):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # it stopped reading: its exit status says why
                    pending = pending[:0]
                if pending:
                    continue
            else:
                chunk = os.read(fd, CHUNK)
                if chunk:
                    chunks[fd].append(chunk)
                    continue
            poller.unregister(fd)
            os.close(fd)
            busy.discard(fd)
            ours.discard(fd)
    return {fd: b"".join(parts) for fd, parts in chunks.items()}


def run(argv: Sequence[str], stdin: str | None = None, timeout: float = 60,
        name: str | None = None, meanwhile: Callable[[], object] | None = None) -> str:
    """The one place that runs a firewall command. ApplyError with one line on failure,
    naming the tool (``name``, when argv starts with a wrapper such as ``ip netns exec``).
    ``meanwhile``: work of ours done while it runs (``communicate``)."""
    name = name or argv[0].rsplit("/", 1)[-1]
    data = stdin.encode("utf-8", "surrogateescape") if stdin is not None else None
    try:
        status, out, err = communicate(list(argv), data, timeout, meanwhile)
    except FileNotFoundError:
        raise ApplyError(f"{name} not found") from None
    except TimeoutError:
        raise ApplyError(f"{name} did not finish within {timeout:.0f}s") from None
    if status != 0:
        text = err.decode("utf-8", "replace")
        first = next((l for l in text.splitlines() if l.strip()), "").strip()
        raise ApplyError(f"{name} failed (exit {status})" + (f": {first}" if first else ""))
    return out.decode("utf-8", "surrogateescape")


def read_elsewhere(prefix: Sequence[str], code: str, what: str) -> Any:
    """What ``code`` (this package importable, ``json`` imported) prints as JSON, run by
    this Python under ``prefix`` (``ip netns exec NS``): how a backend that runs in
    another namespace reads the host there. OSError naming ``what`` when it fails."""
    import json
    import sys
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    status, out, err = communicate(
        [*prefix, sys.executable, "-c",
         f"import sys; sys.path.insert(0, {package!r}); import json; {code}"], timeout=30)
    if status:
        raise OSError(f"reading {what} in {' '.join(prefix)} failed: "
                      + err.decode(errors="replace").strip())
    return json.loads(out)
