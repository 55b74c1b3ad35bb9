"""``kvmufw_hook install`` / ``uninstall`` / ``ufw-entry``: put kvmufw_hook on a host, or
take it off, and tell the running libvirt daemons.

Two layouts:

* **from the source tree** (``install.sh`` hands over to ``install --source DIR``): the
  package in PREFIX/lib/kvmufw_hook, the command PREFIX/sbin/kvmufw_hook, the hooks as
  drop-ins in /etc/libvirt/hooks/{network,qemu}.d/ (libvirt >= 6.5; older: the hook files
  /etc/libvirt/hooks/{network,qemu}), an entry in /etc/ufw/after.init that runs
  ``kvmufw_hook restore`` whenever UFW starts or reloads, and, where systemd runs,
  drop-ins that start libvirt after UFW and put our jumps back after each daemon start.
* **the Debian package** (its postinst runs ``install --packaged``): dpkg owns every file;
  this only retires what an earlier ``install.sh`` wrote, records the hooks for ``doctor``
  and tells the daemons. A maintainer script never edits another package's file, so the
  after.init entry is the admin's own command: ``kvmufw_hook ufw-entry add``.

What both promise:

* A file is ours only if its content is exactly what we wrote: the sha256 of each file we
  write is recorded (``installation.Record``). Anything else at a path we use is never
  overwritten nor deleted: install refuses, in one line, before its first write; uninstall
  leaves it and says so. Nothing is written or removed through a symlink.
* Every check runs before the first write; a failure after it rolls back what this run
  wrote.
* One SIGHUP to a running daemon, only if it started while no hook of a kind it runs
  existed (it would not run ours without one); none on uninstall.

Paths are read and written under ``root`` (``--root``), so all of this is unit-tested in
a temporary directory without root; only ``main`` talks to daemons, systemd and libvirt.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

from ..errors import ApplyError
from ..installation import (
    AFTER_INIT,
    HOOK_DRIVERS,
    HOOKS,
    HOOKS_FOUND,
    MANIFEST,
    MANIFEST_DIR,
    SIGHUP_STAMP,
    STATE_DIR,
    SYSTEMD_DIR,
    Daemon,
    Record,
    file_sha256,
    hooks_appeared,
    hooks_found,
    missed_hooks,
    read_text,
    running_daemons,
    sha256,
)
from ..installation import packaged as is_packaged
from . import describe
from .install_files import (
    BEGIN,
    END,
    MARK,
    SYSTEMD_UNITS,
    Layout,
    Refused,
    Transaction,
    after_init_block,
    bin_script,
    block_sha,
    block_span,
    check_after_init,
    dropin,
    dropin_path,
    free_path,
    hook_script,
    hook_sha,
    host_layout,
    is_ours,
    known_block,
    legacy_dropin,
    legacy_lib,
    lib_entries,
    lib_is_ours,
    no_symlink,
    package_files,
    safe_dir,
    say,
    write_record,
)


def check_install(lay: Layout, record: Record) -> None:
    """Every check of a source-tree install, before its first write."""
    if not (os.path.isfile(os.path.join(lay.source, "kvmufw_hook", "__init__.py"))
            and os.path.isdir(os.path.join(lay.source, "hooks"))):
        raise Refused("run install.sh from the kvmufw_hook source tree")
    safe_dir(lay, MANIFEST_DIR)
    no_symlink(lay, MANIFEST)
    no_symlink(lay, lay.lib)
    safe_dir(lay, os.path.dirname(lay.lib))
    if os.path.lexists(lay.at(lay.lib)):
        if not os.path.isdir(lay.at(lay.lib)):
            raise Refused(f"{lay.lib} is not a directory; move it away and install again")
        legacy = legacy_lib(lay, record)
        for path in lib_entries(lay):
            if os.path.islink(lay.at(path)):
                raise Refused(f"{path} is a symlink; kvmufw_hook never writes through one: "
                              f"move {lay.lib} away and install again")
            if not lib_is_ours(lay, record, path, legacy):
                raise Refused(f"{path} is not as kvmufw_hook wrote it; not overwriting "
                              f"{lay.lib} (move it away, then install again)")
    free_path(lay, record, lay.bin, sha256(bin_script(lay)))
    safe_dir(lay, HOOKS)
    for driver, path in lay.hook_paths().items():
        free_path(lay, record, path, sha256(hook_script(lay, driver)))
    check_after_init(lay, record)
    if lay.systemd:
        safe_dir(lay, SYSTEMD_DIR)
        for unit in SYSTEMD_UNITS:
            free_path(lay, record, dropin_path(unit), sha256(dropin(lay)),
                      sha256(legacy_dropin()))


def install_package(tx: Transaction) -> None:
    lay = tx.lay
    files = package_files(lay)
    lib = lay.at(lay.lib)
    tx.make_dirs(os.path.dirname(lay.lib))
    current = {os.path.relpath(lay.at(p), lib): file_sha256(lay.at(p)) for p in lib_entries(lay)}
    if current != {rel: sha256(data) for rel, data in files.items()}:
        staging = tempfile.mkdtemp(prefix=".kvmufw_hook.", dir=os.path.dirname(lib))
        tx.undo.append(lambda: shutil.rmtree(staging, ignore_errors=True))
        for rel, data in files.items():
            path = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
            os.chmod(path, 0o644)
        for dirpath, _dirs, _files in os.walk(staging):
            os.chmod(dirpath, 0o755)
            if os.geteuid() == 0:
                os.chown(dirpath, 0, 0)
                for name in _files:
                    os.chown(os.path.join(dirpath, name), 0, 0)
        if os.path.lexists(lib):
            old = tempfile.mkdtemp(prefix=".kvmufw_hook.", dir=os.path.dirname(lib))
            os.rename(lib, os.path.join(old, "lib"))

            def put_back(old: str = old) -> None:
                shutil.rmtree(lib, ignore_errors=True)
                os.rename(os.path.join(old, "lib"), lib)
                os.rmdir(old)
            tx.undo.append(put_back)
            tx.on_commit.append(lambda: shutil.rmtree(old, ignore_errors=True))
        else:
            tx.undo.append(lambda: shutil.rmtree(lib, ignore_errors=True))
        os.rename(staging, lib)
        say(f"installed the package in {lay.lib}")
        tx.changed = True
    # compile once now, so that hooks never write bytecode at guest start
    import compileall
    compileall.compile_dir(os.path.join(lib, "kvmufw_hook"), quiet=2)
    tx.record.forget_under(lay.lib)
    for rel, data in files.items():
        tx.record.set_file(f"{lay.lib}/{rel}", sha256(data))
    tx.put_file(lay.bin, bin_script(lay), 0o755)


def claimed_hook(lay: Layout, record: Record, path: str) -> bool:
    """A drop-in of ours, or a plain hook file an install recorded or marked (the main
    hook files are ours only where an install wrote them; elsewhere they are the admin's)."""
    if path.endswith("/kvmufw_hook"):
        return True
    if path in record.files():
        return True
    text = read_text(lay.at(path)) if os.path.isfile(lay.at(path)) else None
    return text is not None and MARK in text.splitlines()


def retire_hooks(tx: Transaction, keep: dict[str, str]) -> None:
    """Remove our hooks of the other layout: libvirt >= 6.5 runs hooks/DRV and every
    DRV.d/ entry, so after a libvirt upgrade both of ours would run."""
    lay = tx.lay
    for driver in HOOK_DRIVERS:
        for path in (f"{HOOKS}/{driver}", f"{HOOKS}/{driver}.d/kvmufw_hook"):
            if path in keep.values() or not os.path.lexists(lay.at(path)):
                continue
            if not claimed_hook(lay, tx.record, path):
                continue
            if not is_ours(lay, tx.record, path, hook_sha(lay, driver)):
                say(f"left {path} alone: not as kvmufw_hook wrote it (an older hook of ours? "
                    "then remove it by hand)")
                continue
            tx.remove(path)
            tx.record.forget_file(path)
            say(f"removed {path}: kvmufw_hook's hooks are {keep['network']} and "
                f"{keep['qemu']} for this libvirt")
            tx.changed = True


def install_hooks(tx: Transaction) -> None:
    paths = tx.lay.hook_paths()
    for driver, path in paths.items():
        tx.put_file(path, hook_script(tx.lay, driver), 0o755)
    retire_hooks(tx, paths)
    tx.record.set_hooks(paths)


def _rewrite_after_init(tx: Transaction, text: str) -> None:
    st = os.stat(tx.lay.at(AFTER_INIT))
    tx.replace(AFTER_INIT, text.encode(), stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid),
               prefix=".after.init.")


