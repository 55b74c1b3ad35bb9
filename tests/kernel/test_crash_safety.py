"""A crash, a kill or a ``ufw reload`` in the middle of a hook: state follows the kernel
and libvirt, a stale write is retried, a write keeps the lock until it lands, and the
admin's way back (``restore``) leaves every running owner's rules and nothing of a
stopped one. Real iptables in a network namespace each test creates; the reload is the
separate ``-F``/``-X`` calls of UFW with MANAGE_BUILTINS=yes, landing between a hook's
read and its write."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SAMPLES
from hookrun import installed_hook
from lifecycle import LAB, WEB1

from kvmufw_hook import ops, state
from kvmufw_hook.backends.iptables import IptablesBackend
from kvmufw_hook.errors import ApplyError
from kvmufw_hook.names import libvirt_network_dir, state_dir
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata

DEFAULT = ((SAMPLES / "02-network.default.port-created.xml").read_text()
           .split("<networkport>")[0] + "</hookData>").encode()


def ufw_reload_builtins(ns) -> None:
    """What ``ufw reload`` with MANAGE_BUILTINS=yes does to other tools' rules: one
    command per table and verb, each its own transaction."""
    for table in ("filter", "nat"):
        ns.run("iptables", "-t", table, "-F")
        ns.run("iptables", "-t", table, "-X")


class ReloadBeforeWrite(IptablesBackend):
    """The real backend, with a ``ufw reload`` landing before each of its next
    ``reloads`` writes: after the read, before the write."""

    def __init__(self, ns, reloads: int) -> None:
        super().__init__(ns.prefix)
        self.ns, self.reloads = ns, reloads

    def write(self, change) -> None:
        if self.reloads > 0:
            self.reloads -= 1
            ufw_reload_builtins(self.ns)
        super().write(change)


class Refuses(IptablesBackend):
    """The real backend whose every write the kernel refuses."""

    def _restore(self, family, payload):
        raise ApplyError("iptables-restore failed (exit 1): refused")


def lines(ns) -> list[str]:
    return [line for line in ns.save().splitlines() if "kvmufw:" in line]


def owners(ns) -> set[str]:
    return {line.split("kvmufw:")[1].split(",")[0] for line in lines(ns)}


def libvirt_active(xml: bytes) -> None:
    """libvirt writes its status file after a successful ``started``."""
    net, _ = parse_hookdata(xml)
    element = state.network_element(xml)
    with open(os.path.join(libvirt_network_dir(), f"{net.name}.xml"), "wb") as fh:
        fh.write(b"<networkstatus>" + element + b"</networkstatus>")


def libvirt_inactive(name: str) -> None:
    """libvirt removes it before ``stopped``."""
    os.unlink(os.path.join(libvirt_network_dir(), f"{name}.xml"))


def started(xml: bytes, backend) -> None:
    net, _ = parse_hookdata(xml)
    ops.network_started(net, xml, backend=backend)
    libvirt_active(xml)


def assert_exactly_once(ns) -> None:
    ours = lines(ns)
    assert len(ours) == len(set(ours)), [line for line in ours if ours.count(line) > 1]


@pytest.fixture
def host(netns, state_env):
    """Networks default and lab active (libvirt's status files say so), guest web1
    running with its forwards on lab."""
    backend = IptablesBackend(netns.prefix)
    started(DEFAULT, backend)
    started(LAB, backend)
    ops.domain_started(parse_domain_xml(WEB1), WEB1, backend=backend)
    assert owners(netns) == {"n=default", "n=lab", "d=web1"}
    return backend


# ---------------------------------------------------------------------- network started

def test_a_network_start_that_a_reload_interrupts_is_retried_and_applied(netns, state_env):
    started(DEFAULT, IptablesBackend(netns.prefix))
    net, _ = parse_hookdata(LAB)
    ops.network_started(net, LAB, backend=ReloadBeforeWrite(netns, 1))
    assert "n=lab" in owners(netns)
    assert_exactly_once(netns)


def test_a_network_start_that_fails_leaves_nothing_that_restore_brings_back(netns, state_env):
    backend = IptablesBackend(netns.prefix)
    started(DEFAULT, backend)
    net, _ = parse_hookdata(LAB)
    with pytest.raises(ApplyError):
        ops.network_started(net, LAB, backend=ReloadBeforeWrite(netns, 99))
    # libvirt counts lab as not started: no status file, no ``stopped``
    ops.restore(backend=backend)
    assert owners(netns) == {"n=default"}
    assert not os.path.exists(state.network_path("lab"))


# ---------------------------------------------------------------------- network stopped

def test_a_network_stop_that_a_reload_interrupts_removes_everything_on_it(netns, host):
    libvirt_inactive("lab")
    net, _ = parse_hookdata(LAB)
    ops.network_stopped(net, backend=ReloadBeforeWrite(netns, 1))
    assert owners(netns) == {"n=default"}
    assert not any("virbr1" in line for line in lines(netns))  # web1's forwards to it too


def test_a_network_stop_that_fails_is_finished_by_restore(netns, host):
    libvirt_inactive("lab")
    net, _ = parse_hookdata(LAB)
    with pytest.raises(ApplyError):  # the hook logs it and exits 0
        ops.network_stopped(net, backend=Refuses(netns.prefix))
    assert "n=lab" in owners(netns)
    ops.restore(backend=host)
    assert owners(netns) == {"n=default"}
    assert not any("virbr1" in line for line in lines(netns))
    assert not os.path.exists(state.network_path("lab"))
    ops.restore(backend=host)  # and stays finished
    assert owners(netns) == {"n=default"}


# ---------------------------------------------------------------------- guest stop

def test_a_guest_stop_that_a_reload_interrupts_is_retried(netns, host):
    ops.domain_stopped("web1", backend=ReloadBeforeWrite(netns, 1))
    assert owners(netns) == {"n=default", "n=lab"}
    assert not state.has_domain("web1")


def test_a_guest_stop_and_release_that_fail_leave_nothing_restore_brings_back(netns, host):
    for _op in ("stopped", "release"):
        with pytest.raises(ApplyError):  # the hook logs it and exits 0
            ops.domain_stopped("web1", backend=Refuses(netns.prefix))
    assert "d=web1" in owners(netns)
    ops.restore(backend=host)
    assert owners(netns) == {"n=default", "n=lab"}
    ops.restore(backend=host)
    assert owners(netns) == {"n=default", "n=lab"}
    assert not state.has_domain("web1")


# ---------------------------------------------------------------------- reconnect

def test_a_reconnect_that_fails_keeps_the_running_guest_for_restore(netns, host):
    ufw_reload_builtins(netns)  # the kernel holds none of its rules any more
    with pytest.raises(ApplyError):  # the hook logs it and exits 0: the guest runs on
        ops.domain_started(parse_domain_xml(WEB1), WEB1, backend=Refuses(netns.prefix),
                           running=True)
    assert state.has_domain("web1")
    ops.restore(backend=host)
    assert owners(netns) == {"n=default", "n=lab", "d=web1"}
    assert_exactly_once(netns)


def test_a_guest_start_that_fails_keeps_no_state(netns, state_env):
    backend = IptablesBackend(netns.prefix)
    started(DEFAULT, backend)
    started(LAB, backend)
    with pytest.raises(ApplyError):
        ops.domain_started(parse_domain_xml(WEB1), WEB1, backend=Refuses(netns.prefix))
    assert not state.has_domain("web1")
    ops.restore(backend=backend)
    assert "d=web1" not in owners(netns)


# ---------------------------------------------------------------------- kills

SLOW = """#!/bin/sh
# the real command after a pause, when it is the one this test slows down
case "$1" in *{tool}) touch "{mark}"; sleep {pause};; esac
exec "$@"
"""


def _slowed(tmp_path, netns, tool: str, pause: float = 1.5) -> tuple[list[str], str]:
    mark = str(tmp_path / f"{tool}.running")
    script = tmp_path / f"slow-{tool}"
    script.write_text(SLOW.format(tool=tool, mark=mark, pause=pause))
    script.chmod(0o755)
    return [*netns.prefix, str(script)], mark


def _op_in_child(code: str, prefix: list[str], env: dict) -> subprocess.Popen:
    """A hook's operation in a process of its own (as libvirt runs the hook)."""
    program = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
               "from kvmufw_hook import ops\n"
               "from kvmufw_hook.backends.iptables import IptablesBackend\n"
               "from kvmufw_hook.parse import parse_hookdata\n"
               f"backend = IptablesBackend({prefix!r})\n"
               "data = sys.stdin.buffer.read()\n" + code)
    proc = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE,
                            env={**os.environ, **env})
    return proc


