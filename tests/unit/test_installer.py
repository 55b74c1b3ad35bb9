"""The Python installer (kvmufw_hook/commands/install.py) in a temporary root: what it
writes, what it refuses before its first write, what it rolls back, and what uninstall
removes: only what it recorded, exactly as it wrote it. No root, no daemon, milliseconds;
tests/lab/test_install.py runs the same installer through install.sh in a private host."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from conftest import ROOT

from kvmufw_hook.commands import doctor
from kvmufw_hook.commands import install as inst
from kvmufw_hook.installation import MANIFEST, Record

LIB = "/usr/local/lib/kvmufw_hook"
BIN = "/usr/local/sbin/kvmufw_hook"
QEMU_HOOK = "/etc/libvirt/hooks/qemu.d/kvmufw_hook"
AFTER_INIT = "/etc/ufw/after.init"
UFW_AFTER_INIT = "#!/bin/sh\nset -e\n\ncase \"$1\" in\nstart)\n    ;;\nesac\n"


class Quiet(inst.Offline):
    """--root's: no daemon, no libvirt; records what would have reached the firewall."""

    def __init__(self) -> None:
        object.__setattr__(self, "flushes", [])

    def flush(self, lay):
        self.flushes.append(lay.root)  # type: ignore[attr-defined]


@pytest.fixture
def root(tmp_path):
    for d in ("etc/ufw", "usr/local/lib", "usr/local/sbin", "var/lib", "run"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "etc/ufw/after.init").write_text(UFW_AFTER_INIT)
    (tmp_path / "etc/ufw/after.init").chmod(0o640)
    (tmp_path / "etc/ufw/ufw.conf").write_text("ENABLED=yes\n")
    return str(tmp_path)


def layout(root: str, **kw) -> inst.Layout:
    return inst.Layout(root=root, source=str(ROOT), libvirt=(9, 0), **kw)


def tree(root: str) -> dict[str, str]:
    """Every path under root (bytecode and our own run directory aside): type, mode and
    content or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            what = (os.readlink(path) if stat.S_ISLNK(st.st_mode) else
                    hashlib.sha256(open(path, "rb").read()).hexdigest()
                    if stat.S_ISREG(st.st_mode) else "dir")
            out[path[len(root):]] = f"{stat.S_IMODE(st.st_mode):o} {what}"
    return out


def read(root: str, path: str) -> str:
    with open(root + path, encoding="utf-8") as fh:
        return fh.read()


def test_install_writes_the_package_command_hooks_and_after_init_entry_and_records_each(
        root, capsys):
    lay = layout(root)
    assert inst.install(lay, Quiet()) == 0
    record = Record.load(root)
    assert record.hooks() == {"network": "/etc/libvirt/hooks/network.d/kvmufw_hook",
                              "qemu": QEMU_HOOK}
    for path in (BIN, QEMU_HOOK, f"{LIB}/kvmufw_hook/commands/install.py", f"{LIB}/.kvmufw_hook"):
        digest = hashlib.sha256(open(root + path, "rb").read()).hexdigest()
        assert record.files()[path] == digest, path
    assert f"\nLIB={LIB}\n" in read(root, QEMU_HOOK)
    text = read(root, AFTER_INIT)
    assert text.startswith("#!/bin/sh\n# BEGIN kvmufw_hook\n")
    assert f"timeout -k 2 20 {BIN} restore >/dev/null" in text and text.endswith(
        UFW_AFTER_INIT.split("\n", 1)[1])
    assert stat.S_IMODE(os.stat(root + AFTER_INIT).st_mode) == 0o740
    assert f"mode 640 {AFTER_INIT}" in record.lines
    assert {stat.S_IMODE(os.stat(root + p).st_mode) for p in (BIN, QEMU_HOOK)} == {0o755}
    assert stat.S_IMODE(os.stat(root + MANIFEST).st_mode) == 0o600
    out = capsys.readouterr().out
    assert f"wrote {QEMU_HOOK}" in out and "libvirt is not running" in out
    # a second install writes nothing
    before = tree(root)
    inst.install(lay, Quiet())
    assert "already installed: nothing to change" in capsys.readouterr().out
    assert tree(root) == before


def test_uninstall_after_install_leaves_the_tree_as_it_was(root):
    pristine = tree(root)
    inst.install(layout(root), Quiet())
    outside = Quiet()
    inst.uninstall(layout(root), outside)
    assert outside.flushes == [root]  # type: ignore[attr-defined]
    assert tree(root) == pristine


def test_uninstall_without_a_record_never_removes_an_admins_file_in_the_package_directory(
        root, capsys):
    """An install.sh that recorded nothing left only a marker in the package directory.
    Uninstall removes its marker and the package's modules, never the directory whole:
    the admin's own file stays, and uninstall says so."""
    lib = root + LIB
    os.makedirs(f"{lib}/kvmufw_hook")
    with open(f"{lib}/.kvmufw_hook", "w") as fh:
        fh.write(inst.MARK + "\n")
    with open(f"{lib}/kvmufw_hook/__init__.py", "w") as fh:
        fh.write("__version__ = '0.1'\n")
    with open(f"{lib}/site-notes.txt", "w") as fh:
        fh.write("the admin's own notes\n")
    inst.uninstall(layout(root), Quiet())
    assert sorted(os.listdir(lib)) == ["site-notes.txt"]
    assert read(root, f"{LIB}/site-notes.txt") == "the admin's own notes\n"
    assert f"left {LIB}: it holds files kvmufw_hook did not write" in capsys.readouterr().out