def install_after_init(tx: Transaction) -> None:
    lay = tx.lay
    if not os.path.isdir(lay.at("/etc/ufw")):
        say("UFW is not installed: no after.init entry (run kvmufw_hook restore after a "
            "firewall reload)")
        return
    block = after_init_block(lay)
    digest = sha256(block.encode())
    tx.record.lines = {line for line in tx.record.lines
                       if not line.startswith("block ") or not line.endswith(" " + AFTER_INIT)}
    if not os.path.lexists(lay.at(AFTER_INIT)):
        tx.put_file(AFTER_INIT, ("#!/bin/sh\n" + block).encode(), 0o755)
        tx.record.forget_file(AFTER_INIT)  # UFW may change it; ours is the block
        tx.record.lines |= {f"created {AFTER_INIT}", f"block {digest} {AFTER_INIT}"}
        return
    text = read_text(lay.at(AFTER_INIT)) or ""
    span = block_span(text)
    lines = text.splitlines(keepends=True)
    if span is None:
        if lines and lines[0].startswith("#!"):
            # the shebang on a line of its own, even in a file without a final newline
            new = lines[0].rstrip("\n") + "\n" + block + "".join(lines[1:])
        else:
            new = block + text
        _rewrite_after_init(tx, new)
        say(f"added the restore entry to {AFTER_INIT}")
        tx.changed = True
    elif block_sha(text, span) != digest:
        new = "".join(lines[:span[0]]) + block + "".join(lines[span[1] + 1:])
        _rewrite_after_init(tx, new)
        say(f"replaced the kvmufw_hook entry in {AFTER_INIT} by the current one (restore, "
            "bounded)")
        tx.changed = True
    tx.record.lines.add(f"block {digest} {AFTER_INIT}")
    mode = stat.S_IMODE(os.stat(lay.at(AFTER_INIT)).st_mode)
    if not mode & 0o100:
        new_mode = (mode | 0o100) & ~0o022
        tx.record.lines.add(f"mode {mode:o} {AFTER_INIT}")
        os.chmod(lay.at(AFTER_INIT), new_mode)
        tx.undo.append(lambda: os.chmod(lay.at(AFTER_INIT), mode))
        say(f"made {AFTER_INIT} executable (mode {mode:o} -> {new_mode:o}) so UFW runs it")
        tx.changed = True


