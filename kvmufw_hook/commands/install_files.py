"""What the installer writes and how it knows its own: the layout of an installation
(from the source tree, or the Debian package's), the text of every file it writes, the
ownership rules (a file is ours only if exactly as recorded or as we would write it), the
checks that come before any write, and the transaction that writes atomically and rolls
back. Every path is read and written under ``Layout.root``; nothing here talks to a
daemon, to systemd or to libvirt (``install.py`` does)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..installation import (
    AFTER_INIT,
    HOOK_DRIVERS,
    HOOKS,
    MANIFEST,
    MANIFEST_DIR,
    PACKAGED_BIN,
    SYSTEMD_DIR,
    SYSTEMD_RUNNING,
    Record,
    file_sha256,
    read_text,
    sha256,
)

MARK = "# kvmufw_hook: written by kvmufw_hook install.sh; removed by install.sh --uninstall"
PACKAGED_MARK = "# kvmufw_hook: installed by the Debian package kvmufw-hook"
PACKAGED_LIB = "/usr/lib/python3/dist-packages"
PACKAGED_HOOKS = "/usr/lib/kvmufw-hook/hooks"  # the drop-ins link here
PACKAGED_SYSTEMD = "/usr/lib/systemd/system"
BEGIN = "# BEGIN kvmufw_hook"
END = "# END kvmufw_hook"
SYSTEMD_UNITS = ("libvirtd", "virtnetworkd", "virtqemud")
# sha256 of hooks that install.sh wrote with the default prefix before it recorded
# anything (hooks/ at commits 187a492 and e3f1716, as installed): such a file is ours.
LEGACY_SHA256 = frozenset((
    "0d40d8036599ff703d6a716c32cdc74dc7d8b61402d45903464c241ba9d91358",
    "04be06b71eb04fde2fe4c10fd0223b735e59329c0e264fc7fb251b509ccc8ae8",
    "e124ef0c21768aa38bdb3369743a2051e8b330d8d96a6fa6bcb5390082bdd05c",
    "b4a62460b88425e4861d352616ef69cb1a7c7a9a1d8ba7aa9628a9e853c96bbb",
))
QUIET = "</dev/null >/dev/null 2>&1"
LIB_MARKER = ".kvmufw_hook"  # the package directory's marker (the only record, long ago)


class Refused(Exception):
    """A check failed before anything was written: one line for the admin."""


def say(message: str) -> None:
    print(f"kvmufw_hook install: {message}", flush=True)


# --------------------------------------------------------------------------- the layout

@dataclass(frozen=True)
class Layout:
    """Where things go on this host, and what the host is."""
    root: str = ""
    prefix: str = "/usr/local"
    source: str = ""         # the source tree (install.sh's)
    packaged: bool = False    # the Debian package's files (dpkg owns them)
    python: str = "/usr/bin/python3"
    libvirt: tuple[int, int] | None = None  # libvirt's version; None: unknown (a new one)
    systemd: bool = False     # systemd runs (it reads our drop-ins)
    timeout: str = "/usr/bin/timeout"
    logger: str = "/usr/bin/logger"

    @property
    def lib(self) -> str:
        """The directory that holds the package (the hooks put it on sys.path)."""
        return PACKAGED_LIB if self.packaged else f"{self.prefix}/lib/kvmufw_hook"

    @property
    def mark(self) -> str:
        return PACKAGED_MARK if self.packaged else MARK

    @property
    def bin(self) -> str:
        return PACKAGED_BIN if self.packaged else f"{self.prefix}/sbin/kvmufw_hook"

    @property
    def script_bin(self) -> str:
        """The command an install.sh install wrote (retired by the package)."""
        return f"{self.prefix}/sbin/kvmufw_hook"

    def at(self, path: str) -> str:
        return self.root + path

    def hook_paths(self) -> dict[str, str]:
        """driver -> the hook this libvirt runs (drop-ins from 6.5)."""
        if self.libvirt is None or self.libvirt >= (6, 5):
            return {drv: f"{HOOKS}/{drv}.d/kvmufw_hook" for drv in HOOK_DRIVERS}
        return {drv: f"{HOOKS}/{drv}" for drv in HOOK_DRIVERS}


def libvirt_version() -> tuple[int, int] | None:
    """``libvirtd --version`` (or virtqemud's, virtnetworkd's), as found on PATH."""
    import re
    for daemon in ("libvirtd", "virtqemud", "virtnetworkd"):
        path = shutil.which(daemon)
        if not path:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        found = re.search(r"(\d+)\.(\d+)", out)
        return (int(found[1]), int(found[2])) if found else None
    return None


def host_layout(root: str = "", source: str = "", prefix: str = "/usr/local",
                packaged: bool = False) -> Layout:
    def tool(name: str) -> str:
        path = f"/usr/bin/{name}"
        return path if os.access(root + path, os.X_OK) else (shutil.which(name) or name)
    return Layout(root=root, prefix=prefix, source=source, packaged=packaged,
                  libvirt=libvirt_version(),
                  systemd=os.path.isdir(root + SYSTEMD_RUNNING), timeout=tool("timeout"),
                  logger=tool("logger"))


# --------------------------------------------------------------------------- what we write

def bin_script(lay: Layout) -> bytes:
    return (f"#!{lay.python} -I\n{MARK}\nimport sys\n\nsys.path.insert(0, \"{lay.lib}\")\n"
            "from kvmufw_hook.cli import main  # noqa: E402\n\nsys.exit(main())\n").encode()


def hook_sha(lay: Layout, driver: str) -> str:
    """The sha256 of the hook we would write now ("" without a source tree)."""
    return sha256(hook_script(lay, driver)) if lay.source else ""


def hook_script(lay: Layout, driver: str) -> bytes:
    """hooks/DRIVER of the source tree, marked, with the package's directory filled in."""
    return hook_text(lay.source, driver, lay.lib, lay.mark).encode()


