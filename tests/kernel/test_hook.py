"""The hook entries as libvirt runs them: the real shims in hooks/, argv and stdin of
a real libvirt 9.0 lifecycle, rules in a network namespace this test creates."""

import contextlib
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLES, need_root_tools
from hookrun import (
    HOOKS,
    PYTHON,
    default_started_xml,
    installed_hook,
    kvmufw_lines,
    owners,
    port_created,
    run_hook,
    sample,
)


def test_whole_lifecycle_of_the_samples(netns, state_env):
    def hook(kind, argv, stdin):
        proc = run_hook(kind, argv, stdin, state_env, netns)
        assert proc.stdout == b"", (argv, proc.stdout)
        assert proc.returncode == 0, (argv, proc.stderr)
        return proc

    # the networks were started long before the guest
    hook("network", ["default", "started", "begin", "-"], default_started_xml())
    hook(*sample("16-network.lab.started"))
    assert owners(netns) == {"n=default", "n=lab"}
    base = kvmufw_lines(netns)

    steps = ["01-qemu.web1.prepare", "02-network.default.port-created",
             "03-network.lab.port-created", "04-qemu.web1.start", "05-qemu.web1.started"]
    for step in steps:
        hook(*sample(step))
    running = kvmufw_lines(netns)
    assert owners(netns) == {"n=default", "n=lab", "d=web1"}
    web1 = [l for l in running if "d=web1" in l]
    assert len(web1) == 3 * 2 + 3 * 3  # 3 forwards x (pre, out) + 3 x (fwd, reply, hairpin)
    assert all("b=virbr1" in l for l in web1)  # the NIC with the reservation

    # daemon restart: port-created per NIC, then reconnect: nothing changes
    for step in ["06-network.lab.port-created", "07-network.default.port-created",
                 "08-qemu.web1.reconnect"]:
        hook(*sample(step))
    assert kvmufw_lines(netns) == running

    for step in ["09-qemu.web1.stopped", "10-network.default.port-deleted",
                 "11-network.lab.port-deleted", "12-qemu.web1.release"]:
        hook(*sample(step))
    assert kvmufw_lines(netns) == base

    hook(*sample("13-network.routed.stopped"))  # never started here: nothing fails
    hook(*sample("14-network.lab.stopped"))
    assert owners(netns) == {"n=default"}
    hook(*sample("15-network.lab.start"))
    hook(*sample("16-network.lab.started"))
    assert kvmufw_lines(netns) == base
    hook("network", ["default", "stopped", "end", "-"], default_started_xml())
    hook(*sample("14-network.lab.stopped"))
    assert "KVMUFW" not in netns.save()


def test_network_restart_re_adds_running_guests(netns, state_env):
    for args in [("network", ["default", "started", "begin", "-"], default_started_xml()),
                 sample("16-network.lab.started"), sample("04-qemu.web1.start")]:
        assert run_hook(*args, state_env, netns).returncode == 0
    running = kvmufw_lines(netns)
    run_hook(*sample("14-network.lab.stopped"), state_env, netns)
    assert owners(netns) == {"n=default"}  # the guest's forwards went with the network
    run_hook(*sample("16-network.lab.started"), state_env, netns)
    # the same rules; re-added owners go after the ones that stayed
    assert sorted(kvmufw_lines(netns)) == sorted(running)


def _web1(forwards: str, name="web1") -> bytes:
    xml = (SAMPLES / "04-qemu.web1.start.xml").read_text()
    head, rest = xml.split("<kvmufw:forwards", 1)
    tail = rest.split("</kvmufw:forwards>", 1)[1]
    xml = (head + f'<kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">{forwards}</kvmufw:forwards>'
           + tail)
    return xml.replace("<name>web1</name>", f"<name>{name}</name>").encode()


