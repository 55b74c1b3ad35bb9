#!/bin/sh
# Install kvmufw_hook on a Debian/Ubuntu KVM host from this source tree:   sudo ./install.sh
# Remove all of it, and our firewall rules:                              sudo ./install.sh --uninstall
#
# A bootstrap for hosts without the Debian package (README.md, "Install"): it installs what
# kvmufw_hook needs from the distribution, then hands over to the installer in Python
# (kvmufw_hook/commands/install.py: `kvmufw_hook install --source DIR`), which checks
# everything before its first write, never overwrites or deletes a file it did not write,
# and rolls back on failure. KVMUFW_PREFIX (default /usr/local) says where the package and
# the command go.
set -eu
umask 022
SRC=$(cd "$(dirname "$0")" && pwd)
PY=/usr/bin/python3
PREFIX=${KVMUFW_PREFIX:-/usr/local}

die() { printf 'kvmufw_hook install: error: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
    -h|--help) printf 'usage: sudo ./install.sh [--uninstall]\n'; exit 0 ;;
    --uninstall) action=uninstall ;;
    "") action=install ;;
    *) printf 'usage: sudo ./install.sh [--uninstall]\n' >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || die "run as root: sudo ./install.sh ${1:-}"

if [ "$action" = install ]; then
    missing=""
    [ -x "$PY" ] || missing="$missing python3"
    if [ -x "$PY" ]; then
        "$PY" -c 'import libvirt' 2>/dev/null || missing="$missing python3-libvirt"
    fi
    command -v iptables-restore >/dev/null 2>&1 || missing="$missing iptables"
    if [ -n "$missing" ]; then
        command -v apt-get >/dev/null 2>&1 \
            || die "missing:$missing; install them with your package manager and run install.sh again"
        printf 'kvmufw_hook install: installing from the distribution:%s\n' "$missing"
        apt-get update -qq || die "apt-get update failed; install$missing by hand and run install.sh again"
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
            || die "apt-get install$missing failed"
    fi
fi
[ -x "$PY" ] || die "$PY is missing"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PY is older than 3.10; kvmufw_hook needs Python 3.10 or newer"
# the installer runs from this tree (-I: nothing from the environment or user site; -B: no
# bytecode written into the source tree)
exec "$PY" -I -B -c 'import sys; sys.path.insert(0, sys.argv[1]); from kvmufw_hook.cli import main; sys.exit(main(sys.argv[2:]))' \
    "$SRC" "$action" --source "$SRC" --prefix "$PREFIX"