def hook_text(source: str, driver: str, lib: str, mark: str = "") -> str:
    """hooks/DRIVER of ``source`` as installed: LIB, the package's directory, a constant
    (qemu's hook is a shell script, ``LIB=``; network's is Python, ``LIB = ``), and
    ``mark`` on the line after the shebang."""
    with open(os.path.join(source, "hooks", driver), encoding="utf-8") as fh:
        lines = fh.read().splitlines(keepends=True)
    out = [*lines[:1], *([mark + "\n"] if mark else [])]
    for line in lines[1:]:
        if line.startswith("LIB = "):
            # a JSON string is a Python literal: "/usr/lib/..." as ever, a quote escaped
            line = f"LIB = {json.dumps(lib, ensure_ascii=False)}\n"
        elif line.startswith("LIB="):
            line = f"LIB={shlex.quote(lib)}\n"
        out.append(line)
    return "".join(out)


def after_init_block(lay: Layout) -> str:
    """Runs inside ufw.service at boot: it must never wait for libvirt (libvirt starts
    after UFW), hence ``restore`` (our state and the kernel only) under a timeout. A
    refusal stays visible: restore writes it to stderr and syslog, and a failure or
    timeout adds a line."""
    return f"""{BEGIN}
# Puts kvmufw_hook's rules back whenever UFW starts or reloads (see install.sh), from its
# own state and the kernel only: UFW's start never waits for libvirt.
if [ "${{1:-}}" = start ] && [ -x {lay.bin} ]; then
    {lay.timeout} -k 2 20 {lay.bin} restore >/dev/null || {{
        kvmufw_msg="'kvmufw_hook restore' from $0 exited with status $? (124: timed out after 20 s)"
        echo "kvmufw_hook: $kvmufw_msg" >&2
        {lay.logger} -t kvmufw_hook -p daemon.warning "$kvmufw_msg" 2>/dev/null
        true
    }}
fi
{END}
"""


def legacy_after_init_block(binary: str) -> str:
    """The block install.sh wrote up to commit 16cd8a7 (it ran replay)."""
    return f"""{BEGIN}
# Re-applies kvmufw_hook's rules whenever UFW starts or reloads (see install.sh).
if [ "${{1:-}}" = start ] && [ -x {binary} ]; then
    {binary} replay >/dev/null 2>&1 || true
fi
{END}
"""