def test_install_over_an_unrecorded_package_directory_with_an_admins_file_refuses(root,
                                                                                  capsys):
    os.makedirs(root + LIB)
    with open(root + f"{LIB}/.kvmufw_hook", "w") as fh:
        fh.write(inst.MARK + "\n")
    with open(root + f"{LIB}/site-notes.txt", "w") as fh:
        fh.write("mine\n")
    before = tree(root)
    assert inst.run("install", root=root, source=str(ROOT), outside=Quiet()) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{LIB}/site-notes.txt is not as kvmufw_hook wrote it" in err
    assert tree(root) == before


def test_uninstall_leaves_a_file_changed_since_install_and_removes_the_rest(root, capsys):
    inst.install(layout(root), Quiet())
    with open(root + f"{LIB}/kvmufw_hook/model.py", "a") as fh:
        fh.write("# the admin's patch\n")
    with open(root + QEMU_HOOK, "a") as fh:
        fh.write("# mine\n")
    inst.uninstall(layout(root), Quiet())
    out = capsys.readouterr().out
    assert f"left {QEMU_HOOK} alone: not as kvmufw_hook wrote it" in out
    assert os.listdir(root + LIB) == ["kvmufw_hook"]
    assert os.listdir(root + f"{LIB}/kvmufw_hook") == ["model.py"]
    assert not os.path.exists(root + BIN) and not os.path.exists(root + MANIFEST)


@pytest.mark.parametrize("link", [BIN, "/etc/libvirt/hooks/qemu.d", LIB, AFTER_INIT])
def test_a_symlink_anywhere_we_write_is_refused_before_the_first_write(root, link, capsys):
    os.makedirs(os.path.dirname(root + link), exist_ok=True)
    if os.path.exists(root + link):
        os.rename(root + link, root + link + ".real")
    os.symlink("/nowhere", root + link)
    before = tree(root)
    assert inst.run("install", root=root, source=str(ROOT), outside=Quiet()) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{link} is a symlink" in err
    assert tree(root) == before


def test_a_failure_after_the_first_write_rolls_back_everything(root, monkeypatch, capsys):
    before = tree(root)

    def full(tx):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(inst, "install_systemd", full)
    with pytest.raises(OSError):
        inst.install(layout(root), Quiet())
    assert "rolled back what this run wrote" in capsys.readouterr().err
    assert tree(root) == before