def test_exit_status_per_op(netns, state_env):
    run_hook("network", ["lab", "started", "begin", "-"],
             (SAMPLES / "16-network.lab.started.xml").read_bytes(), state_env, netns)
    before = netns.save()
    bad = _web1('<kvmufw:forward host-port="22abc"/>')
    unresolvable = _web1('<kvmufw:forward host-port="22" guest-ip="10.99.0.1"/>')
    cases = [
        ("prepare", bad, 0), ("start", bad, 2), ("start", unresolvable, 2),
        ("reconnect", bad, 0), ("reconnect", unresolvable, 0),
        ("migrate", bad, 2), ("restore", bad, 0),
        ("stopped", b"garbage <", 0), ("release", b"", 0), ("started", bad, 0),
        ("no-such-op", bad, 0),
    ]
    for op, xml, status in cases:
        proc = run_hook("qemu", ["web1", op, "begin", "-"], xml, state_env, netns)
        assert (op, proc.returncode) == (op, status), proc.stderr
        assert proc.stdout == b""
        if status:
            err = proc.stderr.decode()
            assert err.count("\n") == 1 and err.startswith(f"kvmufw_hook: qemu {op} web1: "
                                                           "domain 'web1': forward #1")
            assert "Traceback" not in err
    assert netns.save() == before
    proc = run_hook("network", ["broken", "start", "begin", "-"], b"<hookData><network>",
                    state_env, netns)
    assert proc.returncode == 2 and b"not well-formed" in proc.stderr
    proc = run_hook("network", ["broken", "stopped", "end", "-"], b"<hookData>", state_env,
                    netns)
    assert proc.returncode == 0


def test_conflicting_guest_is_refused_and_first_keeps_working(netns, state_env):
    run_hook(*sample("16-network.lab.started"), state_env, netns)
    assert run_hook(*sample("04-qemu.web1.start"), state_env, netns).returncode == 0
    first = kvmufw_lines(netns)
    other = _web1('<kvmufw:forward proto="udp" host-port="5001-5010" '
                  'mac="52:54:00:00:00:20" guest-ip="10.0.0.9"/>', name="web2")
    proc = run_hook("qemu", ["web2", "start", "begin", "-"], other, state_env, netns)
    assert proc.returncode == 2
    assert ("domain 'web2': forward udp 5001-5010: host port already forwarded by "
            "domain 'web1' (forward udp 5000-5002)") in proc.stderr.decode()
    assert kvmufw_lines(netns) == first
    clash = _web1('<kvmufw:forward host-port="8080"/>', name="web3")
    proc = run_hook("qemu", ["web3", "start", "begin", "-"], clash, state_env, netns)
    assert proc.returncode == 2 and b"forwarded by network 'lab'" in proc.stderr


def test_migrate_refuses_on_the_destination_what_start_would_refuse_and_applies_nothing(
        netns, state_env):
    """qemu ``migrate`` runs on the destination before anything moves: a host port held
    here or a host-ip that is not this host's refuses the migration with start's line;
    a guest this host can take passes, with no rule and no state until its ``start``."""
    run_hook(*sample("16-network.lab.started"), state_env, netns)
    assert run_hook(*sample("04-qemu.web1.start"), state_env, netns).returncode == 0
    first = kvmufw_lines(netns)
    state_before = sorted(os.listdir(state_env["KVMUFW_STATE_DIR"]))
    held = _web1('<kvmufw:forward proto="udp" host-port="5001-5010" '
                 'mac="52:54:00:00:00:20" guest-ip="10.0.0.9"/>', name="web2")
    elsewhere = _web1('<kvmufw:forward host-port="2300" mac="52:54:00:00:00:20" '
                      'guest-ip="10.0.0.9" host-ip="192.0.2.99"/>', name="web2")
    free = _web1('<kvmufw:forward host-port="2300" mac="52:54:00:00:00:20" '
                 'guest-ip="10.0.0.9"/>', name="web2")
    for xml, reason in ((held, "host port already forwarded by domain 'web1'"),
                        (elsewhere, "host-ip 192.0.2.99 is not an address of this host")):
        proc = run_hook("qemu", ["web2", "migrate", "begin", "-"], xml, state_env, netns)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and proc.stdout == b"", err
        assert err.count("\n") == 1 and reason in err, err
        assert err.startswith("kvmufw_hook: qemu migrate web2: domain 'web2': forward "), err
    proc = run_hook("qemu", ["web2", "migrate", "begin", "-"], free, state_env, netns)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert kvmufw_lines(netns) == first
    assert sorted(os.listdir(state_env["KVMUFW_STATE_DIR"])) == state_before