def known_blocks(lay: Layout) -> set[str]:
    """The sha256 of every block we wrote, now or earlier, for either layout."""
    blocks = {after_init_block(replace(lay, packaged=p)) for p in (False, True)}
    blocks.add(legacy_after_init_block(lay.script_bin))
    return {sha256(b.encode()) for b in blocks}


def dropin(lay: Layout) -> bytes:
    return f"""{lay.mark}
# Start libvirt after UFW, and put kvmufw_hook's jumps back in first place after each
# start: the daemon re-inserts its own jumps at position 1 when it starts, and again when
# it reloads its networks' rules a few seconds after it is ready (Debian's libvirtd exits
# when idle and is started again by its socket). So the repair keeps watching for 30 s,
# in the background: it never holds up the unit, and never fails it.
[Unit]
After=ufw.service

[Service]
ExecStartPost=-/bin/sh -c '{lay.timeout} 40 {lay.bin} restore --jumps-only --watch 30 {QUIET} &'
""".encode()


def legacy_dropin() -> bytes:
    return (f"{MARK}\n# Start libvirt after UFW, so that UFW's rules are in place before "
            "networks start.\n[Unit]\nAfter=ufw.service\n").encode()


def dropin_path(unit: str) -> str:
    return f"{SYSTEMD_DIR}/{unit}.service.d/kvmufw_hook.conf"


def packaged_files(source: str) -> dict[str, tuple[bytes, int]]:
    """The files of the Debian package that are not the Python package (debian/rules
    writes them): the hooks, which /etc/libvirt/hooks/*.d/kvmufw_hook link to, and the
    systemd drop-ins; path -> (content, mode). The same text as an install.sh install."""
    lay = Layout(source=source, packaged=True)
    files = {f"{PACKAGED_HOOKS}/{drv}": (hook_script(lay, drv), 0o755) for drv in HOOK_DRIVERS}
    for unit in SYSTEMD_UNITS:
        files[f"{PACKAGED_SYSTEMD}/{unit}.service.d/kvmufw-hook.conf"] = (dropin(lay), 0o644)
    return files


def write_packaged_files(source: str, destdir: str) -> None:
    for path, (data, mode) in packaged_files(source).items():
        os.makedirs(os.path.dirname(destdir + path), 0o755, exist_ok=True)
        with open(destdir + path, "wb") as fh:
            fh.write(data)
        os.chmod(destdir + path, mode)


def package_files(lay: Layout) -> dict[str, bytes]:
    """Every module of the package (subpackages included), by path relative to LIB, and
    the marker."""
    files = {LIB_MARKER: (MARK + "\n").encode()}
    top = os.path.join(lay.source, "kvmufw_hook")
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as fh:
                    files[os.path.relpath(path, lay.source)] = fh.read()
    return files


# --------------------------------------------------------------------------- ownership

def is_ours(lay: Layout, record: Record, path: str, *accepted: str) -> bool:
    """``path`` is a regular file (not a symlink) whose content is what we recorded, what
    we would write now (``accepted``), or what an earlier install.sh wrote unrecorded."""
    digest = file_sha256(lay.at(path))
    if digest is None:
        return False
    return digest == record.files().get(path) or digest in accepted or digest in LEGACY_SHA256


def legacy_lib(lay: Layout, record: Record) -> bool:
    """The package directory of an install.sh that recorded none of its files: a marker."""
    marker = lay.at(f"{lay.lib}/{LIB_MARKER}")
    return (not os.path.islink(marker) and read_text(marker) == MARK + "\n"
            and not any(p.startswith(lay.lib + "/") for p in record.files()))


