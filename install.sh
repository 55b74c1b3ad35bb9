#!/bin/bash
# Install kvmufw_hook on a Debian/Ubuntu KVM host:   sudo ./install.sh
# Remove all of it, and our firewall rules:           sudo ./install.sh --uninstall
#
# What it does (each step is idempotent, and it never overwrites a file it did not write):
#   1. installs what the hooks need from the distribution: python3-lxml, python3-libvirt, iptables
#   2. the package in /usr/local/lib/kvmufw_hook and the command /usr/local/sbin/kvmufw_hook
#   3. the libvirt hooks as drop-ins in /etc/libvirt/hooks/{network,qemu}.d/ (libvirt >= 6.5)
#   4. an entry in /etc/ufw/after.init that runs `kvmufw_hook replay` whenever UFW starts/reloads
#   5. where systemd runs: a drop-in that orders libvirt after UFW
#   6. SIGHUP to running libvirt daemons so they see the hooks, then `kvmufw_hook replay`
set -euo pipefail

PREFIX=${KVMUFW_PREFIX:-/usr/local}
LIB=$PREFIX/lib/kvmufw_hook
BIN=$PREFIX/sbin/kvmufw_hook
HOOKS=/etc/libvirt/hooks
AFTER_INIT=/etc/ufw/after.init
MANIFEST_DIR=/var/lib/kvmufw_hook
MANIFEST=$MANIFEST_DIR/install.manifest
STATE_DIR=/run/kvmufw_hook
PY=/usr/bin/python3
MARK="# kvmufw_hook: written by kvmufw_hook install.sh; removed by install.sh --uninstall"
BEGIN="# BEGIN kvmufw_hook"
END="# END kvmufw_hook"
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SYSTEMD_UNITS="libvirtd virtnetworkd virtqemud"

say() { printf 'kvmufw_hook install: %s\n' "$*"; }
die() { printf 'kvmufw_hook install: error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<EOF
usage: sudo ./install.sh [--uninstall]

  (no option)   install kvmufw_hook, its libvirt hooks and its UFW after.init entry,
                then re-apply every rule (kvmufw_hook replay)
  --uninstall   remove all of that and every kvmufw rule; nothing else
EOF
}

# --------------------------------------------------------------------------- helpers

# write_owned PATH MODE: write stdin to PATH unless PATH exists and is not ours.
write_owned() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp)
    cat > "$tmp"
    if [ -e "$path" ] && ! grep -qF "$MARK" "$path"; then
        rm -f "$tmp"
        die "$path exists and was not written by kvmufw_hook; not overwriting it (move it away or merge by hand)"
    fi
    mkdir -p "$(dirname "$path")"
    if [ -e "$path" ] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
    else
        install -m "$mode" "$tmp" "$path"
        rm -f "$tmp"
        say "wrote $path"
    fi
    chmod "$mode" "$path"
}

# remove_owned PATH: remove PATH if we wrote it.
remove_owned() {
    if [ -e "$1" ] && grep -qF "$MARK" "$1"; then
        rm -f "$1"
        say "removed $1"
    elif [ -e "$1" ]; then
        say "left $1 alone: not written by kvmufw_hook"
    fi
}

manifest_has() { [ -f "$MANIFEST" ] && grep -qxF "$1" "$MANIFEST"; }
manifest_add() { mkdir -p "$MANIFEST_DIR"; manifest_has "$1" || echo "$1" >> "$MANIFEST"; }

libvirt_version() {
    local daemon
    for daemon in libvirtd virtqemud virtnetworkd; do
        if command -v "$daemon" >/dev/null 2>&1; then
            "$daemon" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1
            return
        fi
    done
}

# 6.5 or newer (or unknown: assume a current libvirt) -> drop-in directories
use_dropins() {
    local v major minor
    v=$(libvirt_version)
    [ -z "$v" ] && return 0
    major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
    [ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 5 ]; }
}

hook_paths() {
    if use_dropins; then
        echo "$HOOKS/network.d/kvmufw_hook $HOOKS/qemu.d/kvmufw_hook"
    else
        echo "$HOOKS/network $HOOKS/qemu"
    fi
}

