"""What the installer and ``doctor`` both know about an installation: where the hooks go,
which libvirt daemons run them (pid files, URIs, drivers), and the record of what was
installed (``/var/lib/kvmufw_hook/install.manifest``).

Every path is absolute on the host and read under a ``root`` prefix ("" on the host, a
temporary directory in the unit tests), so nothing here needs root to be tested.

The record has one fact per line, sorted, so that an unchanged install rewrites nothing:

    file SHA256 PATH      a file we wrote, exactly as we wrote it (ours only while it matches)
    dir PATH              a directory we created (removed on uninstall if left empty)
    hook DRIVER PATH      the hook libvirt runs for DRIVER (network, qemu): doctor checks it
    created PATH          a file we created whole (after.init where UFW had none)
    block SHA256 PATH     our block in a file of someone else's (after.init)
    mode OCTAL PATH       the mode a file had before we changed it
    packaged              the hooks and the command are the Debian package's (dpkg owns them)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

MANIFEST_DIR = "/var/lib/kvmufw_hook"
MANIFEST = MANIFEST_DIR + "/install.manifest"
SIGHUP_STAMP = MANIFEST_DIR + "/sighup"  # the running daemons run our hooks since its mtime
STATE_DIR = "/run/kvmufw_hook"
# the kinds of hook that existed before dpkg unpacked ours (the package's preinst writes it)
HOOKS_FOUND = STATE_DIR + "/hooks-found"
HOOKS = "/etc/libvirt/hooks"
HOOK_DRIVERS = ("network", "qemu")
AFTER_INIT = "/etc/ufw/after.init"
SYSTEMD_DIR = "/etc/systemd/system"
SYSTEMD_RUNNING = "/run/systemd/system"
# the Debian package's command and the marker that dpkg installed it
PACKAGED_BIN = "/usr/sbin/kvmufw_hook"
DPKG_LIST = "/var/lib/dpkg/info/kvmufw-hook.list"


@dataclass(frozen=True)
class Daemon:
    name: str
    uri: str
    drivers: tuple[str, ...]

    @property
    def pidfile(self) -> str:
        return f"/run/{self.name}.pid"

    @property
    def unit(self) -> str:
        return f"{self.name}.service"


DAEMONS = (Daemon("libvirtd", "qemu:///system", ("network", "qemu")),
           Daemon("virtnetworkd", "network:///system", ("network",)),
           Daemon("virtqemud", "qemu:///system", ("qemu",)))


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def file_sha256(path: str) -> str | None:
    """The sha256 of a regular file that is not a symlink; None for anything else."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return hashlib.sha256(fh.read()).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Record:
    """The manifest's lines, as a set; written sorted."""

    def __init__(self, lines: list[str] | None = None):
        self.lines: set[str] = {line for line in (lines or []) if line.strip()}

    @classmethod
    def load(cls, root: str = "") -> Record:
        return cls((read_text(root + MANIFEST) or "").splitlines())

    def text(self) -> str:
        return "".join(f"{line}\n" for line in sorted(self.lines))

    def copy(self) -> Record:
        return Record(list(self.lines))

    def files(self) -> dict[str, str]:
        """path -> the sha256 we recorded for it."""
        out = {}
        for line in self.lines:
            fields = line.split(" ", 2)
            if len(fields) == 3 and fields[0] == "file":
                out[fields[2]] = fields[1]
        return out

    def hooks(self) -> dict[str, str]:
        out = {}
        for line in self.lines:
            fields = line.split(" ", 2)
            if len(fields) == 3 and fields[0] == "hook" and fields[1] in HOOK_DRIVERS:
                out[fields[1]] = fields[2]
        return out

    def of_kind(self, kind: str) -> list[str]:
        """The rest of each line of ``kind`` (``dir``, ``created``…), sorted."""
        return sorted(line[len(kind) + 1:] for line in self.lines
                      if line.startswith(kind + " "))

    @property
    def packaged(self) -> bool:
        return "packaged" in self.lines

    def set_file(self, path: str, digest: str) -> None:
        self.forget_file(path)
        self.lines.add(f"file {digest} {path}")

    def forget_file(self, path: str) -> None:
        self.lines = {line for line in self.lines
                      if not (line.startswith("file ") and line.split(" ", 2)[2:] == [path])}

    def forget_under(self, directory: str) -> None:
        prefix = directory.rstrip("/") + "/"
        self.lines = {line for line in self.lines
                      if not (line.startswith("file ") and line.split(" ", 2)[2]
                              .startswith(prefix))}

    def set_hooks(self, paths: dict[str, str]) -> None:
        self.lines = {line for line in self.lines if not line.startswith("hook ")}
        self.lines |= {f"hook {drv} {path}" for drv, path in paths.items()}