def test_the_package_retires_an_install_sh_install_and_keeps_the_admins_after_init(root,
                                                                                 capsys):
    """postinst (install --packaged): install.sh's command and package would shadow the
    package's on PATH, so they go (as recorded); after.init is UFW's file, edited only by
    the admin's own command, which the postinst names."""
    inst.install(layout(root), Quiet())
    after_init = read(root, AFTER_INIT)
    capsys.readouterr()
    packaged = inst.Layout(root=root, packaged=True)
    inst.install_packaged(packaged, Quiet())
    out = capsys.readouterr().out
    assert f"removed {BIN}" in out and not os.path.exists(root + LIB)
    assert read(root, AFTER_INIT) == after_init
    assert "run once: kvmufw_hook ufw-entry add" in out
    record = Record.load(root)
    assert record.packaged and record.hooks()["qemu"] == QEMU_HOOK
    assert not record.files()
    [entry] = [f for f in doctor.check_ufw({}, root=root) if f.check == "UFW after.init"]
    assert (entry.level, entry.fix) == ("FAIL", "kvmufw_hook ufw-entry add")
    assert f"runs {BIN}, which is gone" in entry.detail
    # the admin's command points the entry at the package's command; remove takes it out
    inst.ufw_entry(packaged, "add")
    assert "-x /usr/sbin/kvmufw_hook ]" in read(root, AFTER_INIT)
    assert inst.ufw_entry_present(packaged)
    os.makedirs(root + "/usr/sbin")
    with open(root + "/usr/sbin/kvmufw_hook", "w") as fh:
        fh.write("#!/bin/sh\n")
    os.chmod(root + "/usr/sbin/kvmufw_hook", 0o755)
    [entry] = [f for f in doctor.check_ufw({}, root=root) if f.check == "UFW after.init"]
    assert entry.level == "OK"
    inst.ufw_entry(packaged, "remove")
    assert read(root, AFTER_INIT) == UFW_AFTER_INIT
    assert stat.S_IMODE(os.stat(root + AFTER_INIT).st_mode) == 0o640


def test_doctor_checks_the_hooks_the_installer_recorded(root):
    inst.install(layout(root), Quiet())
    assert [(f.level, f.detail) for f in doctor.check_hooks(root)] == [
        ("OK", "installed: /etc/libvirt/hooks/network.d/kvmufw_hook, "
               f"{QEMU_HOOK} (no libvirt daemon running)")]
    os.chmod(root + QEMU_HOOK, 0o644)
    assert [(f.level, f.detail) for f in doctor.check_hooks(root)] == [
        ("FAIL", f"{QEMU_HOOK} is not executable")]


def test_install_sh_leaves_a_host_with_the_debian_package_alone(root, capsys):
    inst.install_packaged(inst.Layout(root=root, packaged=True), Quiet())
    capsys.readouterr()
    before = tree(root)
    for action in ("install", "uninstall"):
        assert inst.run(action, root=root, source=str(ROOT), outside=Quiet()) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "installed as the Debian package" in err
    assert tree(root) == before


def test_under_a_root_nothing_reaches_this_hosts_daemons_or_firewall(root, capsys,
                                                                     monkeypatch):
    """--root is another file system's: the command installs and uninstalls its files and
    tells no daemon, applies and flushes no rule (the host's own are left alone)."""
    from kvmufw_hook import ops
    flushed = []
    monkeypatch.setattr(ops, "flush", lambda *a, **k: flushed.append(a))
    for action in ("install", "uninstall"):
        assert inst.run(action, root=root, source=str(ROOT)) == 0
    out = capsys.readouterr().out
    assert "SIGHUP" not in out and "replay" not in out and "flush" not in out
    assert "libvirt is not running" in out and "uninstalled" in out and not flushed


@pytest.mark.parametrize("prefix", ["/opt/my tools", "/opt/$HOME", "/opt/a'b", "opt/kvm",
                                    "/opt/100%", "/opt/../etc", '/opt/a"b', "/opt/a\\b"])
def test_a_prefix_that_shell_or_systemd_would_read_otherwise_is_refused_with_one_line(
        root, prefix, capsys):
    before = tree(root)
    assert inst.run("install", root=root, source=str(ROOT), prefix=prefix) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prefix" in err
    assert tree(root) == before