def test_parallel_guest_starts_and_stops(netns, state_env):
    run_hook(*sample("16-network.lab.started"), state_env, netns)
    names = [f"g{i:02d}" for i in range(12)]

    def start(i_name):
        i, name = i_name
        xml = _web1(f'<kvmufw:forward host-port="{3000 + i}" guest-port="22" '
                    f'guest-ip="10.0.0.{50 + i}"/>', name=name)
        return run_hook("qemu", [name, "start", "begin", "-"], xml, state_env, netns)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(start, enumerate(names)))
    assert [r.returncode for r in results] == [0] * 12, [r.stderr for r in results]
    lines = kvmufw_lines(netns)
    for name in names:
        assert len([l for l in lines if f"kvmufw:d={name}," in l]) == 5
    assert len(lines) == len(set(lines))

    def stop(name):
        return run_hook("qemu", [name, "stopped", "end", "-"], b"", state_env, netns)

    with ThreadPoolExecutor(12) as pool:
        assert [r.returncode for r in pool.map(stop, names)] == [0] * 12
    assert owners(netns) == {"n=lab"}


@pytest.mark.parametrize("kind,argv,stdin", [
    ("qemu", ["web1", "prepare", "begin", "-"], "01-qemu.web1.prepare.xml"),
    ("qemu", ["web1", "started", "begin", "-"], "05-qemu.web1.started.xml"),
    ("qemu", ["plain", "migrate", "begin", "-"], None),
    ("qemu", ["plain", "start", "begin", "-"], None),
    ("qemu", ["web1", "stopped", "end", "-"], "09-qemu.web1.stopped.xml"),
    ("network", ["lab", "no-such-op", "begin", "-"], "16-network.lab.started.xml"),
])
def test_ops_that_need_nothing_import_nothing_heavy(kind, argv, stdin, tmp_path):
    data = (SAMPLES / stdin).read_bytes() if stdin else b"<domain><name>plain</name></domain>"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from kvmufw_hook.hook import main; "
            f"rc = main({kind!r}, {argv!r}); heavy = [m for m in ('lxml', 'libvirt', "
            "'kvmufw_hook.plan', 'subprocess') if m in sys.modules]; "
            "sys.stderr.write(repr((rc, heavy)))")
    proc = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True,
                          env={**os.environ, "KVMUFW_STATE_DIR": str(tmp_path)}, check=False)
    assert proc.stdout == b""
    assert proc.stderr.decode() == "(0, [])"


def test_repeated_ops_change_nothing(netns, state_env):
    def hook(name):
        proc = run_hook(*sample(name), state_env, netns)
        assert proc.returncode == 0, proc.stderr
    hook("16-network.lab.started")
    base = netns.save()
    hook("04-qemu.web1.start")
    started = netns.save()
    for name in ("04-qemu.web1.start", "16-network.lab.started", "03-network.lab.port-created",
                 "08-qemu.web1.reconnect"):
        hook(name)
        assert netns.save() == started, name
    hook("09-qemu.web1.stopped")
    assert netns.save() == base
    for name in ("09-qemu.web1.stopped", "12-qemu.web1.release", "11-network.lab.port-deleted"):
        hook(name)
        assert netns.save() == base, name
    hook("04-qemu.web1.start")  # a start after a stop brings back exactly the same rules
    assert netns.save() == started