def lib_entries(lay: Layout) -> list[str]:
    """Every file and symlink under LIB (paths on the host), bytecode caches aside."""
    out = []
    for dirpath, dirnames, filenames in os.walk(lay.at(lay.lib)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out += [os.path.join(dirpath, n) for n in filenames]
        out += [os.path.join(dirpath, d) for d in dirnames
                if os.path.islink(os.path.join(dirpath, d))]
    return sorted(p[len(lay.root):] for p in out)


def lib_is_ours(lay: Layout, record: Record, path: str, legacy: bool) -> bool:
    """A file under LIB is ours if recorded as it is now; in a legacy (unrecorded)
    directory (``legacy_lib``), only the marker and the package's modules are, never an
    admin's file."""
    if legacy:
        rel = os.path.relpath(path, lay.lib)
        return not os.path.islink(lay.at(path)) and (
            rel == LIB_MARKER or (rel.startswith("kvmufw_hook/") and rel.endswith(".py")))
    return is_ours(lay, record, path)


# --------------------------------------------------------------------------- checks

def no_symlink(lay: Layout, path: str) -> None:
    if os.path.islink(lay.at(path)):
        raise Refused(f"{path} is a symlink (to {os.readlink(lay.at(path))}); kvmufw_hook "
                      "never writes through one: replace it by a real file or directory, "
                      "or remove it, and install again")


def safe_dir(lay: Layout, directory: str) -> None:
    """An existing directory we write into is root's and not writable by others."""
    if not os.path.lexists(lay.at(directory)):
        return
    no_symlink(lay, directory)
    st = os.stat(lay.at(directory))
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"{directory} is not a directory; move it away and install again")
    if st.st_uid != os.geteuid() or st.st_mode & 0o002:
        raise Refused(f"{directory} is owned by uid {st.st_uid} with mode "
                      f"{stat.S_IMODE(st.st_mode):o}: anyone who can write there could "
                      "change what root runs; make it root's and not writable by others "
                      f"(chown root: {directory}; chmod o-w {directory}), then install again")


def free_path(lay: Layout, record: Record, path: str, *accepted: str) -> None:
    """``path`` may be written: it is absent or ours."""
    no_symlink(lay, path)
    safe_dir(lay, os.path.dirname(path))
    if os.path.lexists(lay.at(path)) and not is_ours(lay, record, path, *accepted):
        raise Refused(f"{path} exists and is not as kvmufw_hook wrote it; not overwriting "
                      "it (move it away or merge by hand, then install again)")


def block_span(text: str) -> tuple[int, int] | None:
    """(first, last) line index of our block; None if there is none; ValueError if it
    is not whole (a BEGIN without an END, the reverse, or more than one)."""
    lines = text.splitlines()
    begins = [i for i, line in enumerate(lines) if line == BEGIN]
    ends = [i for i, line in enumerate(lines) if line == END]
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise ValueError("not whole")
    return begins[0], ends[0]


def block_sha(text: str, span: tuple[int, int]) -> str:
    return sha256("".join(f"{line}\n" for line in text.splitlines()[span[0]:span[1] + 1])
                  .encode())


def known_block(lay: Layout, record: Record, digest: str) -> bool:
    return digest in known_blocks(lay) or f"block {digest} {AFTER_INIT}" in record.lines


def check_after_init(lay: Layout, record: Record) -> None:
    if not os.path.isdir(lay.at("/etc/ufw")):
        return
    safe_dir(lay, "/etc/ufw")
    path = lay.at(AFTER_INIT)
    if os.path.islink(path):
        raise Refused(f"{AFTER_INIT} is a symlink (to {os.readlink(path)}); kvmufw_hook does "
                      "not edit through symlinks: replace it by a copy of its target (cp "
                      f"--remove-destination \"$(readlink -f {AFTER_INIT})\" {AFTER_INIT}) "
                      "and install again")
    if not os.path.lexists(path):
        return
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{AFTER_INIT} is not a regular file; move it away and install again")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise Refused(f"{AFTER_INIT} is owned by uid {st.st_uid} with mode "
                      f"{stat.S_IMODE(st.st_mode):o}; UFW runs it as root, so only root may "
                      f"write it: chown root: {AFTER_INIT}; chmod go-w {AFTER_INIT}, then "
                      "install again")
    text = read_text(path) or ""
    try:
        span = block_span(text)
    except ValueError:
        raise Refused(f"{AFTER_INIT} has a '{BEGIN}' or '{END}' line without the other (or "
                      "several): remove what is left of the kvmufw_hook block by hand and "
                      "install again") from None
    if span and not known_block(lay, record, block_sha(text, span)):
        raise Refused(f"the kvmufw_hook block in {AFTER_INIT} (lines {span[0] + 1}-"
                      f"{span[1] + 1}) was changed since kvmufw_hook wrote it; not "
                      "overwriting it: remove those lines and install again")