def daemon_reload(lay: Layout) -> None:
    if lay.root or not lay.systemd:
        return
    try:
        subprocess.run(["systemctl", "daemon-reload"], check=True, timeout=60,
                       stdout=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        say("systemctl daemon-reload failed; run it by hand")


def install_systemd(tx: Transaction) -> None:
    if not tx.lay.systemd:
        return
    before = tx.changed
    tx.changed = False
    for unit in SYSTEMD_UNITS:
        tx.put_file(dropin_path(unit), dropin(tx.lay), 0o644)
    if tx.changed:
        tx.undo.append(lambda: daemon_reload(tx.lay))
        daemon_reload(tx.lay)
    tx.changed = tx.changed or before


# --------------------------------------------------------------------------- daemons

@dataclass(frozen=True)
class Outside:
    """What install and uninstall do beyond files: tell daemons, apply or flush rules.
    The unit tests stand a recorder in for it."""
    wait: float = float(os.environ.get("KVMUFW_DAEMON_WAIT", "30"))

    def answers(self, lay: Layout, uri: str) -> bool:
        """The daemon takes a call again within ``wait`` seconds."""
        virsh = shutil.which("virsh")
        if not virsh:
            return True
        deadline = time.monotonic() + self.wait
        while True:
            try:
                if subprocess.run([lay.timeout, "5", virsh, "-q", "-c", uri, "version"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=10).returncode == 0:
                    return True
            except (OSError, subprocess.SubprocessError):
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def sighup(self, pid: int) -> bool:
        try:
            os.kill(pid, 1)
        except OSError:
            return False
        return True

    def replay(self, lay: Layout) -> bool:
        # bounded: a libvirt that does not answer must not hang the install
        try:
            return subprocess.run([lay.timeout, "120", lay.bin, "replay"]).returncode == 0
        except OSError:
            return False

    def flush(self, lay: Layout) -> None:
        """Every kvmufw rule out, under the state lock (the one place uninstall does it),
        leaving the ``uninstalled`` marker: a hook already waiting for the lock, or still
        starting, applies nothing after it (``ops.uninstall``)."""
        from ..ops import uninstall as flush_for_uninstall
        flush_for_uninstall()

    def mark_installed(self, lay: Layout) -> None:
        """Hooks apply again: lift the marker an earlier uninstall left (before the hooks
        are written, so that no hook of this install finds it)."""
        from ..state import mark_installed
        mark_installed()

    def daemons(self, lay: Layout) -> list[tuple[Daemon, int]]:
        return running_daemons(lay.root)

    def libvirt_reachable(self, lay: Layout) -> bool:
        """A daemon runs, or systemd starts one on the first connection."""
        if self.daemons(lay):
            return True
        if not lay.systemd:
            return False
        return any(subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0
                   for unit in ("libvirtd.socket", "virtqemud.socket"))


class Offline(Outside):
    """``--root``: that file system's files only; its daemons and firewall are not this
    host's, so none is told and no rule is flushed or applied."""

    def daemons(self, lay: Layout) -> list[tuple[Daemon, int]]:
        return []

    def libvirt_reachable(self, lay: Layout) -> bool:
        return False

    def flush(self, lay: Layout) -> None:
        pass

    def mark_installed(self, lay: Layout) -> None:
        pass


def signal_where_needed(lay: Layout, outside: Outside, found: set[str], changed: bool) -> None:
    """A daemon that runs a driver whose hooks it did not find (``found``: before this
    run wrote anything) gets exactly one SIGHUP: it re-reads the hook directory then."""
    for daemon, pid in outside.daemons(lay):
        missing = [d for d in daemon.drivers if d not in found]
        if not missing:
            if changed:
                say(f"{daemon.name} ({pid}) runs the hooks in {HOOKS} already: no SIGHUP "
                    "needed")
            continue
        kinds = " or ".join(missing)
        if not outside.answers(lay, daemon.uri):
            say(f"{daemon.name} ({pid}) does not answer on {daemon.uri}; sending the SIGHUP "
                "anyway")
        if not outside.sighup(pid):
            say(f"{daemon.name} ({pid}) exited before the SIGHUP: it finds the hooks when it "
                "starts again")
            continue
        if outside.answers(lay, daemon.uri):
            say(f"sent one SIGHUP to {daemon.name} ({pid}): it started while no {kinds} hook "
                "existed and would not have run ours; it answers again")
        else:
            say(f"sent one SIGHUP to {daemon.name} ({pid}) (no {kinds} hook existed when it "
                f"started); it does not answer within {outside.wait:g}s: check it")


def stamp_sighup(lay: Layout) -> None:
    """doctor: as of now every running daemon runs the hooks (by SIGHUP or since start)."""
    path = lay.at(SIGHUP_STAMP)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("the running libvirt daemons run these hooks since this time\n")
    os.chmod(path, 0o600)


def finish(lay: Layout, outside: Outside, changed: bool) -> int:
    if changed and outside.daemons(lay):
        stamp_sighup(lay)
    if not changed:
        say("already installed: nothing to change")
    if outside.libvirt_reachable(lay):
        if outside.replay(lay):
            say("done")
        else:
            say("installed, but replay reported problems (see above); run: kvmufw_hook "
                "replay")
    else:
        say("done; libvirt is not running: rules are added as networks and guests start")
    return 0


# --------------------------------------------------------------------------- install

def install(lay: Layout, outside: Outside) -> int:
    """From the source tree: every check, then every write (rolled back on failure)."""
    record = Record.load(lay.root)
    check_install(lay, record)
    found = {d for d in HOOK_DRIVERS if hooks_found(d, lay.root)}  # before any write
    outside.mark_installed(lay)
    try:
        with Transaction(lay, record.copy()) as tx:
            install_package(tx)
            install_hooks(tx)
            install_after_init(tx)
            install_systemd(tx)
            write_record(tx)
    except BaseException:
        print("kvmufw_hook install: failed after it had started writing; rolled back what "
              "this run wrote", file=sys.stderr)
        raise
    signal_where_needed(lay, outside, found, tx.changed)
    return finish(lay, outside, tx.changed)


def install_packaged(lay: Layout, outside: Outside) -> int:
    """The Debian package's postinst: dpkg wrote every file. Retire an earlier install.sh
    install (its command and package would shadow ours on PATH), record the hooks for
    doctor, tell the daemons that started before the hooks existed, replay."""
    record = Record.load(lay.root)
    safe_dir(lay, MANIFEST_DIR)
    no_symlink(lay, MANIFEST)
    outside.mark_installed(lay)  # dpkg has unpacked the hooks: they must apply again
    with Transaction(lay, record.copy()) as tx:
        if not record.packaged and record.lines:
            retire_script_install(tx)
        tx.record.lines.add("packaged")
        tx.record.set_hooks({drv: f"{HOOKS}/{drv}.d/kvmufw_hook" for drv in HOOK_DRIVERS})
        write_record(tx)
    found = hooks_found_before_unpack(lay)
    signal_where_needed(lay, outside, found, True)
    changed = not record.packaged
    if outside.daemons(lay):
        stamp_sighup(lay)
    if os.path.isdir(lay.at("/etc/ufw")) and not ufw_entry_present(lay):
        say(f"to put kvmufw_hook's rules back after every 'ufw reload', run once: "
            f"kvmufw_hook ufw-entry add (it adds a marked block to {AFTER_INIT})")
    return finish(lay, outside, changed)


def hooks_found_before_unpack(lay: Layout) -> set[str]:
    """The kinds of hook a running daemon could have found: as the preinst saw them
    before dpkg wrote ours; without its note (a reconfigure), those whose hook no running
    daemon has missed (as doctor decides)."""
    path = lay.at(HOOKS_FOUND)
    text = read_text(path) if not os.path.islink(path) else None
    if text is not None:
        os.unlink(path)
        return set(text.split()) & set(HOOK_DRIVERS)
    return {d for d in HOOK_DRIVERS if not hooks_newer_than_daemons(lay, d)}


def hooks_newer_than_daemons(lay: Layout, driver: str) -> bool:
    """A running daemon that runs ``driver`` started before our hook of that kind
    appeared and has had no SIGHUP since (as doctor decides)."""
    appeared = hooks_appeared([f"{HOOKS}/{driver}.d/kvmufw_hook"], lay.root)
    return any(missed_hooks(pid, appeared, lay.root)
               for daemon, pid in running_daemons(lay.root) if driver in daemon.drivers)


def retire_script_install(tx: Transaction) -> None:
    """What install.sh wrote and dpkg now provides: its command, package and drop-ins
    (only what it recorded, exactly as recorded). The after.init block stays: it is the
    admin's (``kvmufw_hook ufw-entry add`` points it at this package)."""
    lay = replace(tx.lay, packaged=False)  # where install.sh wrote
    packaged_hooks = {f"{HOOKS}/{drv}.d/kvmufw_hook" for drv in HOOK_DRIVERS}
    for path in sorted(tx.record.files()):
        if path == AFTER_INIT or path.startswith(lay.lib + "/"):
            continue
        if path not in packaged_hooks and is_ours(lay, tx.record, path):  # dpkg's: symlinks
            tx.remove(path)
            say(f"removed {path} (install.sh's; the package provides kvmufw_hook now)")
        tx.record.forget_file(path)
    uninstall_package(lay, tx.record)
    for directory in reversed(tx.record.of_kind("dir")):
        try:
            os.rmdir(lay.at(directory))
        except OSError:
            continue
        tx.record.lines.discard(f"dir {directory}")


# --------------------------------------------------------------------------- ufw-entry

def ufw_entry_present(lay: Layout) -> bool:
    text = read_text(lay.at(AFTER_INIT)) or ""
    try:
        span = block_span(text)
    except ValueError:
        return False
    return (span is not None and block_sha(text, span) == sha256(after_init_block(lay).encode())
            and os.access(lay.at(AFTER_INIT), os.X_OK))


def ufw_entry(lay: Layout, action: str) -> int:
    """The admin's command that adds (or removes) our block in UFW's after.init."""
    record = Record.load(lay.root)
    if action == "add":
        if not os.path.isdir(lay.at("/etc/ufw")):
            raise Refused("UFW is not installed (no /etc/ufw): nothing to add")
        safe_dir(lay, MANIFEST_DIR)
        check_after_init(lay, record)
    with Transaction(lay, record.copy()) as tx:
        if action == "add":
            install_after_init(tx)
            if not tx.changed:
                say(f"{AFTER_INIT} runs kvmufw_hook restore already")
        else:
            uninstall_after_init(tx)
        write_record(tx)
    return 0


# --------------------------------------------------------------------------- uninstall

def remove_ours(tx: Transaction, path: str, *accepted: str) -> None:
    lay = tx.lay
    if os.path.islink(lay.at(path)):
        say(f"left {path} alone: it is a symlink, not a file kvmufw_hook wrote")
    elif is_ours(lay, tx.record, path, *accepted):
        os.unlink(lay.at(path))
        tx.record.forget_file(path)
        say(f"removed {path}")
    elif os.path.lexists(lay.at(path)):
        say(f"left {path} alone: not as kvmufw_hook wrote it (changed since, or someone "
            "else's)")


def uninstall_after_init(tx: Transaction) -> None:
    lay, record = tx.lay, tx.record
    path = lay.at(AFTER_INIT)
    if os.path.islink(path):
        text = read_text(path) or ""
        if BEGIN in text.splitlines() or END in text.splitlines():
            say(f"left {AFTER_INIT} alone: it is a symlink (to {os.readlink(path)}); remove "
                f"the kvmufw_hook block from {os.path.realpath(path)} by hand")
        return
    if not os.path.isfile(path):
        return
    text = read_text(path) or ""
    try:
        span = block_span(text)
    except ValueError:
        say(f"left {AFTER_INIT} unchanged: its kvmufw_hook block is not whole ('{BEGIN}' or "
            f"'{END}' missing or repeated); remove what is left of it by hand")
        return
    if span:
        if not known_block(lay, record, block_sha(text, span)):
            say(f"left {AFTER_INIT} unchanged: its kvmufw_hook block (lines {span[0] + 1}-"
                f"{span[1] + 1}) was changed since install; remove it by hand")
            return
        lines = text.splitlines(keepends=True)
        rest = "".join(lines[:span[0]] + lines[span[1] + 1:])
        _rewrite_after_init(tx, rest)
        say(f"removed the kvmufw_hook entry from {AFTER_INIT}")
        record.lines = {line for line in record.lines
                        if not (line.startswith("block ") and line.endswith(" " + AFTER_INIT))}
        if f"created {AFTER_INIT}" in record.lines and rest.strip() == "#!/bin/sh":
            tx.remove(AFTER_INIT)
            record.lines.discard(f"created {AFTER_INIT}")
            say(f"removed {AFTER_INIT}")
            return
    # put back the mode install changed, unless someone changed it since
    for old in record.of_kind("mode"):
        mode_text, _, where = old.partition(" ")
        if where != AFTER_INIT:
            continue
        mode = int(mode_text, 8)
        if stat.S_IMODE(os.stat(path).st_mode) == (mode | 0o100) & ~0o022:
            os.chmod(path, mode)
            say(f"put back the mode of {AFTER_INIT} ({mode_text})")
        record.lines.discard(f"mode {old}")


def uninstall_package(lay: Layout, record: Record) -> None:
    """Remove only the files we recorded, exactly as we wrote them (and, of an install.sh
    that recorded nothing, its marker and the package's modules), never a directory with
    someone else's file in it."""
    if lay.packaged:  # dpkg's: never ours to remove
        return
    lib = lay.at(lay.lib)
    if os.path.islink(lib):
        say(f"left {lay.lib} alone: it is a symlink")
        return
    if not os.path.isdir(lib):
        return
    for dirpath, dirnames, _files in os.walk(lib):
        for name in dirnames:
            if name == "__pycache__" and not os.path.islink(os.path.join(dirpath, name)):
                shutil.rmtree(os.path.join(dirpath, name))
    legacy = legacy_lib(lay, record)
    for path in lib_entries(lay):
        if lib_is_ours(lay, record, path, legacy):
            os.unlink(lay.at(path))
    record.forget_under(lay.lib)
    for dirpath, _dirs, _files in sorted(os.walk(lib, topdown=False), reverse=True):
        if not os.path.islink(dirpath):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
    if os.path.lexists(lib):
        left = " ".join(lib_entries(lay)[:3])
        say(f"left {lay.lib}: it holds files kvmufw_hook did not write or that changed since: "
            f"{left}")
    else:
        say(f"removed {lay.lib}")


def end_watchers(lay: Layout) -> None:
    """Stop the jump watchers libvirt's unit started (restore --jumps-only --watch, at
    most 40 s old), so that none puts a jump or the state directory back."""
    if lay.root:
        return
    wanted = f" {lay.bin} restore --jumps-only --watch "
    for pid in filter(str.isdigit, os.listdir("/proc")):
        args = " " + (read_text(f"/proc/{pid}/cmdline") or "").replace("\0", " ")
        if wanted in args and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 15)
            except OSError:
                pass


def uninstall(lay: Layout, outside: Outside) -> int:
    """The hooks, UFW's entry and the units go first, so that no new hook starts; then our
    rules, under the state lock (a hook already waiting for it applies nothing after);
    then the rest of the files."""
    record = Record.load(lay.root)
    end_watchers(lay)
    tx = Transaction(lay, record.copy())
    try:
        if not lay.packaged:
            for driver in HOOK_DRIVERS:
                for path in (f"{HOOKS}/{driver}.d/kvmufw_hook", f"{HOOKS}/{driver}"):
                    if claimed_hook(lay, tx.record, path):
                        remove_ours(tx, path, hook_sha(lay, driver))
            uninstall_after_init(tx)
            for unit in SYSTEMD_UNITS:
                remove_ours(tx, dropin_path(unit), sha256(dropin(lay)),
                            sha256(legacy_dropin()))
                try:
                    os.rmdir(lay.at(os.path.dirname(dropin_path(unit))))
                except OSError:
                    pass
            daemon_reload(lay)
        try:
            outside.flush(lay)
        except (ApplyError, OSError) as exc:
            say(f"could not flush the rules ({exc}); run: kvmufw_hook flush")
        if not lay.packaged:
            remove_ours(tx, lay.bin, sha256(bin_script(lay)))
            uninstall_package(lay, tx.record)
            for directory in reversed(record.of_kind("dir")):  # deepest first, if empty
                if not os.path.islink(lay.at(directory)):
                    try:
                        os.rmdir(lay.at(directory))
                    except OSError:
                        pass
        else:
            tx.record.lines.discard("packaged")
            tx.record.set_hooks({})
    finally:
        tx.undo.clear()  # uninstall keeps what it did
        tx.close()
    if not lay.packaged:  # dpkg's hooks stay until it removes them: the marker stays too
        shutil.rmtree(lay.at(STATE_DIR), ignore_errors=True)
    forget_record(lay, tx.record)
    # no SIGHUP: a daemon that still believes hooks exist finds none and runs nothing
    say("uninstalled")
    return 0


def forget_record(lay: Layout, record: Record) -> None:
    """The record goes with the last thing it records: what is left (an after.init block
    the admin must remove by hand, say) keeps it."""
    leftover = {line for line in record.lines if not line.startswith("dir ")}
    if lay.packaged and leftover:
        tx = Transaction(lay, record)
        try:
            write_record(tx)
        finally:
            tx.close()
        return
    for path in (MANIFEST, SIGHUP_STAMP):
        if os.path.isfile(lay.at(path)) and not os.path.islink(lay.at(path)):
            os.unlink(lay.at(path))
    try:
        os.rmdir(lay.at(MANIFEST_DIR))
    except OSError:
        if os.path.lexists(lay.at(MANIFEST_DIR)):
            say(f"left {MANIFEST_DIR}: it holds files kvmufw_hook did not write")


# --------------------------------------------------------------------------- command

def _plain_path(path: str) -> bool:
    """An absolute path that needs no quoting in sh (after.init) nor in a systemd unit
    (no space, quote, backslash, ``$`` or ``%``), and no ``..`` component."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-/")
    return (path.startswith("/") and set(path) <= allowed
            and ".." not in path.split("/"))


def run(action: str, root: str = "", source: str = "", prefix: str = "/usr/local",
        packaged: bool = False, outside: Outside | None = None) -> int:
    """``action``: install, uninstall, ufw-entry-add, ufw-entry-remove. A refusal is one
    line on stderr and exit status 1."""
    if action == "install" and not (source or packaged):
        print("kvmufw_hook install: error: say what to install: --source DIR (install.sh "
              "does), or --packaged (the Debian package's postinst does)", file=sys.stderr)
        return 2
    if not _plain_path(prefix):
        print(f"kvmufw_hook install: error: --prefix {prefix!r}: an absolute path of letters, "
              "digits and . _ + - / only (it is written into shell scripts and a systemd "
              "unit)", file=sys.stderr)
        return 1
    packaged = not source and (packaged or Record.load(root).packaged)
    lay = host_layout(root, os.path.abspath(source) if source else "", prefix, packaged)
    outside = outside or (Offline() if root else Outside())
    os.umask(0o022)
    try:
        if source and (Record.load(root).packaged or is_packaged(root)):
            raise Refused("kvmufw_hook is installed as the Debian package kvmufw-hook: "
                          "install.sh leaves it alone (apt remove kvmufw-hook, then run "
                          "install.sh again if you want the source tree's)")
        if action == "install":
            return install_packaged(lay, outside) if packaged else install(lay, outside)
        if action == "uninstall":
            return uninstall(lay, outside)
        return ufw_entry(lay, action.rsplit("-", 1)[1])
    except Refused as exc:
        print(f"kvmufw_hook install: error: {exc}", file=sys.stderr)
        return 1


def register(parser: argparse.ArgumentParser, name: str) -> None:
    """``install``, ``uninstall`` (the same options) and ``ufw-entry add|remove``."""
    if name == "ufw-entry":
        describe(parser, "Add (or remove) the entry in UFW's after.init that puts our rules "
                 "back after every ufw reload.", "example:\n  kvmufw_hook ufw-entry add")
        parser.add_argument("action", choices=("add", "remove"))
    else:
        what = ("Install the hooks (and, from the source tree, the package), tell libvirt, "
                "re-apply every rule" if name == "install"
                else "Remove every rule and everything install wrote")
        describe(parser, f"{what}. Never overwrites, deletes or follows a file it did not "
                 "write.", f"example:\n  sudo ./install.sh{' --uninstall' * (name != 'install')}"
                 f"   (from the source tree)\n  kvmufw_hook {name} --packaged"
                 "   (the Debian package's maintainer scripts)")
        parser.add_argument("--source", default="", metavar="DIR",
                            help="the source tree to install from (install.sh passes it)")
        parser.add_argument("--prefix", default="/usr/local", metavar="DIR",
                            help="with --source: where the package and command go "
                            "(default: %(default)s)")
        parser.add_argument("--packaged", action="store_true",
                            help="the Debian package's files, which dpkg owns")
    parser.add_argument("--root", default="", metavar="DIR",
                        help="the host's file system under DIR (a mounted image, a test's "
                        "temporary directory): no daemon is told, no rule is applied")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    action = f"ufw-entry-{args.action}" if args.command == "ufw-entry" else args.command
    return run(action, root=args.root, source=getattr(args, "source", ""),
               prefix=getattr(args, "prefix", "/usr/local"),
               packaged=getattr(args, "packaged", False))
