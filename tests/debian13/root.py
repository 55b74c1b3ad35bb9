"""A Debian 13 (trixie) root for running the suite with libvirt 11, iptables 1.8.11 and
Python 3.13 on a Debian 12 machine (../../shared/docs/lab-recipe.md, "Another Debian release
in a lab").

API (run as root on the host, with the host's Python):

    from debian13.root import ensure_root, run_in_root   # tests/ on sys.path
    root = ensure_root()          # Path; first build about 2 minutes, then at once
    run_in_root(["python3", "-m", "pytest", "-q", "tests/lab/test_lab.py"],
                capture_output=True, text=True)

``ensure_root()`` debootstraps trixie (``--variant=minbase``) into
/var/tmp/kvmufw-test-cache/debian13-root from this machine's Debian mirror, then installs
tests/packages.txt (+ nftables) inside it: downloads from a mount-only namespace with the
host's network, installation without a network. It also fetches libvirt 11's source for the
corpus test into the root's own /var/tmp (the test's own code, run inside). A stamp keyed on
the package list makes later calls return at once; a changed list installs what is new. A
lock file serialises concurrent callers. Every call also puts this machine's hostname in the
root's /etc/hosts (libvirt looks it up; see _hostname_in_hosts).

``run_in_root(argv, network=False, cwd="/src", env=None, **kw)`` runs argv inside the root:
``unshare --mount --net --pid --fork`` (no ``--net`` with network=True), the tree bind-mounted
onto itself, proc, sysfs, /dev (rbind), tmpfs on /run and /tmp, this checkout bound read-only
at /src, then ``pivot_root`` and the host's tree unmounted. Nothing of the host's mounts stays
visible, so ``nsenter -m`` (tests/support/lab.py) lands in the root, not on the host. The namespaces
die with the command: every process left in them is killed. Keyword arguments go to
``subprocess.run``; KVMUFW_* variables of the caller are passed in, and
KVMUFW_DEBIAN13_ROOT=1 tells code inside that it runs there.

Command line: ``python3 tests/debian13/root.py build | shell | run [--network] CMD... |
pytest [ARGS...]`` (pytest runs the suite inside, as tests/run does natively).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KVMUFW_TEST_CACHE", "/var/tmp/kvmufw-test-cache"))
ROOT = CACHE / "debian13-root"
STAMP = ROOT / ".kvmufw-stamp"
BOOTSTRAPPED = ROOT / ".kvmufw-debootstrapped"
SUITE = "trixie"
EXTRA_PACKAGES = ("nftables",)        # the nftables lab needs nft
HOST_ONLY = ("debootstrap",)          # builds this root; not needed inside it
BUILD_VERSION = "1"                   # bump to redo the package steps in every root
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs as PID 1 of the new PID namespace: bash reaps orphans (libvirtd -d daemonises; a zombie
# would keep /proc/PID and the lab waits for that to vanish), so it must not exec the command
# (bash execs a -c script's last command). When it exits, the kernel kills whatever is left.
ENTER = r"""
set -eu
R=$1 SRC=$2 NETWORK=$3; shift 3
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
mkdir -p "$R/src" "$R/.oldroot"
mount --bind "$SRC" "$R/src"
mount -o remount,bind,ro "$R/src"
if [ "$NETWORK" = 1 ]; then
  touch "$R/etc/resolv.conf"
  mount --bind -o ro /etc/resolv.conf "$R/etc/resolv.conf"