def _kill_when(proc: subprocess.Popen, mark: str, data: bytes) -> None:
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    deadline = time.monotonic() + 20
    while not os.path.exists(mark):
        assert proc.poll() is None and time.monotonic() < deadline, "never reached the write"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the hook alone, as the OOM killer picks it
    proc.wait()


def _lock_free() -> bool:
    fd = os.open(os.path.join(state_dir(), "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_killed_hooks_pending_write_keeps_the_lock_until_it_lands(netns, state_env,
                                                                   tmp_path):
    backend = IptablesBackend(netns.prefix)
    started(DEFAULT, backend)
    prefix, mark = _slowed(tmp_path, netns, "iptables-restore")
    proc = _op_in_child("net, _ = parse_hookdata(data)\n"
                        "ops.network_started(net, data, backend=backend)\n",
                        prefix, state_env)
    _kill_when(proc, mark, LAB)
    assert not _lock_free(), "the lock was free while the killed hook's write was pending"
    deadline = time.monotonic() + 20
    while not _lock_free():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "n=lab" in owners(netns)  # the orphaned write landed, under the lock
    # the hook was killed: libvirt aborts lab's start (no status file, no ``stopped``)
    assert not os.path.exists(state.network_path("lab"))
    ops.restore(backend=backend)
    assert owners(netns) == {"n=default"}


def test_a_killed_network_stop_is_finished_by_restore(netns, host, state_env, tmp_path):
    libvirt_inactive("lab")
    prefix, mark = _slowed(tmp_path, netns, "iptables-save")
    proc = _op_in_child("net, _ = parse_hookdata(data)\n"
                        "ops.network_stopped(net, backend=backend)\n", prefix, state_env)
    _kill_when(proc, mark, LAB)
    ops.restore(backend=host)
    assert owners(netns) == {"n=default"}
    ops.restore(backend=host)
    assert owners(netns) == {"n=default"}


def test_restore_removes_temporary_files_of_killed_writers(netns, host):
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = state.network_path("lab") + f".{dead.pid}.tmp"
    with open(left, "wb") as fh:
        fh.write(b"<net")
    ops.restore(backend=host)
    assert not os.path.exists(left)
    assert os.path.exists(state.network_path("lab"))


# ---------------------------------------------------------------------- uninstall, re-install

HOOKS = ROOT / "hooks"


def _hook(kind: str, argv: list[str], stdin: bytes, env: dict, netns, hooks=HOOKS):
    clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LC_ALL": "C", **env}
    return subprocess.Popen([*netns.prefix, str(hooks / kind), *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean)


def test_a_hook_waiting_for_the_lock_during_uninstall_applies_nothing(netns, host, state_env):
    ops.domain_stopped("web1", backend=host)
    holder = state.locked()
    holder.__enter__()  # the uninstaller's flush holds the lock
    try:
        proc = _hook("qemu", ["web1", "start", "begin", "-"], WEB1, state_env, netns)
        assert proc.stdin is not None
        proc.stdin.write(WEB1)
        proc.stdin.close()
        time.sleep(1.0)  # the hook is waiting for the lock now
        assert proc.poll() is None
        ops._flush(host)
        shutil.rmtree(state_dir())  # install.sh --uninstall removes the state directory
    finally:
        holder.__exit__()
    assert proc.wait(timeout=30) == 0
    assert proc.stdout is not None and proc.stdout.read() == b""
    assert lines(netns) == []


def test_after_uninstall_hooks_and_restore_apply_nothing_until_replay(netns, host, state_env):
    ops.uninstall(backend=host)
    assert lines(netns) == []
    proc = _hook("qemu", ["web1", "start", "begin", "-"], WEB1, state_env, netns)
    out, err = proc.communicate(WEB1, timeout=30)
    assert (proc.returncode, out) == (0, b"")
    proc = _hook("network", ["lab", "started", "begin", "-"], LAB, state_env, netns)
    assert proc.communicate(LAB, timeout=30)[1] == b"" and proc.returncode == 0
    assert ops.restore(backend=host).payload == ""
    assert lines(netns) == []
    assert sorted(os.listdir(state_dir())) == ["lock", "uninstalled"]
    ops.replay([state.network_element(DEFAULT)], [], backend=host)  # the install's replay
    assert owners(netns) == {"n=default"}
    assert not state.uninstalled()


@pytest.mark.parametrize("missing", ["kvmufw_hook/ops.py", "kvmufw_hook/state.py",
                                     "kvmufw_hook/hook.py", "kvmufw_hook"])
def test_a_hook_during_a_package_replacement_exits_0_quietly(netns, state_env, tmp_path,
                                                            missing):
    lib = tmp_path / "lib"
    shutil.copytree(ROOT / "kvmufw_hook", lib / "kvmufw_hook")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for kind in ("qemu", "network"):
        installed_hook(kind, hooks, lib=lib)
    target = lib / missing
    if target.is_dir():
        shutil.rmtree(target)
    elif missing.endswith("hook.py"):  # being rewritten in place: half of it there
        target.write_text(target.read_text()[:3000])
    else:
        target.unlink()
    for kind, argv, data in (("network", ["lab", "started", "begin", "-"], LAB),
                             ("qemu", ["web1", "start", "begin", "-"], WEB1),
                             ("qemu", ["web1", "stopped", "end", "-"], WEB1)):
        proc = _hook(kind, argv, data, state_env, netns, hooks)
        out, err = proc.communicate(data, timeout=30)
        assert (proc.returncode, out, err) == (0, b"", b""), err.decode()
    assert lines(netns) == []
