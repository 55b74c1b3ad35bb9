"""The boot test's disk image: a Debian 12 root file system built with debootstrap, cached.

    python3 tests/boot/image.py build        # build (or reuse) the pristine base image

The base image (raw ext4, label "root") and its kernel and initrd live in
$KVMUFW_TEST_CACHE/boot/<key>/, the key being a hash of PACKAGES and VERSION: a second run
reuses them. Each test run boots a sparse copy (``run_disk``), so runs never see each other.
Every mount happens inside a private mount namespace of its own (``unshare --mount``), which
keeps the host's network (debootstrap needs the mirror) and never touches the host's /etc.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Bump when the build recipe changes in a way the package list does not show.
VERSION = "boot-image-3"
SUITE = "bookworm"
PACKAGES = [
    "systemd", "systemd-sysv", "libpam-systemd", "udev", "dbus", "kmod", "linux-image-amd64",
    "libvirt-daemon-system", "libvirt-clients", "qemu-system-x86", "dnsmasq-base",
    "ufw", "iptables", "python3", "python3-libvirt", "iproute2", "procps",
    "nftables",  # the package kvmufw-hook depends on it; the VM has no network to fetch it
]
SIZE = "8G"
CACHE = Path(os.environ.get("KVMUFW_TEST_CACHE", "/var/tmp/kvmufw-test-cache")) / "boot"
TOOLS = ("debootstrap", "mkfs.ext4", "debugfs", "unshare", "qemu-system-x86_64", "losetup")

# Units that only slow a test boot down (timers that would run apt or trim the disk).
MASKED = ["apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "fstrim.timer",
          "e2scrub_all.timer", "e2scrub_reap.service", "logrotate.timer", "dpkg-db-backup.timer",
          "systemd-timesyncd.service", "getty@tty1.service"]


def log(message: str) -> None:
    print(f"boot-image: {message}", file=sys.stderr, flush=True)


def cache_key() -> str:
    text = VERSION + "\n" + SUITE + "\n" + "\n".join(sorted(PACKAGES))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_dir() -> Path:
    return CACHE / cache_key()


def mirror() -> str:
    """The Debian mirror this machine's apt uses (deb.debian.org when none is found)."""
    sources = [*Path("/etc/apt").glob("sources.list.d/*"), Path("/etc/apt/sources.list")]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            uris = []
            if words[:1] == ["URIs:"]:
                uris = words[1:]
            elif words[:1] == ["deb"]:
                uris = [w for w in words[1:] if "://" in w][:1]
            for uri in uris:
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    return "http://deb.debian.org/debian"


def in_private_mounts(script: str, *args: str, timeout: float) -> None:
    """Run a bash script in a private mount namespace (the host's network stays)."""
    cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-euo", "pipefail",
           "-c", script, "image-script", *args]
    subprocess.run(cmd, check=True, timeout=timeout)


BUILD_SCRIPT = r"""
img=$1 mnt=$2 mirror=$3 include=$4 debs=$5 out=$6 masked=$7
mount -o loop "$img" "$mnt"
trap 'umount -R "$mnt" 2>/dev/null || umount -l "$mnt" || true' EXIT
debootstrap --variant=minbase --include="$include" --cache-dir="$debs" \
    bookworm "$mnt" "$mirror" >"$out/debootstrap.log" 2>&1 \
    || { cp "$mnt/debootstrap/debootstrap.log" "$out/debootstrap-target.log" 2>/dev/null || true
         tail -n 30 "$out/debootstrap.log" >&2; exit 1; }
echo 'LABEL=root / ext4 defaults 0 1' > "$mnt/etc/fstab"
echo bootlab > "$mnt/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 bootlab\n' > "$mnt/etc/hosts"
: > "$mnt/etc/resolv.conf"
chroot "$mnt" passwd -d root >/dev/null
mkdir -p "$mnt/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=persistent\n' > "$mnt/etc/systemd/journald.conf.d/boot-test.conf"
for unit in $masked; do ln -sf /dev/null "$mnt/etc/systemd/system/$unit"; done
chroot "$mnt" apt-get clean
cp "$(readlink -f "$mnt/vmlinuz")" "$out/vmlinuz"
cp "$(readlink -f "$mnt/initrd.img")" "$out/initrd.img"
"""