fi
cd "$R"
pivot_root . .oldroot
umount -l /.oldroot
cd /
set +e
"$@"
status=$?
exit $status
"""



def os_release() -> dict[str, str]:
    text = Path("/etc/os-release").read_text()
    pairs = (l.split("=", 1) for l in text.splitlines() if "=" in l)
    return {key: value.strip('"') for key, value in pairs}


def packages() -> list[str]:
    """tests/packages.txt (what the suite needs) + the extras, as installed in the root."""
    listed = (REPO / "tests" / "packages.txt").read_text().split("\n")
    names = {l.strip() for l in listed if l.strip() and not l.startswith("#")}
    return sorted((names | set(EXTRA_PACKAGES)) - set(HOST_ONLY))


def stamp_text() -> str:
    key = "\n".join([BUILD_VERSION, SUITE, *packages()])
    return hashlib.sha256(key.encode()).hexdigest() + "\n"


def host_mirror() -> str:
    """The Debian mirror this machine's apt uses (KVMUFW_DEBIAN_MIRROR overrides it)."""
    if os.environ.get("KVMUFW_DEBIAN_MIRROR"):
        return os.environ["KVMUFW_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        text = path.read_text(errors="replace") if path.is_file() else ""
        for uri in re.findall(r"^(?:URIs:|deb(?:\s+\[[^]]*\])?)\s+(\S+)", text, re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def root_command(argv: list[str], network: bool = False, src: Path = REPO) -> list[str]:
    """The host command that runs argv inside the root (see the module docstring)."""
    # --kill-child: if unshare is killed (a timeout), the namespace's PID 1 and all in it die
    namespaces = ["--mount", "--pid", "--fork", "--kill-child"] + ([] if network else ["--net"])
    return ["unshare", *namespaces, "--propagation", "private", "bash", "-c", ENTER,
            "enter", str(ROOT), str(src), "1" if network else "0", *argv]


def root_env(env: dict | None = None) -> dict:
    base = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8",
            "TERM": os.environ.get("TERM", "dumb"),
            "PYTHONDONTWRITEBYTECODE": "1", "DEBIAN_FRONTEND": "noninteractive",
            "KVMUFW_DEBIAN13_ROOT": "1",
            "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis"}  # /src is read-only
    base.update({k: v for k, v in os.environ.items() if k.startswith("KVMUFW_")
                 and k != "KVMUFW_TEST_CACHE"})
    return {**base, **(env or {})}


def run_in_root(argv: list[str], *, network: bool = False, cwd: str = "/src",
                env: dict | None = None, src: Path = REPO, check: bool = False,
                **kwargs) -> subprocess.CompletedProcess:
    """Run argv inside the Debian 13 root (ensure_root() first); returns subprocess.run's
    result. cwd is a path inside the root (the checkout is at /src)."""
    inner = ["bash", "-c", 'cd "$1" && shift && exec "$@"', "cd", cwd, *argv]
    return subprocess.run(root_command(inner, network, src), env=root_env(env), check=check,
                          **kwargs)


def _step(title: str, argv: list[str], network: bool, log) -> None:
    started = time.monotonic()
    print(f"debian13 root: {title}", file=log, flush=True)
    proc = run_in_root(argv, network=network, cwd="/", capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"debian13 root: {title} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    print(f"debian13 root: {title}: {time.monotonic() - started:.0f}s", file=log, flush=True)


def _debootstrap(mirror: str, log) -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    started = time.monotonic()
    print(f"debian13 root: debootstrap {SUITE} from {mirror} into {ROOT}", file=log, flush=True)
    # a mount namespace of its own: the proc/sys debootstrap mounts inside go with it
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "debootstrap",
                           "--variant=minbase", "--components=main", SUITE, str(ROOT), mirror],
                          capture_output=True, text=True, env={"PATH": PATH, "LANG": "C"},
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"debian13 root: debootstrap failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    BOOTSTRAPPED.touch()
    print(f"debian13 root: debootstrap: {time.monotonic() - started:.0f}s", file=log, flush=True)


def _configure(mirror: str) -> None:
    """apt sources from the same mirror, and no service started by package scripts."""
    security = mirror.rsplit("/", 1)[0] + "/debian-security"
    (ROOT / "etc/apt/sources.list").unlink(missing_ok=True)
    (ROOT / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    policy = ROOT / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# kvmufw test root: package scripts start no service\nexit 101\n")
    policy.chmod(0o755)


def _docker_ready() -> bool:
    return (ROOT / "var/tmp/kvmufw-test-cache/docker/root/usr/sbin/dockerd").exists()


def _docker_debs(log) -> None:
    """test_docker_beside's own fetch of Docker's debs into the root's /var/tmp cache,
    with the network (the suite inside has none); a file check when they are there."""
    if _docker_ready():
        return
    fetch = ("import sys; sys.path[:0] = ['/src/tests', '/src/tests/support', '/src/tests/lab']; "
             "import test_docker_beside; "
             "test_docker_beside.docker_root()")
    _step("fetch Docker's debs for test_docker_beside", ["python3", "-c", fetch], True, log)


def _hostname_in_hosts() -> None:
    """This machine's name in the root's /etc/hosts (127.0.1.1, as Debian's installer
    writes it): the root shares the machine's hostname, which debootstrap's /etc/hosts does
    not hold, and libvirt looks it up (virGetHostname, several times per live migration).
    Inside a lab, whose default route leads to a namespace that never answers, each DNS
    lookup then waits 6 s: a migration took 60 s there instead of 5. Checked at every
    ensure_root(): the root may move to a machine of another name."""
    name = socket.gethostname()
    hosts = ROOT / "etc" / "hosts"
    with _HOSTS_LOCK:  # the early runs' threads: one adds it, the other then finds it
        text = hosts.read_text() if hosts.is_file() else ""
        for line in text.splitlines():
            if name in line.split("#", 1)[0].split()[1:]:
                return
        # a name of this writer's own (another run may write at the same time)
        fd, temp = tempfile.mkstemp(prefix=".hosts.kvmufw.", dir=hosts.parent)
        new = Path(temp)
        with os.fdopen(fd, "w") as fh:
            fh.write(text + ("" if text.endswith("\n") or not text else "\n")
                     + f"127.0.1.1\t{name}\n")
        new.chmod(0o644)
        new.replace(hosts)  # whole, for a reader in another run at the same time


_HOSTS_LOCK = threading.Lock()


def ensure_root(log=sys.stderr) -> Path:
    """Build the root if needed (see the module docstring) and return its path."""
    if STAMP.is_file() and STAMP.read_text() == stamp_text():
        if not _docker_ready():  # under the lock: the early runs' threads fetch once
            with open(CACHE / "debian13-root.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                _docker_debs(log)
        _hostname_in_hosts()
        return ROOT
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "debian13-root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if STAMP.is_file() and STAMP.read_text() == stamp_text():
            return ROOT
        started = time.monotonic()
        mirror = host_mirror()
        if not BOOTSTRAPPED.is_file():
            _debootstrap(mirror, log)
        _configure(mirror)
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages()]
        _step("apt-get update", ["apt-get", "update", "-q"], True, log)
        _step("download packages", [*install, "--download-only"], True, log)
        _step("install packages", install, False, log)
        _step("apt-get clean", ["apt-get", "clean"], False, log)
        # the corpus test's own fetch of libvirt's source, into the root's /var/tmp cache
        fetch = ("import sys; sys.path[:0] = ['/src/tests', '/src/tests/corpus']; "
                 "import test_corpus; "
                 "test_corpus.libvirt_corpus()")
        _step("fetch libvirt's source for the corpus test", ["python3", "-c", fetch], True, log)
        _docker_debs(log)
        STAMP.write_text(stamp_text())
        _hostname_in_hosts()
        print(f"debian13 root: ready in {time.monotonic() - started:.0f}s", file=log, flush=True)
    return ROOT


def pytest_in_root(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """The suite inside the root, as tests/run runs it natively."""
    return run_in_root(["python3", "-m", "pytest", "-p", "no:cacheprovider", *args], **kwargs)


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("tests/debian13/root.py: run as root", file=sys.stderr)
        return 1
    command, rest = (argv[0], argv[1:]) if argv else ("build", [])
    ensure_root()
    if command == "build":
        print(ROOT)
        return 0
    if command == "shell":
        return run_in_root(["bash", "-i"]).returncode
    if command == "pytest":
        return pytest_in_root(rest).returncode
    if command == "run":
        network = rest[:1] == ["--network"]
        return run_in_root(rest[1:] if network else rest, network=network).returncode
    print(f"tests/debian13/root.py: unknown command {command}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
