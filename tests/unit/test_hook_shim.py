"""qemu's hook is a shell script: the calls that need nothing end in the shell, the others
go to python3 in the same process with argv and stdin untouched. Run here as installed
(``install_files.hook_text``), with the interpreter it execs replaced by a program that
records how it was run, or by the real one where the package's answer matters."""

import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLES
from hookrun import installed_hook

from kvmufw_hook import state
from kvmufw_hook.commands.install_files import Layout, hook_script
from kvmufw_hook.hook import QEMU_OPS
from kvmufw_hook.names import MAX_ENCODED, domain_owner, safe_name, state_dir

PREPARE_XML = (SAMPLES / "01-qemu.web1.prepare.xml").read_bytes()
# every qemu op of libvirt's (virHookQemuOpType), and calls a libvirt never makes
NO_OPS = [["web1", "prepare", "begin", "-"], ["web1", "started", "begin", "-"],
          ["web1", "attach", "begin", "-"], ["web1", "no-such-op", "x", "-"],
          ["web1", "START", "begin", "-"], ["web1"], []]


def shell_ops() -> set[str]:
    """The ops qemu's hook hands to Python: the first pattern of its ``case ${2-}``."""
    text = (ROOT / "hooks" / "qemu").read_text()
    found = re.search(r"^case \$\{2-\} in\n\s*([\w|-]+)\) ;;\n", text, re.M)
    assert found, "hooks/qemu: no `case ${2-} in` with the ops that go to Python"
    return set(found[1].split("|"))


def test_the_shell_hands_python_exactly_hook_qemu_ops():
    assert shell_ops() == QEMU_OPS