signal_libvirt() {
    local pidfile pid pids=""
    for pidfile in /run/libvirtd.pid /run/virtnetworkd.pid /run/virtqemud.pid; do
        [ -r "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null || true)
        case "$pid" in ''|*[!0-9]*) continue ;; esac
        [ -d "/proc/$pid" ] && pids="$pids $pid"
    done
    [ -n "$pids" ] || return 0
    # libvirt ignores a SIGHUP that arrives while it is still handling an earlier one
    # ("Drivers are not initialized, reload ignored"), so send a second one after that
    # reload has had time to finish.
    for pid in $pids; do kill -HUP "$pid" 2>/dev/null || true; done
    sleep "${KVMUFW_SIGHUP_GAP:-2}"
    for pid in $pids; do
        kill -HUP "$pid" 2>/dev/null \
            && say "sent SIGHUP to $(cat "/proc/$pid/comm" 2>/dev/null || echo libvirt) ($pid) so it sees the hooks"
    done
    # kvmufw_hook doctor compares this with the hooks' and the daemons' times
    if [ "${1:-}" = record ]; then mkdir -p "$MANIFEST_DIR"; touch "$MANIFEST_DIR/sighup"; fi
}

libvirt_running() {
    local pidfile pid
    for pidfile in /run/libvirtd.pid /run/virtnetworkd.pid; do
        [ -r "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null || true)
        [ -n "$pid" ] && [ -d "/proc/$pid" ] && return 0
    done
    return 1
}

# --------------------------------------------------------------------------- install

install_deps() {
    local missing=""
    [ -x "$PY" ] || missing="$missing python3"
    if [ -x "$PY" ]; then
        "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || die "$PY is older than 3.10; kvmufw_hook needs Python 3.10 or newer"
        "$PY" -c 'import lxml.etree' 2>/dev/null || missing="$missing python3-lxml"
        "$PY" -c 'import libvirt' 2>/dev/null || missing="$missing python3-libvirt"
    fi
    command -v iptables-restore >/dev/null 2>&1 || missing="$missing iptables"
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null 2>&1 \
        || die "missing:$missing; install them with your package manager and run install.sh again"
    say "installing from the distribution:$missing"
    apt-get update -qq || die "apt-get update failed; install$missing by hand and run install.sh again"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
        || die "apt-get install$missing failed"
}

install_package() {
    local staging
    [ -f "$SRC/kvmufw_hook/__init__.py" ] || die "run install.sh from the kvmufw_hook source tree"
    if [ -e "$LIB" ] && [ ! -f "$LIB/.kvmufw_hook" ]; then
        die "$LIB exists and was not written by kvmufw_hook; not overwriting it"
    fi
    staging=$(mktemp -d)
    mkdir -p "$staging/kvmufw_hook/backends"
    install -m 644 "$SRC"/kvmufw_hook/*.py "$staging/kvmufw_hook/"
    install -m 644 "$SRC"/kvmufw_hook/backends/*.py "$staging/kvmufw_hook/backends/"
    echo "$MARK" > "$staging/.kvmufw_hook"
    if [ -d "$LIB" ] && diff -rq -x __pycache__ "$staging" "$LIB" >/dev/null 2>&1; then
        rm -rf "$staging"
    else
        mkdir -p "$(dirname "$LIB")"
        rm -rf "$LIB"
        mv "$staging" "$LIB"
        chmod 755 "$LIB"
        say "installed the package in $LIB"
    fi
    # compile once now, so that hooks never write bytecode at guest start
    "$PY" -m compileall -q "$LIB/kvmufw_hook" >/dev/null 2>&1 || true
    write_owned "$BIN" 755 <<EOF
#!$PY -I
$MARK
import sys

sys.path.insert(0, "$LIB")
from kvmufw_hook.cli import main  # noqa: E402

sys.exit(main())
EOF
}

hook_script() {  # hook_script network|qemu
    sed -e "1a $MARK" -e "s|^LIB = .*|LIB = \"$LIB\"|" "$SRC/hooks/$1"
}

# make_dirs DIR...: create missing directories, remembering them for --uninstall.
make_dirs() {
    local dir
    for dir in "$@"; do
        if [ ! -d "$dir" ]; then
            make_dirs "$(dirname "$dir")"
            mkdir -m 755 "$dir"
            manifest_add "dir $dir"
        fi
    done
}

install_hooks() {
    local paths network qemu
    paths=$(hook_paths)
    network=${paths% *}; qemu=${paths#* }
    make_dirs "$(dirname "$network")" "$(dirname "$qemu")"
    hook_script network | write_owned "$network" 755
    hook_script qemu | write_owned "$qemu" 755
}

after_init_block() {
    cat <<EOF
$BEGIN
# Re-applies kvmufw_hook's rules whenever UFW starts or reloads (see install.sh).
if [ "\${1:-}" = start ] && [ -x $BIN ]; then
    $BIN replay >/dev/null 2>&1 || true
fi
$END
EOF
}

install_after_init() {
    local tmp
    [ -d /etc/ufw ] || { say "UFW is not installed: no after.init entry (replay by hand after a firewall reload)"; return 0; }
    if [ ! -e "$AFTER_INIT" ]; then
        { echo "#!/bin/sh"; after_init_block; } > "$AFTER_INIT"
        chmod 755 "$AFTER_INIT"
        manifest_add "created $AFTER_INIT"
        say "wrote $AFTER_INIT"
        return 0
    fi
    if ! grep -qxF "$BEGIN" "$AFTER_INIT"; then
        tmp=$(mktemp)
        if head -n1 "$AFTER_INIT" | grep -q '^#!'; then
            { head -n1 "$AFTER_INIT"; after_init_block; tail -n +2 "$AFTER_INIT"; } > "$tmp"
        else
            { after_init_block; cat "$AFTER_INIT"; } > "$tmp"
        fi
        cat "$tmp" > "$AFTER_INIT"   # keeps owner and mode of the user's file
        rm -f "$tmp"
        say "added the replay entry to $AFTER_INIT"
    fi
    if [ ! -x "$AFTER_INIT" ]; then
        manifest_add "mode $(stat -c %a "$AFTER_INIT") $AFTER_INIT"
        chmod u+x,go-w "$AFTER_INIT"
        say "made $AFTER_INIT executable so UFW runs it"
    fi
}

install_systemd() {
    local unit
    [ -d /run/systemd/system ] || return 0
    for unit in $SYSTEMD_UNITS; do
        write_owned "/etc/systemd/system/$unit.service.d/kvmufw_hook.conf" 644 <<EOF
$MARK
# Start libvirt after UFW, so that UFW's rules are in place before networks start.
[Unit]
After=ufw.service
EOF
    done
    systemctl daemon-reload || true
}

do_install() {
    install_deps
    install_package
    install_hooks
    install_after_init
    install_systemd
    signal_libvirt record
    if libvirt_running; then
        if "$BIN" replay; then
            say "done"
        else
            say "installed, but replay reported problems (see above); run: kvmufw_hook replay"
        fi
    else
        say "done; libvirt is not running: rules are added as networks and guests start"
    fi
}

# --------------------------------------------------------------------------- uninstall

do_uninstall() {
    local path mode unit
    if [ -x "$BIN" ]; then
        "$BIN" flush || say "could not flush the rules; run: $BIN flush"
    fi
    for path in "$HOOKS/network.d/kvmufw_hook" "$HOOKS/qemu.d/kvmufw_hook" "$HOOKS/network" "$HOOKS/qemu"; do
        [ -e "$path" ] && grep -qF "$MARK" "$path" && remove_owned "$path"
    done
    if [ -f "$AFTER_INIT" ] && grep -qxF "$BEGIN" "$AFTER_INIT"; then
        sed -i "/^$BEGIN\$/,/^$END\$/d" "$AFTER_INIT"
        say "removed the replay entry from $AFTER_INIT"
        if manifest_has "created $AFTER_INIT" && [ "$(grep -cv '^#!' "$AFTER_INIT")" = 0 ]; then
            rm -f "$AFTER_INIT"
            say "removed $AFTER_INIT"
        fi
        mode=$(grep -E "^mode [0-7]+ $AFTER_INIT\$" "$MANIFEST" 2>/dev/null | head -n1 | cut -d' ' -f2 || true)
        if [ -n "$mode" ] && [ -e "$AFTER_INIT" ]; then
            chmod "$mode" "$AFTER_INIT"
        fi
    fi
    for unit in $SYSTEMD_UNITS; do
        remove_owned "/etc/systemd/system/$unit.service.d/kvmufw_hook.conf"
        rmdir "/etc/systemd/system/$unit.service.d" 2>/dev/null || true
    done
    [ -d /run/systemd/system ] && { systemctl daemon-reload || true; }
    if [ -f "$MANIFEST" ]; then  # directories we created, deepest first, if left empty
        grep '^dir ' "$MANIFEST" | cut -d' ' -f2- | sort -r | while read -r dir; do
            rmdir "$dir" 2>/dev/null || true
        done
    fi
    remove_owned "$BIN"
    if [ -f "$LIB/.kvmufw_hook" ]; then
        rm -rf "$LIB"
        say "removed $LIB"
    fi
    rm -rf "$STATE_DIR" "$MANIFEST_DIR"
    signal_libvirt
    say "uninstalled"
}

# --------------------------------------------------------------------------- main

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --uninstall) action=do_uninstall ;;
    "") action=do_install ;;
    *) usage >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || die "run as root: sudo ./install.sh ${1:-}"
"$action"