# --------------------------------------------------------------------------- writing, undo

@dataclass
class Transaction:
    """This run's writes, each with its undo; ``rollback`` runs them in reverse."""
    lay: Layout
    record: Record
    changed: bool = False
    undo: list[Callable[[], None]] = field(default_factory=list)
    on_commit: list[Callable[[], None]] = field(default_factory=list)
    backup: str = ""

    def __post_init__(self) -> None:
        base = self.lay.at("/run")
        os.makedirs(base, exist_ok=True)
        self.backup = tempfile.mkdtemp(prefix="kvmufw_hook-install.", dir=base)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        """Committed when the block ends normally, rolled back when it raises; the
        backup goes either way."""
        try:
            if exc is None:
                self.commit()
            else:
                self.rollback()
        finally:
            self.close()

    def close(self) -> None:
        shutil.rmtree(self.backup, ignore_errors=True)

    def commit(self) -> None:
        """Everything is written: drop what rollback would have needed."""
        self.undo.clear()
        for step in self.on_commit:
            step()

    def rollback(self) -> None:
        for step in reversed(self.undo):
            try:
                step()
            except OSError:
                pass
        self.undo.clear()

    def keep(self, path: str) -> str:
        """A copy of ``path`` (on the host) in the backup; its name there."""
        copy = os.path.join(self.backup, path.strip("/").replace("/", "_"))
        shutil.copy2(self.lay.at(path), copy, follow_symlinks=False)
        return copy

    def make_dirs(self, directory: str) -> None:
        if os.path.isdir(self.lay.at(directory)):
            return
        self.make_dirs(os.path.dirname(directory))
        os.mkdir(self.lay.at(directory), 0o755)
        os.chmod(self.lay.at(directory), 0o755)
        self.undo.append(lambda: os.rmdir(self.lay.at(directory)))
        self.record.lines.add(f"dir {directory}")

    def replace(self, path: str, data: bytes, mode: int, owner: tuple[int, int] | None = None,
                prefix: str = ".kvmufw_hook.") -> None:
        """``data`` becomes ``path`` atomically (a new name renamed over the old)."""
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=os.path.dirname(self.lay.at(path)))
        self.undo.append(lambda: _unlink(tmp))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if owner is None and os.geteuid() == 0:
            owner = (0, 0)
        if owner is not None:
            os.chown(tmp, *owner)
        os.chmod(tmp, mode)
        if os.path.lexists(self.lay.at(path)):
            copy = self.keep(path)
            self.undo.append(lambda: os.replace(copy, self.lay.at(path)))
        else:
            self.undo.append(lambda: os.unlink(self.lay.at(path)))
        os.replace(tmp, self.lay.at(path))

    def put_file(self, path: str, data: bytes, mode: int) -> None:
        """``data`` becomes ``path`` (checked free before), recorded as ours."""
        self.make_dirs(os.path.dirname(path))
        full = self.lay.at(path)
        same = (file_sha256(full) == sha256(data)
                and stat.S_IMODE(os.lstat(full).st_mode) == mode)
        if not same:
            self.replace(path, data, mode)
            say(f"wrote {path}")
            self.changed = True
        self.record.set_file(path, sha256(data))

    def remove(self, path: str) -> None:
        copy = self.keep(path)
        self.undo.append(lambda: os.replace(copy, self.lay.at(path)))
        os.unlink(self.lay.at(path))


def _unlink(path: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)


def write_record(tx: Transaction) -> None:
    lay = tx.lay
    directory = lay.at(MANIFEST_DIR)
    if os.path.isdir(directory):
        os.chmod(directory, 0o700)
    else:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        os.mkdir(directory, 0o700)
        tx.undo.append(lambda: shutil.rmtree(directory, ignore_errors=True))
    text = tx.record.text()
    if read_text(lay.at(MANIFEST)) == text:
        return
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    if os.path.lexists(lay.at(MANIFEST)):
        copy = tx.keep(MANIFEST)
        tx.undo.append(lambda: os.replace(copy, lay.at(MANIFEST)))
    os.replace(tmp, lay.at(MANIFEST))