def recorder(tmp_path: Path) -> tuple[str, Path]:
    """A stand-in for python3 that writes its pid (a line), its argv (each ended by NUL)
    and its stdin, then exits 7."""
    out = tmp_path / "ran"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{{ echo $$; printf '%s\\0' \"$@\"; }} > {out}.argv\n"
                    f"cat > {out}.stdin\nexit 7\n")
    fake.chmod(0o755)
    return str(fake), out


@pytest.mark.parametrize("argv", NO_OPS)
def test_a_call_that_needs_nothing_ends_in_the_shell(argv, tmp_path):
    fake, out = recorder(tmp_path)
    hook = installed_hook("qemu", tmp_path, python=fake)
    proc = subprocess.run([str(hook), *argv], input=PREPARE_XML, capture_output=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=30, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert not Path(f"{out}.argv").exists()


@pytest.mark.parametrize("op", sorted(QEMU_OPS))
def test_an_op_that_matters_is_python_in_the_same_process_with_argv_and_stdin(op, tmp_path):
    """exec: one process (libvirt's timeout and a SIGKILL reach the interpreter), its exit
    status is the hook's, and LIB comes first, then libvirt's argv as it was."""
    fake, out = recorder(tmp_path)
    lib = tmp_path / "a lib's dir, with 'quotes' and $HOME"
    hook = installed_hook("qemu", tmp_path, lib=lib, python=fake)
    argv = ["web 1", op, "begin", "-"]
    proc = subprocess.Popen([str(hook), *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
    stdout, stderr = proc.communicate(PREPARE_XML, timeout=30)
    assert (proc.returncode, stdout, stderr) == (7, b"", b"")
    pid, args = Path(f"{out}.argv").read_text().split("\n", 1)
    assert int(pid) == proc.pid
    args = args.split("\0")[:-1]
    assert args[0] == "-c" and args[2:] == [str(lib), *argv]  # the stand-in took "python3 -IS"
    assert Path(f"{out}.stdin").read_bytes() == PREPARE_XML


def test_the_installed_hook_is_the_one_the_installer_writes(tmp_path):
    """What these tests run is what install.sh and the Debian package install, but for
    the mark."""
    lay = Layout(source=str(ROOT), packaged=True)
    installed = hook_script(lay, "qemu").decode()
    shebang, mark, rest = installed.split("\n", 2)
    assert (shebang, mark) == ("#!/bin/sh", lay.mark)
    assert f"{shebang}\n{rest}" == installed_hook("qemu", tmp_path, lib=lay.lib).read_text()
    assert f"\nLIB={lay.lib}\n" in installed


def test_a_package_being_replaced_is_a_quiet_exit_0(tmp_path):
    """The real interpreter, an empty LIB (the package gone mid-upgrade): a warning to
    syslog, nothing on stdout or stderr, exit 0."""
    (tmp_path / "lib").mkdir()
    hook = installed_hook("qemu", tmp_path, lib=tmp_path / "lib")
    proc = subprocess.run([str(hook), "web1", "start", "begin", "-"], input=PREPARE_XML,
                          capture_output=True, env={"PATH": "/usr/bin:/bin"}, timeout=30,
                          check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")


def test_a_start_without_our_metadata_reaches_the_package_and_returns_0(tmp_path):
    hook = installed_hook("qemu", tmp_path)
    proc = subprocess.run([str(hook), "plain", "start", "begin", "-"],
                          input=b"<domain><name>plain</name></domain>", capture_output=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=30, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")


# ------------------------------------------------------------------ a stop with nothing to do

NAMES = ["web1", "web-1_2.x", ".", "..", "-web1", "W" * MAX_ENCODED, "W" * (MAX_ENCODED + 1),
         "web 1", "web1~20", "wéb1", "web1\u00a0", "d=web1", "web/1", ""]


def state_of(kind: str, name: str) -> None:
    """One kind of state left in KVMUFW_STATE_DIR: a guest's state file, the marker of a
    failed removal (of this guest or of another), another guest's state, or none."""
    if kind == "domain":
        state.save_domain(name, b"<domain/>")
    elif kind == "marker":
        state.mark_stopped(domain_owner(name))
    elif kind == "other marker":
        state.mark_stopped(domain_owner("other"))
    elif kind == "other domain":
        state.save_domain("other", b"<domain/>")


@pytest.mark.parametrize("op", ["stopped", "release"])
@pytest.mark.parametrize("kind", ["none", "domain", "marker", "other marker", "other domain"])
@pytest.mark.parametrize("name", NAMES)
def test_a_stop_goes_to_python_whenever_the_package_has_something_to_remove(
        op, kind, name, tmp_path, monkeypatch):
    """The shell ends a stop only where hook.py would return at once (no
    ``state.has_domain``), and does for a plain name with no state and no marker."""
    monkeypatch.setenv("KVMUFW_STATE_DIR", str(tmp_path / "state"))
    state_of(kind, name)
    fake, out = recorder(tmp_path)
    hook = installed_hook("qemu", tmp_path, python=fake)
    proc = subprocess.run([str(hook), name, op, "end", "-"], input=b"", capture_output=True,
                          env={"PATH": "/usr/bin:/bin", "KVMUFW_STATE_DIR": str(tmp_path / "state")},
                          timeout=30, check=False)
    python_ran = Path(f"{out}.argv").exists()
    assert proc.returncode == (7 if python_ran else 0) and proc.stdout == b""
    if state.has_domain(name):
        assert python_ran
    plain = 0 < len(name) <= MAX_ENCODED and safe_name(name) == name
    if kind in ("none", "other domain") and plain:
        assert not python_ran


def test_the_shell_knows_the_state_directory_and_the_longest_plain_name(monkeypatch):
    text = (ROOT / "hooks" / "qemu").read_text()
    monkeypatch.delenv("KVMUFW_STATE_DIR", raising=False)
    assert f"state=${{KVMUFW_STATE_DIR:-{state_dir()}}}\n" in text
    assert f"[ ${{#1}} -le {MAX_ENCODED} ] || return 1\n" in text
    assert "'' | *[!A-Za-z0-9._-]*) return 1 ;;" in text
    assert {ch for ch in map(chr, range(128)) if safe_name(ch) == ch} == set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def test_an_empty_state_directory_variable_is_the_default_as_in_the_shell(monkeypatch):
    """KVMUFW_STATE_DIR set but empty: the shell's ``${KVMUFW_STATE_DIR:-...}`` looks in
    the default directory, so the package must too (it looked relative to the working
    directory, where a stop the shell ended could have had state to remove, and a start
    recursed without end making the directory "")."""
    monkeypatch.delenv("KVMUFW_STATE_DIR", raising=False)
    default = state_dir()
    monkeypatch.setenv("KVMUFW_STATE_DIR", "")
    assert state_dir() == default == "/run/kvmufw_hook"


@pytest.mark.parametrize("lib", ['/opt/a "quoted" dir', "/opt/back\\slash", "/opt/x\\n", "/opt/é"])
def test_the_network_hook_names_any_package_directory_exactly(lib, tmp_path):
    """network's hook is Python: LIB is a string literal there, whatever --prefix gave
    (a quote was a syntax error, a backslash another directory)."""
    import ast
    text = installed_hook("network", tmp_path, lib=lib).read_text()
    line = next(line for line in text.splitlines() if line.startswith("LIB = "))
    assert ast.literal_eval(line.removeprefix("LIB = ")) == lib
    compile(text, "network", "exec")