def shim_imports(kind, argv, stdin: bytes, env: dict, netns) -> set[str]:
    """The modules the installed hook imports for one call, run as libvirt runs it (its
    ``python3 -IS``, with ``-X importtime``); asserts that the call succeeds."""
    clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LC_ALL": "C", **env}
    with tempfile.TemporaryDirectory() as scratch:
        if kind == "qemu":  # a shell script that execs python3 for the ops that matter
            command = [str(installed_hook(kind, scratch, python=f"{PYTHON} -X importtime"))]
        else:
            command = [*PYTHON.split(), "-X", "importtime", str(installed_hook(kind, scratch))]
        proc = subprocess.run([*netns.prefix, *command, *argv], input=stdin,
                              capture_output=True, env=clean, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout == b"", proc.stderr[-2000:]
    lines = proc.stderr.decode().splitlines()
    return {l.rsplit("|", 1)[1].strip() for l in lines if l.startswith("import time:")}


def interpreter_modules() -> set[str]:
    """What the interpreter loads to start as the shims start it, doing nothing."""
    proc = subprocess.run(["/usr/bin/python3", "-IS", "-X", "importtime", "-c", "pass"],
                          capture_output=True, timeout=60, check=True)
    return {l.rsplit("|", 1)[1].strip() for l in proc.stderr.decode().splitlines()
            if l.startswith("import time:")}


BACKEND_MODULES = {"iptables": "iptables", "nftables": "nft"}


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_guest_stop_loads_only_the_modules_of_its_budget(backend, netns, state_env):
    """stopped: the rules go by the guest's name, loading only what the stop budget
    (``hook.STOP_MODULES``, ``hook.STOP_STDLIB``) allows: no XML, lxml or planner. With
    the nftables backend the elements go by netlink in-process (``nftwrite``)."""
    from kvmufw_hook.hook import STOP_MODULES, STOP_STDLIB
    if backend != "iptables":
        need_root_tools("nft")
        Path(state_env["KVMUFW_CONFIG"]).write_text(f'firewall_backend = "{backend}"\n')
    def lines() -> list[str]:
        if backend == "iptables":
            return kvmufw_lines(netns)
        return subprocess.run([*netns.prefix, "nft", "list", "table", "inet", "kvmufw"],
                              capture_output=True, text=True, check=True).stdout.splitlines()

    run_hook(*sample("16-network.lab.started"), state_env, netns)
    base = lines()
    assert run_hook(*sample("04-qemu.web1.start"), state_env, netns).returncode == 0
    assert lines() != base
    stopped = (SAMPLES / "09-qemu.web1.stopped.xml").read_bytes()
    imported = shim_imports("qemu", ["web1", "stopped", "end", "-"], stopped, state_env, netns)
    assert f"kvmufw_hook.backends.{BACKEND_MODULES[backend]}" in imported  # it did remove
    if backend != "iptables":
        assert "kvmufw_hook.backends.nftwrite" in imported
    assert lines() == base
    ours = {m for m in imported if m.partition(".")[0] == "kvmufw_hook"}
    assert ours <= STOP_MODULES, sorted(ours - STOP_MODULES)
    beyond = imported - ours - interpreter_modules() - {"imported package"}
    assert beyond <= STOP_STDLIB, sorted(beyond - STOP_STDLIB)
    imported = shim_imports("qemu", ["web1", "release", "end", "-"], b"", state_env, netns)
    assert not {m for m in imported if m.startswith("kvmufw_hook.backends")}, imported


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_guest_start_loads_only_the_modules_of_its_budget(backend, netns, state_env):
    """start: the XML parsed, the forwards checked and applied, loading only what the
    start budget (``hook.START_MODULES``, ``hook.START_STDLIB``) allows: nothing outside
    the standard library and the package, no ``site``, ``inspect``, ``typing`` or
    ElementTree (the parser builds ``parse.Node``s)."""
    from kvmufw_hook.hook import START_MODULES, START_STDLIB
    if backend != "iptables":
        need_root_tools("nft")
        Path(state_env["KVMUFW_CONFIG"]).write_text(f'firewall_backend = "{backend}"\n')
    assert run_hook(*sample("16-network.lab.started"), state_env, netns).returncode == 0
    # another guest's port on the network: the start reads the neighbour table too
    other = port_created((SAMPLES / "16-network.lab.started.xml").read_bytes(), "db2",
                         "52:54:00:00:00:21")
    assert run_hook("network", ["lab", "port-created", "begin", "-"], other, state_env,
                    netns).returncode == 0
    imported = shim_imports(*sample("04-qemu.web1.start"), state_env, netns)
    assert {"kvmufw_hook.ops", "kvmufw_hook.neighbours",
            f"kvmufw_hook.backends.{BACKEND_MODULES[backend]}"} <= imported
    ours = {m for m in imported if m.partition(".")[0] == "kvmufw_hook"}
    assert ours <= START_MODULES, sorted(ours - START_MODULES)
    beyond = imported - ours - interpreter_modules() - {"imported package"}
    assert beyond <= START_STDLIB, sorted(beyond - START_STDLIB)
    assert not START_STDLIB & {"inspect", "typing", "site", "sitecustomize", "xml.etree"}
    if backend == "iptables":
        assert len([l for l in kvmufw_lines(netns) if "d=web1" in l]) == 15
    else:
        listed = subprocess.run([*netns.prefix, "nft", "list", "table", "inet", "kvmufw"],
                                capture_output=True, text=True, check=True).stdout
        assert "d=web1" in listed, listed


def test_prepare_reads_no_stdin(state_env):
    """libvirt writes the XML to a pipe and ignores EPIPE when the hook exits without
    reading it (virCommandProcessIO): prepare must return at once, here with a pipe
    that never ends."""
    clean = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", **state_env}
    proc = subprocess.Popen([str(HOOKS / "qemu"), "web1", "prepare", "begin", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=clean)
    try:
        try:
            proc.stdin.write((SAMPLES / "01-qemu.web1.prepare.xml").read_bytes())
            proc.stdin.flush()  # and never closed: a read to the end would wait for ever
        except BrokenPipeError:  # the hook was quicker and ended unread: libvirt's EPIPE
            pass
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == b"" and proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.wait()


@pytest.mark.parametrize("argv", [["web1", "prepare", "begin", "-"],
                                  ["web1", "started", "begin", "-"]])
def test_an_installed_hook_that_needs_nothing_starts_no_python(argv, tmp_path):
    """The installed qemu hook answers a call that needs nothing in the shell: the
    interpreter it would exec only leaves a mark, and none is left."""
    mark = tmp_path / "python-ran"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {mark}\nexit 9\n")
    fake.chmod(0o755)
    hook = installed_hook("qemu", tmp_path, python=str(fake))
    proc = subprocess.run([str(hook), *argv],
                          input=(SAMPLES / "01-qemu.web1.prepare.xml").read_bytes(),
                          capture_output=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert not mark.exists()


def test_the_namespace_has_one_definition():
    """Issue 11, one definition per fact: names.NAMESPACE is the namespace; the hook's
    byte search, the parser and forward add/remove all use it."""
    from kvmufw_hook import names
    holders = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("kvmufw_hook/**/*.py"),
                                                        *HOOKS.iterdir(), ROOT / "install.sh"]
                     if names.NAMESPACE in p.read_text())
    assert holders == ["kvmufw_hook/names.py"]


def test_a_start_without_our_metadata_imports_only_the_namespace(tmp_path):
    """A guest without forwards is the common start: the hook reads stdin, looks for
    names.NAMESPACE and returns; it loads names for that, and nothing else (not os)."""
    shim = installed_hook("qemu", tmp_path, python=f"{PYTHON} -X importtime")
    proc = subprocess.run([str(shim), "plain", "start", "begin", "-"],
                          input=b"<domain><name>plain</name></domain>",
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout == b""
    imported = {l.rsplit("|", 1)[1].strip() for l in proc.stderr.decode().splitlines()
                if l.startswith("import time:") and "|" in l}
    ours = {m for m in imported if m.startswith("kvmufw_hook")}
    assert ours == {"kvmufw_hook", "kvmufw_hook.hook", "kvmufw_hook.names"}, ours
    assert "os" not in imported


def test_the_installed_hook_refuses_a_start_removes_on_stop_and_ends_release_in_the_shell(
        netns, state_env, tmp_path):
    """The installed qemu hook (a shell script) against real rules: a start and a refused
    start reach Python with libvirt's exit codes, the stop removes every rule, and the
    release after it has nothing left: no interpreter starts (no import lines)."""
    hook = installed_hook("qemu", tmp_path, python=f"{PYTHON} -X importtime")
    clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LC_ALL": "C", **state_env}

    def call(name: str, op: str, data: bytes) -> tuple[int, list[str], bool]:
        proc = subprocess.run([*netns.prefix, str(hook), name, op, "begin", "-"], input=data,
                              capture_output=True, env=clean, timeout=60, check=False)
        assert proc.stdout == b""
        lines = proc.stderr.decode().splitlines()
        said = [l for l in lines if not l.startswith("import time:")]
        return proc.returncode, said, len(said) < len(lines)

    run_hook(*sample("16-network.lab.started"), state_env, netns)
    base = kvmufw_lines(netns)
    assert call("web1", "start", (SAMPLES / "04-qemu.web1.start.xml").read_bytes()) \
        == (0, [], True)
    running = kvmufw_lines(netns)
    assert running != base
    held = _web1('<kvmufw:forward proto="udp" host-port="5001-5010" '
                 'mac="52:54:00:00:00:20" guest-ip="10.0.0.9"/>', name="web2")
    status, said, python = call("web2", "start", held)
    assert (status, len(said), python) == (2, 1, True)
    assert said[0].startswith("kvmufw_hook: qemu start web2: domain 'web2': forward udp")
    assert kvmufw_lines(netns) == running
    assert call("web1", "stopped", b"") == (0, [], True)
    assert kvmufw_lines(netns) == base
    assert call("web1", "release", b"") == (0, [], False)
    assert call("web2", "stopped", b"") == (0, [], False)  # refused: it never had state
