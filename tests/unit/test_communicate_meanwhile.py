"""process.communicate's ``meanwhile`` (work of ours while the command runs, as
``NftBackend._write_created`` encodes T2 while T1's nft -f runs): what it raises is
raised, whatever the command does; no fd is left open; a command that floods stderr
before reading a stdin bigger than a pipe neither deadlocks nor loses a byte."""

import os
import sys

import pytest

from kvmufw_hook.process import communicate


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Boom(Exception):
    pass


def _boom() -> None:
    raise Boom("encoding failed")


def test_meanwhile_raising_is_not_lost_when_the_command_then_times_out():
    """The command outlives its timeout after meanwhile raised: killed and reaped, and
    meanwhile's exception (the first failure) is what the caller sees, not TimeoutError."""
    before = _fds()
    with pytest.raises(Boom) as caught:
        communicate([sys.executable, "-c", "import time; time.sleep(30)"], b"x",
                    timeout=0.5, meanwhile=_boom)
    assert isinstance(caught.value.__context__, TimeoutError)  # kept, not shown
    assert _fds() == before


def test_meanwhile_raising_after_the_command_succeeded_or_failed():
    before = _fds()
    for argv in (["true"], ["sh", "-c", "cat >/dev/null; exit 3"]):
        with pytest.raises(Boom):
            communicate(argv, b"y" * (1 << 20), meanwhile=_boom)
    assert _fds() == before


def test_meanwhile_with_a_big_stdin_and_a_stderr_flood_neither_deadlocks_nor_leaks():
    data = bytes(range(256)) * 4096  # 1 MiB: 16 pipefuls
    before, ran = _fds(), []
    status, out, err = communicate(
        ["sh", "-c", "head -c 300000 /dev/zero >&2; cat"], data, timeout=20,
        meanwhile=lambda: ran.append(1))
    assert (status, out, len(err), ran) == (0, data, 300000, [1])
    assert _fds() == before