def build(dest: Path) -> None:
    """Build the base image into dest (a new directory), then mark it complete."""
    started = time.monotonic()
    work = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    img = work / "base.raw"
    subprocess.run(["truncate", "-s", SIZE, str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", str(img)], check=True)
    mnt = work / "mnt"
    mnt.mkdir()
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap {SUITE} from {mirror()} into {img} (log: {work}/debootstrap.log)")
    in_private_mounts(BUILD_SCRIPT, str(img), str(mnt), mirror(), ",".join(PACKAGES),
                      str(debs), str(work), " ".join(MASKED), timeout=1800)
    mnt.rmdir()
    (work / "complete").write_text(f"{VERSION}\n{' '.join(PACKAGES)}\n")
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    log(f"built {dest} in {time.monotonic() - started:.0f} s")


def _remove_stale_images(keep: Path) -> None:
    """Images built from another package list or VERSION: 1.5 GB each, never used again."""
    for old in CACHE.iterdir():
        name = old.name.removesuffix(".tmp")
        if old != keep and len(name) == 16 and all(c in "0123456789abcdef" for c in name):
            log(f"removing the stale image {old}")
            shutil.rmtree(old, ignore_errors=True)


def ensure_base() -> Path:
    """The pristine base image's directory, built once (a lock serialises parallel runs)."""
    dest = image_dir()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "complete").exists():
            _remove_stale_images(dest)
            build(dest)
        else:
            log(f"reusing {dest}")
    return dest


def new_run_dir() -> Path:
    """A directory for one run's disk and logs; those of runs whose process is gone go."""
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old in runs.iterdir():
        if old.name.isdigit() and not Path(f"/proc/{old.name}").exists():
            shutil.rmtree(old, ignore_errors=True)
    run = runs / str(os.getpid())
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    return run


def run_disk(base: Path, dest: Path) -> Path:
    """A private copy of the base image for one run (sparse; a reflink where possible)."""
    disk = dest / "disk.raw"
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(base / "base.raw"),
                    str(disk)], check=True)
    return disk


INJECT_SCRIPT = r"""
disk=$1 mnt=$2 tree=$3 boot=$4 deb=$5
mount -o loop "$disk" "$mnt"
trap 'umount "$mnt"' EXIT
dest="$mnt/root/kvmufw"
rm -rf "$dest"; mkdir -p "$dest"
cp -a "$tree/install.sh" "$tree/hooks" "$tree/kvmufw_hook" "$dest/"
cp -a "$tree/tests/support/peer.py" "$dest/"
cp "$deb" "$dest/kvmufw-hook.deb"
find "$dest" -name __pycache__ -prune -exec rm -rf {} +
install -m 755 "$boot/driver.sh" "$mnt/usr/local/sbin/kvmufw-boot-driver"
for unit in "$boot"/*.service; do
    install -m 644 "$unit" "$mnt/etc/systemd/system/"
    wanted=$(sed -n 's/^WantedBy=//p' "$unit")
    mkdir -p "$mnt/etc/systemd/system/$wanted.wants"
    ln -sf "/etc/systemd/system/$(basename "$unit")" "$mnt/etc/systemd/system/$wanted.wants/"
done
rm -rf "$mnt/var/lib/kvmufw-boot"
"""


def build_deb(tree: Path, dest: Path) -> Path:
    """The Debian package of the tree under test (./build-deb.sh, lintian included)."""
    subprocess.run([str(tree / "build-deb.sh"), str(dest)], check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    [deb] = dest.glob("kvmufw-hook_*_all.deb")
    return deb


def inject(disk: Path, tree: Path, deb: Path) -> None:
    """Copy the source tree under test, its Debian package, the driver and its units into
    the run's disk."""
    mnt = disk.parent / "mnt"
    mnt.mkdir(exist_ok=True)
    boot = Path(__file__).resolve().parent
    in_private_mounts(INJECT_SCRIPT, str(disk), str(mnt), str(tree), str(boot), str(deb),
                      timeout=120)
    mnt.rmdir()


def read_file(disk: Path, path: str) -> str | None:
    """A file of the (powered-off) disk, read with debugfs: no mount at all."""
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)], check=False,
                          capture_output=True,
                          text=True, errors="replace", timeout=60)
    if proc.returncode != 0 or "File not found" in proc.stderr:
        return None
    return proc.stdout


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: image.py build")
    print(ensure_base())