def installed_hooks(root: str = "") -> tuple[dict[str, str], dict[str, str]]:
    """(driver -> hook path, path -> sha256) as the installer recorded them."""
    record = Record.load(root)
    return record.hooks(), record.files()


def packaged(root: str = "") -> bool:
    """The Debian package is installed (dpkg lists its files)."""
    return os.path.exists(root + DPKG_LIST)


def install_command(root: str = "") -> str:
    """What an admin runs to install, or to repair an installation, on this host."""
    return "apt install --reinstall kvmufw-hook" if packaged(root) else "sudo ./install.sh"


def hooks_found(driver: str, root: str = "") -> bool:
    """libvirt runs hooks of ``driver`` only if, when it started (or at its last SIGHUP),
    hooks/DRIVER was executable or DRIVER.d held an executable entry (symlinks followed)."""
    plain = root + f"{HOOKS}/{driver}"
    if os.path.isfile(plain) and os.access(plain, os.X_OK):
        return True
    directory = root + f"{HOOKS}/{driver}.d"
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(os.path.isfile(p) and os.access(p, os.X_OK)
               for p in (os.path.join(directory, n) for n in names))


def daemon_pid(daemon: Daemon, root: str = "") -> int | None:
    """The pid of a running ``daemon`` whose pid file names a live process of that name
    (a stale pid file may name someone else's process)."""
    pid = (read_text(root + daemon.pidfile) or "").strip()
    if not pid.isdigit():
        return None
    if (read_text(f"/proc/{pid}/comm") or "").strip() != daemon.name:
        return None
    return int(pid)


def running_daemons(root: str = "") -> list[tuple[Daemon, int]]:
    return [(d, pid) for d in DAEMONS if (pid := daemon_pid(d, root)) is not None]


def start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc."""
    stat = read_text(f"/proc/{pid}/stat")
    boot = read_text("/proc/stat")
    if not stat or not boot:
        return None
    ticks = int(stat.rsplit(")", 1)[1].split()[19])
    btime = next((int(l.split()[1]) for l in boot.splitlines() if l.startswith("btime")), 0)
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def hooks_appeared(paths: list[str], root: str = "") -> float:
    """When the newest of our hooks appeared: the link itself for a symlink (the Debian
    package's are made at unpack; their targets keep the build's time)."""
    return max((os.lstat(root + p).st_mtime for p in paths if os.path.lexists(root + p)),
               default=0.0)


def missed_hooks(pid: int, appeared: float, root: str = "") -> bool:
    """Daemon ``pid`` started before our hooks appeared and has had no SIGHUP since: it
    does not run them (libvirt looks for hooks at start and on SIGHUP only)."""
    stamp = root + SIGHUP_STAMP
    seen = os.stat(stamp).st_mtime if os.path.exists(stamp) else 0.0
    return appeared > max(start_time(pid) or 0.0, seen)


def after_init_command(text: str) -> str | None:
    """The command our block in UFW's after.init runs (``[ -x COMMAND ]``), if any."""
    import re
    lines = text.splitlines()
    if "# BEGIN kvmufw_hook" not in lines or "# END kvmufw_hook" not in lines:
        return None
    block = lines[lines.index("# BEGIN kvmufw_hook"):lines.index("# END kvmufw_hook")]
    found = re.search(r"\[ -x (/\S+) \]", "\n".join(block))
    return found[1] if found else None
