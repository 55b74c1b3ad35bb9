#!/bin/bash
# Install kvmufw_hook on a Debian/Ubuntu KVM host:   sudo ./install.sh
# Remove all of it, and our firewall rules:           sudo ./install.sh --uninstall
#
# What it does (each step is idempotent):
#   1. installs what the hooks need from the distribution: python3-lxml, python3-libvirt, iptables
#   2. the package in /usr/local/lib/kvmufw_hook and the command /usr/local/sbin/kvmufw_hook
#   3. the libvirt hooks as drop-ins in /etc/libvirt/hooks/{network,qemu}.d/ (libvirt >= 6.5;
#      older: the hook files /etc/libvirt/hooks/{network,qemu}, moved into the drop-in
#      directories by the install after a libvirt upgrade)
#   4. an entry in /etc/ufw/after.init that runs `kvmufw_hook restore` (bounded by timeout)
#      whenever UFW starts or reloads: from our own state and the kernel, never libvirt
#   5. where systemd runs: drop-ins that start libvirt after UFW and put our jumps back
#      first after each daemon start (`kvmufw_hook restore --jumps-only --watch 30`)
#   6. one SIGHUP to a running libvirt daemon, only if it started while no hook of that
#      kind existed (it would not run ours without one), then `kvmufw_hook replay`
#
# Safety: a file is ours only if its content is exactly what we wrote (the sha256 of each
# file we write is kept in /var/lib/kvmufw_hook/install.manifest, with a "hook DRIVER
# PATH" line for each hook this install uses: `kvmufw_hook doctor` checks those). Anything else at a path
# we use is never overwritten nor deleted; install refuses (before its first write) and
# uninstall leaves it, each saying so in one line. Nothing is written through a symlink.
# A failure after the first write rolls back what this run wrote.
set -euo pipefail
umask 022

PREFIX=${KVMUFW_PREFIX:-/usr/local}
LIB=$PREFIX/lib/kvmufw_hook
BIN=$PREFIX/sbin/kvmufw_hook
HOOKS=/etc/libvirt/hooks
AFTER_INIT=/etc/ufw/after.init
MANIFEST_DIR=/var/lib/kvmufw_hook
MANIFEST=$MANIFEST_DIR/install.manifest
SIGHUP_STAMP=$MANIFEST_DIR/sighup   # read by `kvmufw_hook doctor`
STATE_DIR=/run/kvmufw_hook
PY=/usr/bin/python3
MARK="# kvmufw_hook: written by kvmufw_hook install.sh; removed by install.sh --uninstall"
BEGIN="# BEGIN kvmufw_hook"
END="# END kvmufw_hook"
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SYSTEMD_UNITS="libvirtd virtnetworkd virtqemud"
DAEMON_WAIT=${KVMUFW_DAEMON_WAIT:-30}   # seconds to wait for a daemon to answer after SIGHUP
# sha256 of files that earlier versions of install.sh wrote with the default prefix and
# recorded nowhere (the hooks of hooks/ at commit 187a492 and at e3f1716, as installed):
# such a file is ours; any other unrecorded content is not.
LEGACY_SHA256="0d40d8036599ff703d6a716c32cdc74dc7d8b61402d45903464c241ba9d91358
04be06b71eb04fde2fe4c10fd0223b735e59329c0e264fc7fb251b509ccc8ae8
e124ef0c21768aa38bdb3369743a2051e8b330d8d96a6fa6bcb5390082bdd05c
b4a62460b88425e4861d352616ef69cb1a7c7a9a1d8ba7aa9628a9e853c96bbb"

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

# --------------------------------------------------------------------------- what we write

bin_script() {
    cat <<EOF
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

# Runs inside ufw.service at boot: it must never wait for libvirt (libvirt starts after
# UFW), hence `restore` (our state and the kernel only) under a timeout. A refusal stays
# visible: restore writes it to stderr and syslog, and a failure or timeout adds a line.
after_init_block() {
    cat <<EOF
$BEGIN
# Puts kvmufw_hook's rules back whenever UFW starts or reloads (see install.sh), from its
# own state and the kernel only: UFW's start never waits for libvirt.
if [ "\${1:-}" = start ] && [ -x $BIN ]; then
    $TIMEOUT -k 2 20 $BIN restore >/dev/null || {
        kvmufw_msg="'kvmufw_hook restore' from \$0 exited with status \$? (124: timed out after 20 s)"
        echo "kvmufw_hook: \$kvmufw_msg" >&2
        $LOGGER -t kvmufw_hook -p daemon.warning "\$kvmufw_msg" 2>/dev/null
        true
    }
fi
$END
EOF
}

# The block of install.sh up to this version: replaced by the current one on install.
legacy_after_init_block() {
    cat <<EOF
$BEGIN
# Re-applies kvmufw_hook's rules whenever UFW starts or reloads (see install.sh).
if [ "\${1:-}" = start ] && [ -x $BIN ]; then
    $BIN replay >/dev/null 2>&1 || true
fi
$END
EOF
}

dropin() {
    cat <<EOF
$MARK
# Start libvirt after UFW, and put kvmufw_hook's jumps back in first place after each
# start: the daemon re-inserts its own jumps at position 1 when it starts, and again when
# it reloads its networks' rules a few seconds after it is ready (Debian's libvirtd exits
# when idle and is started again by its socket). So the repair keeps watching for 30 s,
# in the background: it never holds up the unit, and never fails it.
[Unit]
After=ufw.service

[Service]
ExecStartPost=-/bin/sh -c '$TIMEOUT 40 $BIN restore --jumps-only --watch 30 </dev/null >/dev/null 2>&1 &'
EOF
}

legacy_dropin() {
    cat <<EOF
$MARK
# Start libvirt after UFW, so that UFW's rules are in place before networks start.
[Unit]
After=ufw.service
EOF
}

# --------------------------------------------------------------------------- ownership

sha_of() { sha256sum < "$1" | cut -d' ' -f1; }
sha_of_stdin() { sha256sum | cut -d' ' -f1; }

recorded_sha() {  # the sha256 we recorded for PATH, if any
    [ -f "$MANIFEST" ] || return 0
    awk -v p="$1" '$1 == "file" && $3 == p { print $2 }' "$MANIFEST" | tail -n1
}

# ours PATH [SHA_OF_CONTENT_WE_WOULD_WRITE...]: PATH is a regular file (not a symlink)
# whose content is what we recorded, what we would write now, or what an earlier version
# wrote.
ours() {
    local path=$1 sha rec known
    shift
    [ -f "$path" ] && [ ! -L "$path" ] || return 1
    sha=$(sha_of "$path")
    rec=$(recorded_sha "$path")
    [ -n "$rec" ] && [ "$sha" = "$rec" ] && return 0
    for known in "$@" $LEGACY_SHA256; do
        [ "$sha" = "$known" ] && return 0
    done
    return 1
}

manifest_has() { [ -f "$MANIFEST" ] && grep -qxF "$1" "$MANIFEST"; }

# The old package directory held a marker file and nothing recorded its files.
legacy_lib() {
    [ -f "$LIB/.kvmufw_hook" ] && [ ! -L "$LIB/.kvmufw_hook" ] \
        && [ "$(cat "$LIB/.kvmufw_hook")" = "$MARK" ] \
        && ! { [ -f "$MANIFEST" ] && grep -q "^file [0-9a-f]* $LIB/" "$MANIFEST"; }
}

# lib_foreign: print the files under LIB that are not ours (nothing: LIB is all ours).
lib_foreign() {
    local f
    [ -e "$LIB" ] || return 0
    legacy_lib && return 0
    find "$LIB" -mindepth 1 \( -name __pycache__ -prune \) -o ! -type d -print | sort |
        while read -r f; do ours "$f" || echo "$f"; done
}

# --------------------------------------------------------------------------- preflight

# no_symlink PATH...: refuse to write at or through a symlink.
no_symlink() {
    local path
    for path in "$@"; do
        if [ -L "$path" ]; then
            die "$path is a symlink (to $(readlink "$path")); kvmufw_hook never writes through one: replace it by a real file or directory, or remove it, and run install.sh again"
        fi
    done
}

# safe_dir DIR: an existing directory we write into is root's and not writable by others.
safe_dir() {
    local dir=$1 owner mode
    [ -e "$dir" ] || return 0
    no_symlink "$dir"
    [ -d "$dir" ] || die "$dir is not a directory; move it away and run install.sh again"
    owner=$(stat -c %u "$dir"); mode=$(stat -c %a "$dir")
    if [ "$owner" != 0 ] || (( 8#$mode & 8#002 )); then
        die "$dir is owned by uid $owner with mode $mode: anyone who can write there could change what root runs; make it root's and not writable by others (chown root: $dir; chmod o-w $dir), then run install.sh again"
    fi
}

# free_path PATH SHA...: PATH may be written: it is absent or ours.
free_path() {
    local path=$1
    shift
    no_symlink "$path"
    safe_dir "$(dirname "$path")"
    [ -e "$path" ] || return 0
    ours "$path" "$@" \
        || die "$path exists and is not as kvmufw_hook wrote it; not overwriting it (move it away or merge by hand, then run install.sh again)"
}

# block_lines FILE: "BEGIN_LINE END_LINE" of our block; "0 0" if there is none; fails if
# the block is not whole (a BEGIN without an END, the reverse, or more than one).
block_lines() {
    local b e nb ne
    nb=$(grep -cxF "$BEGIN" "$1" || true); ne=$(grep -cxF "$END" "$1" || true)
    [ "$nb" = 0 ] && [ "$ne" = 0 ] && { echo "0 0"; return 0; }
    [ "$nb" = 1 ] && [ "$ne" = 1 ] || return 1
    b=$(grep -nxF "$BEGIN" "$1" | cut -d: -f1); e=$(grep -nxF "$END" "$1" | cut -d: -f1)
    [ "$b" -lt "$e" ] || return 1
    echo "$b $e"
}

block_sha() { sed -n "${2% *},${2#* }p" "$1" | sha_of_stdin; }  # block_sha FILE "BEGIN END"

# known_block SHA: the block is one we wrote (now, earlier, or as recorded).
known_block() {
    [ "$1" = "$(after_init_block | sha_of_stdin)" ] \
        || [ "$1" = "$(legacy_after_init_block | sha_of_stdin)" ] \
        || manifest_has "block $1 $AFTER_INIT"
}

check_after_init() {
    local lines owner mode
    [ -d /etc/ufw ] || return 0
    safe_dir /etc/ufw
    if [ -L "$AFTER_INIT" ]; then
        die "$AFTER_INIT is a symlink (to $(readlink "$AFTER_INIT")); kvmufw_hook does not edit through symlinks: replace it by a copy of its target (cp --remove-destination \"\$(readlink -f $AFTER_INIT)\" $AFTER_INIT) and run install.sh again"
    fi
    [ -e "$AFTER_INIT" ] || return 0
    [ -f "$AFTER_INIT" ] || die "$AFTER_INIT is not a regular file; move it away and run install.sh again"
    owner=$(stat -c %u "$AFTER_INIT"); mode=$(stat -c %a "$AFTER_INIT")
    if [ "$owner" != 0 ] || (( 8#$mode & 8#022 )); then
        die "$AFTER_INIT is owned by uid $owner with mode $mode; UFW runs it as root, so only root may write it: chown root: $AFTER_INIT; chmod go-w $AFTER_INIT, then run install.sh again"
    fi
    lines=$(block_lines "$AFTER_INIT") \
        || die "$AFTER_INIT has a '$BEGIN' or '$END' line without the other (or several): remove what is left of the kvmufw_hook block by hand and run install.sh again"
    if [ "$lines" != "0 0" ] && ! known_block "$(block_sha "$AFTER_INIT" "$lines")"; then
        die "the kvmufw_hook block in $AFTER_INIT (lines ${lines/ /-}) was changed since install.sh wrote it; not overwriting it: remove those lines and run install.sh again"
    fi
}

need_tools() {
    local tool missing=""
    for tool in sha256sum mktemp install find awk sed cmp stat timeout logger; do
        command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
    done
    [ -z "$missing" ] || die "missing tools:$missing"
    tool_paths
}

# absolute paths for what UFW and systemd run, whatever PATH they have
tool_paths() {
    TIMEOUT=/usr/bin/timeout; [ -x "$TIMEOUT" ] || TIMEOUT=$(command -v timeout || echo timeout)
    LOGGER=/usr/bin/logger; [ -x "$LOGGER" ] || LOGGER=$(command -v logger || echo logger)
}

preflight_install() {
    local unit foreign path
    if [ ! -f "$SRC/kvmufw_hook/__init__.py" ] || [ ! -d "$SRC/hooks" ]; then
        die "run install.sh from the kvmufw_hook source tree"
    fi
    if [ -x "$PY" ]; then
        "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || die "$PY is older than 3.10; kvmufw_hook needs Python 3.10 or newer"
    fi
    safe_dir "$MANIFEST_DIR"
    [ ! -e "$MANIFEST" ] || no_symlink "$MANIFEST"
    # the package directory: absent, or only our files (no symlink anywhere in it)
    no_symlink "$LIB"
    safe_dir "$(dirname "$LIB")"
    if [ -e "$LIB" ]; then
        [ -d "$LIB" ] || die "$LIB is not a directory; move it away and run install.sh again"
        foreign=$(find "$LIB" -type l | head -n1)
        [ -z "$foreign" ] || die "$foreign is a symlink; kvmufw_hook never writes through one: move $LIB away and run install.sh again"
        foreign=$(lib_foreign | head -n1)
        [ -z "$foreign" ] || die "$foreign is not as kvmufw_hook wrote it; not overwriting $LIB (move it away, then run install.sh again)"
    fi
    free_path "$BIN" "$(bin_script | sha_of_stdin)"
    safe_dir "$HOOKS"
    for path in $(hook_paths); do
        free_path "$path" "$(hook_script "$(hook_driver "$path")" | sha_of_stdin)"
    done
    check_after_init
    if [ -d /run/systemd/system ]; then
        safe_dir /etc/systemd/system
        for unit in $SYSTEMD_UNITS; do
            free_path "/etc/systemd/system/$unit.service.d/kvmufw_hook.conf" \
                "$(dropin | sha_of_stdin)" "$(legacy_dropin | sha_of_stdin)"
        done
    fi
}

install_deps() {
    local missing=""
    [ -x "$PY" ] || missing="$missing python3"
    if [ -x "$PY" ]; then
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
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PY is older than 3.10; kvmufw_hook needs Python 3.10 or newer"
}

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

# --------------------------------------------------------------------------- writing, undo

UNDO=()          # shell commands that undo this run's writes, run in reverse on failure
WRITING=0
BACKUP=""
MANIFEST_NEW=""  # the manifest being built; installed last

undo() { UNDO+=("$1"); }

rollback() {
    local i
    for (( i=${#UNDO[@]}-1; i>=0; i-- )); do eval "${UNDO[i]}" 2>/dev/null || true; done
}

on_exit() {
    local rc=$?
    if [ "$rc" != 0 ] && [ "$WRITING" = 1 ]; then
        rollback
        printf 'kvmufw_hook install: failed after it had started writing; rolled back what this run wrote\n' >&2
    fi
    [ -z "$BACKUP" ] || rm -rf "$BACKUP"
    exit "$rc"
}

q() { printf '%q' "$1"; }

manifest_add() { grep -qxF "$1" "$MANIFEST_NEW" || echo "$1" >> "$MANIFEST_NEW"; }
manifest_file() {  # manifest_file PATH: record the sha256 of PATH as ours
    awk -v p="$1" '!($1 == "file" && $3 == p)' "$MANIFEST_NEW" > "$MANIFEST_NEW.tmp"
    mv -f "$MANIFEST_NEW.tmp" "$MANIFEST_NEW"
    echo "file $(sha_of "$1") $1" >> "$MANIFEST_NEW"
}

# make_dirs DIR...: create missing directories (0755, root's), remembering them.
make_dirs() {
    local dir
    for dir in "$@"; do
        [ -d "$dir" ] && continue
        make_dirs "$(dirname "$dir")"
        mkdir -m 755 "$dir"
        undo "rmdir $(q "$dir")"
        manifest_add "dir $dir"
    done
}

# put_file PATH MODE: stdin becomes PATH (checked free by preflight), replaced atomically,
# never through a symlink; the previous file is kept for a rollback.
put_file() {
    local path=$1 mode=$2 tmp
    make_dirs "$(dirname "$path")"
    tmp=$(mktemp "$(dirname "$path")/.kvmufw_hook.XXXXXX")
    undo "rm -f $(q "$tmp")"
    cat > "$tmp"
    if [ -f "$path" ] && cmp -s "$tmp" "$path" && [ "$(stat -c %a "$path")" = "$mode" ]; then
        rm -f "$tmp"
    else
        chown 0:0 "$tmp"; chmod "$mode" "$tmp"
        if [ -e "$path" ]; then
            cp -p "$path" "$BACKUP/$(echo "$path" | tr / _)"
            undo "mv -f $(q "$BACKUP/$(echo "$path" | tr / _)") $(q "$path")"
        else
            undo "rm -f $(q "$path")"
        fi
        mv -f -T "$tmp" "$path"
        say "wrote $path"
        CHANGED=1
    fi
    manifest_file "$path"
}

# --------------------------------------------------------------------------- install

install_package() {
    local staging f
    staging=$(mktemp -d "$(dirname "$LIB")/.kvmufw_hook.XXXXXX")
    undo "rm -rf $(q "$staging")"
    # every module of the package, subpackages included
    (cd "$SRC" && find kvmufw_hook -name __pycache__ -prune -o -type f -name '*.py' -print) |
        while read -r f; do
            install -D -m 644 -o root -g root "$SRC/$f" "$staging/$f"
        done
    echo "$MARK" > "$staging/.kvmufw_hook"
    chmod 644 "$staging/.kvmufw_hook"
    find "$staging" -type d -exec chmod 755 {} +
    chown -R 0:0 "$staging"
    if [ -d "$LIB" ] && diff -rq -x __pycache__ "$staging" "$LIB" >/dev/null 2>&1; then
        rm -rf "$staging"
    else
        if [ -e "$LIB" ]; then
            mv -T "$LIB" "$BACKUP/lib"
            undo "rm -rf $(q "$LIB"); mv -T $(q "$BACKUP/lib") $(q "$LIB")"
        else
            undo "rm -rf $(q "$LIB")"
        fi
        mv -T "$staging" "$LIB"
        say "installed the package in $LIB"
        CHANGED=1
    fi
    # compile once now, so that hooks never write bytecode at guest start
    "$PY" -m compileall -q "$LIB/kvmufw_hook" >/dev/null 2>&1 || true
    awk -v d="$LIB/" '!($1 == "file" && index($3, d) == 1)' "$MANIFEST_NEW" > "$MANIFEST_NEW.tmp"
    mv -f "$MANIFEST_NEW.tmp" "$MANIFEST_NEW"
    while read -r f; do manifest_file "$f"; done < <(find "$LIB" -name __pycache__ -prune -o -type f -print | sort)
    put_file "$BIN" 755 < <(bin_script)
}

# hooks_found DRV: libvirt runs hooks of DRV only if, when it started (or at its last
# SIGHUP), /etc/libvirt/hooks/DRV was executable or DRV.d held an executable entry.
hooks_found() {
    [ -f "$HOOKS/$1" ] && [ -x "$HOOKS/$1" ] && return 0
    [ -d "$HOOKS/$1.d" ] && [ -n "$(find -L "$HOOKS/$1.d" -mindepth 1 -maxdepth 1 -type f -perm /111 2>/dev/null | head -n1)" ]
}

# claimed_hook PATH: PATH is a drop-in of ours, or a plain hook file an install recorded
# or marked (the main hook files are ours only where an install wrote them, libvirt < 6.5:
# elsewhere they are the admin's).
claimed_hook() {
    case $1 in
        */kvmufw_hook) return 0 ;;
        *) [ -n "$(recorded_sha "$1")" ] || { [ -f "$1" ] && grep -qF "$MARK" "$1"; } ;;
    esac
}

hook_driver() {  # hook_driver PATH: network or qemu
    local drv
    drv=$(basename "$1"); [ "$drv" = kvmufw_hook ] && drv=$(basename "$(dirname "$1")" .d)
    echo "$drv"
}

# retire_hooks NETWORK QEMU: remove our hooks of the other layout. libvirt >= 6.5 runs
# hooks/DRV and every DRV.d/ entry: after a libvirt upgrade both of ours would run.
retire_hooks() {
    local drv path backup
    for drv in network qemu; do
        for path in "$HOOKS/$drv" "$HOOKS/$drv.d/kvmufw_hook"; do
            case $path in "$1"|"$2") continue ;; esac
            if [ ! -e "$path" ] || ! claimed_hook "$path"; then continue; fi
            if ! ours "$path" "$(hook_script "$drv" | sha_of_stdin)"; then
                say "left $path alone: not as kvmufw_hook wrote it (an older hook of ours? then remove it by hand)"
                continue
            fi
            backup="$BACKUP/$(echo "$path" | tr / _)"
            cp -p "$path" "$backup"
            undo "mv -f $(q "$backup") $(q "$path")"
            rm -f "$path"
            awk -v p="$path" '!($1 == "file" && $3 == p)' "$MANIFEST_NEW" > "$MANIFEST_NEW.tmp"
            mv -f "$MANIFEST_NEW.tmp" "$MANIFEST_NEW"
            say "removed $path: kvmufw_hook's hooks are $1 and $2 for this libvirt"
            CHANGED=1
        done
    done
}

install_hooks() {
    local paths network qemu
    paths=$(hook_paths)
    network=${paths% *}; qemu=${paths#* }
    put_file "$network" 755 < <(hook_script network)
    put_file "$qemu" 755 < <(hook_script qemu)
    retire_hooks "$network" "$qemu"
    # the one record of which hooks are ours (`kvmufw_hook doctor` reads it): this run's
    awk '$1 != "hook"' "$MANIFEST_NEW" > "$MANIFEST_NEW.tmp"
    mv -f "$MANIFEST_NEW.tmp" "$MANIFEST_NEW"
    manifest_add "hook network $network"
    manifest_add "hook qemu $qemu"
}

# rewrite_after_init: stdin becomes after.init, with its owner and mode, atomically.
rewrite_after_init() {
    local tmp
    tmp=$(mktemp /etc/ufw/.after.init.XXXXXX)
    undo "rm -f $(q "$tmp")"
    cat > "$tmp"
    chown --reference="$AFTER_INIT" "$tmp"; chmod --reference="$AFTER_INIT" "$tmp"
    mv -f -T "$tmp" "$AFTER_INIT"
}

install_after_init() {
    local lines old new
    if [ ! -d /etc/ufw ]; then
        say "UFW is not installed: no after.init entry (run kvmufw_hook restore after a firewall reload)"
        return 0
    fi
    if [ ! -e "$AFTER_INIT" ]; then
        put_file "$AFTER_INIT" 755 < <(echo "#!/bin/sh"; after_init_block)
        manifest_add "created $AFTER_INIT"
        manifest_add "block $(after_init_block | sha_of_stdin) $AFTER_INIT"
        return 0
    fi
    cp -p "$AFTER_INIT" "$BACKUP/after.init"
    lines=$(block_lines "$AFTER_INIT")
    if [ "$lines" = "0 0" ]; then
        undo "mv -f -T $(q "$BACKUP/after.init") $(q "$AFTER_INIT")"
        if head -n1 "$AFTER_INIT" | grep -q '^#!'; then
            # the shebang on a line of its own, even in a file without a final newline
            rewrite_after_init < <(head -n1 "$AFTER_INIT" | sed '$a\'; after_init_block
                                   tail -n +2 "$AFTER_INIT")
        else
            rewrite_after_init < <(after_init_block; cat "$AFTER_INIT")
        fi
        say "added the restore entry to $AFTER_INIT"
        CHANGED=1
    elif [ "$(block_sha "$AFTER_INIT" "$lines")" != "$(after_init_block | sha_of_stdin)" ]; then
        undo "mv -f -T $(q "$BACKUP/after.init") $(q "$AFTER_INIT")"
        rewrite_after_init < <(sed -n "1,$(( ${lines% *} - 1 ))p" "$AFTER_INIT"; after_init_block
                               sed -n "$(( ${lines#* } + 1 )),\$p" "$AFTER_INIT")
        say "replaced the kvmufw_hook entry in $AFTER_INIT by the current one (restore, bounded)"
        CHANGED=1
    fi
    manifest_add "block $(after_init_block | sha_of_stdin) $AFTER_INIT"
    if [ ! -x "$AFTER_INIT" ]; then
        old=$(stat -c %a "$AFTER_INIT")
        new=$(printf '%o' $(( (8#$old | 8#100) & ~8#022 )))
        manifest_add "mode $old $AFTER_INIT"
        chmod "$new" "$AFTER_INIT"
        undo "chmod $old $(q "$AFTER_INIT")"
        say "made $AFTER_INIT executable (mode $old -> $new) so UFW runs it"
        CHANGED=1
    fi
}

install_systemd() {
    local unit before=$CHANGED
    [ -d /run/systemd/system ] || return 0
    for unit in $SYSTEMD_UNITS; do
        put_file "/etc/systemd/system/$unit.service.d/kvmufw_hook.conf" 644 < <(dropin)
    done
    if [ "$CHANGED" != "$before" ]; then
        undo "systemctl daemon-reload"
        systemctl daemon-reload || say "systemctl daemon-reload failed; run it by hand"
    fi
}

write_manifest() {
    local tmp
    if [ -d "$MANIFEST_DIR" ]; then
        chmod 700 "$MANIFEST_DIR"
    else
        mkdir -m 700 "$MANIFEST_DIR"
        undo "rm -rf $(q "$MANIFEST_DIR")"
    fi
    sort -u -o "$MANIFEST_NEW" "$MANIFEST_NEW"  # one order, so an unchanged install rewrites nothing
    cmp -s "$MANIFEST_NEW" "$MANIFEST" 2>/dev/null && return 0
    [ -e "$MANIFEST" ] && { cp -p "$MANIFEST" "$BACKUP/manifest"
                            undo "mv -f $(q "$BACKUP/manifest") $(q "$MANIFEST")"; }
    tmp=$(mktemp "$MANIFEST_DIR/.manifest.XXXXXX")
    cat "$MANIFEST_NEW" > "$tmp"
    chmod 600 "$tmp"
    mv -f -T "$tmp" "$MANIFEST"
}

# running_daemons: "NAME PID URI DRIVERS" of each running libvirt daemon whose pid file
# names a live process of that name (a stale pid file may name someone else's process).
running_daemons() {
    local name pid
    for name in libvirtd virtnetworkd virtqemud; do
        [ -f "/run/$name.pid" ] || continue
        pid=$(cat "/run/$name.pid" 2>/dev/null || true)
        case "$pid" in ''|*[!0-9]*) continue ;; esac
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || continue
        case $name in
            libvirtd) echo "$name $pid qemu:///system network qemu" ;;
            virtqemud) echo "$name $pid qemu:///system qemu" ;;
            virtnetworkd) echo "$name $pid network:///system network" ;;
        esac
    done
}

# libvirt_reachable: a daemon runs, or systemd starts one on the first connection (a
# socket-activated daemon exits when idle, while its networks keep running).
libvirt_reachable() {
    local unit
    [ -n "$(running_daemons)" ] && return 0
    [ -d /run/systemd/system ] || return 1
    for unit in libvirtd.socket virtqemud.socket; do
        systemctl is-active --quiet "$unit" 2>/dev/null && return 0
    done
    return 1
}

# answers URI: the daemon takes a call again within DAEMON_WAIT seconds.
answers() {
    local deadline=$((SECONDS + DAEMON_WAIT))
    command -v virsh >/dev/null 2>&1 || return 0
    until "$TIMEOUT" 5 virsh -q -c "$1" version >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# signal_where_needed FOUND: FOUND lists the drivers whose hooks libvirt already found
# before this run wrote anything. A daemon that runs a driver whose hooks it did not find
# gets exactly one SIGHUP (it re-reads the hook directory then).
signal_where_needed() {
    local found=$1 name pid uri drivers drv missing
    while read -r name pid uri drivers; do
        [ -n "$name" ] || continue
        missing=""
        for drv in $drivers; do
            case " $found " in *" $drv "*) ;; *) missing="$missing $drv" ;; esac
        done
        if [ -z "$missing" ]; then
            [ "$CHANGED" = 1 ] && say "$name ($pid) runs the hooks in $HOOKS already: no SIGHUP needed"
            continue
        fi
        missing=${missing# }; missing=${missing// / or }   # "network or qemu"
        answers "$uri" || say "$name ($pid) does not answer on $uri; sending the SIGHUP anyway"
        if ! kill -HUP "$pid" 2>/dev/null; then
            say "$name ($pid) exited before the SIGHUP: it finds the hooks when it starts again"
            continue
        fi
        if answers "$uri"; then
            say "sent one SIGHUP to $name ($pid): it started while no $missing hook existed and would not have run ours; it answers again"
        else
            say "sent one SIGHUP to $name ($pid) (no $missing hook existed when it started); it does not answer within ${DAEMON_WAIT}s: check it"
        fi
    done < <(running_daemons)
}

do_install() {
    local found="" drv
    need_tools
    preflight_install
    install_deps
    # what libvirt can see now, before we write anything
    for drv in network qemu; do
        if hooks_found "$drv"; then found="$found $drv"; fi
    done
    BACKUP=$(mktemp -d /run/kvmufw_hook-install.XXXXXX)  # root-only, gone at reboot
    MANIFEST_NEW=$BACKUP/manifest.new
    if [ -f "$MANIFEST" ]; then cp "$MANIFEST" "$MANIFEST_NEW"; else : > "$MANIFEST_NEW"; fi
    CHANGED=0
    WRITING=1
    install_package
    install_hooks
    install_after_init
    install_systemd
    write_manifest
    WRITING=0
    UNDO=()
    signal_where_needed "$found"
    # doctor: as of now every running daemon runs the hooks (by SIGHUP or since its start)
    if [ "$CHANGED" = 1 ] && [ -n "$(running_daemons)" ]; then
        echo "the running libvirt daemons run these hooks since this time" > "$SIGHUP_STAMP"
        chmod 600 "$SIGHUP_STAMP"
    fi
    [ "$CHANGED" = 1 ] || say "already installed: nothing to change"
    if libvirt_reachable; then
        # bounded: a libvirt that does not answer must not hang the install
        if "$TIMEOUT" 120 "$BIN" replay; then
            say "done"
        else
            say "installed, but replay reported problems (see above); run: kvmufw_hook replay"
        fi
    else
        say "done; libvirt is not running: rules are added as networks and guests start"
    fi
}

# --------------------------------------------------------------------------- uninstall

# remove_ours PATH [SHA...]: remove PATH if it is ours; say why not otherwise.
remove_ours() {
    local path=$1
    shift
    if [ -L "$path" ]; then
        say "left $path alone: it is a symlink, not a file kvmufw_hook wrote"
    elif ours "$path" "$@"; then
        rm -f "$path"
        say "removed $path"
    elif [ -e "$path" ]; then
        say "left $path alone: not as kvmufw_hook wrote it (changed since, or someone else's)"
    fi
}

uninstall_after_init() {
    local lines mode new tmp
    if [ -L "$AFTER_INIT" ]; then
        if grep -qxF -e "$BEGIN" -e "$END" "$AFTER_INIT" 2>/dev/null; then
            say "left $AFTER_INIT alone: it is a symlink (to $(readlink "$AFTER_INIT")); remove the kvmufw_hook block from $(readlink -f "$AFTER_INIT") by hand"
        fi
        return 0
    fi
    [ -f "$AFTER_INIT" ] || return 0
    if ! lines=$(block_lines "$AFTER_INIT"); then
        say "left $AFTER_INIT unchanged: its kvmufw_hook block is not whole ('$BEGIN' or '$END' missing or repeated); remove what is left of it by hand"
        return 0
    fi
    if [ "$lines" != "0 0" ]; then
        if ! known_block "$(block_sha "$AFTER_INIT" "$lines")"; then
            say "left $AFTER_INIT unchanged: its kvmufw_hook block (lines ${lines/ /-}) was changed since install; remove it by hand"
            return 0
        fi
        tmp=$(mktemp /etc/ufw/.after.init.XXXXXX)
        sed "${lines% *},${lines#* }d" "$AFTER_INIT" > "$tmp"
        chown --reference="$AFTER_INIT" "$tmp"; chmod --reference="$AFTER_INIT" "$tmp"
        mv -f -T "$tmp" "$AFTER_INIT"
        say "removed the kvmufw_hook entry from $AFTER_INIT"
        if manifest_has "created $AFTER_INIT" && [ "$(cat "$AFTER_INIT")" = "#!/bin/sh" ]; then
            rm -f "$AFTER_INIT"
            say "removed $AFTER_INIT"
            return 0
        fi
    fi
    # put back the mode install changed, unless someone changed it since
    mode=$(grep -E "^mode [0-7]+ $AFTER_INIT\$" "$MANIFEST" 2>/dev/null | head -n1 | cut -d' ' -f2 || true)
    if [ -n "$mode" ]; then
        new=$(printf '%o' $(( (8#$mode | 8#100) & ~8#022 )))
        if [ "$(stat -c %a "$AFTER_INIT")" = "$new" ]; then
            chmod "$mode" "$AFTER_INIT"
            say "put back the mode of $AFTER_INIT ($mode)"
        fi
    fi
}

uninstall_package() {
    local f left
    if [ -L "$LIB" ]; then
        say "left $LIB alone: it is a symlink"
        return 0
    fi
    [ -d "$LIB" ] || return 0
    if legacy_lib; then
        rm -rf "$LIB"
        say "removed $LIB"
        return 0
    fi
    find "$LIB" -name __pycache__ -type d -prune -exec rm -rf {} +
    find "$LIB" ! -type d | while read -r f; do ours "$f" && rm -f "$f"; done
    find "$LIB" -depth -type d -empty -delete
    if [ -e "$LIB" ]; then
        left=$(find "$LIB" ! -type d | head -n3 | tr '\n' ' ')
        say "left $LIB: it holds files kvmufw_hook did not write or that changed since: $left"
    else
        say "removed $LIB"
    fi
}

# end_watchers: stop the jump watchers libvirt's unit started (restore --jumps-only
# --watch, at most 40 s old), so that none puts a jump or the state directory back.
end_watchers() {
    local pid args
    for pid in $(pgrep -f -- "$BIN restore --jumps-only --watch" 2>/dev/null || true); do
        args=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)
        case $args in
            *"$BIN restore --jumps-only --watch "*) kill "$pid" 2>/dev/null || true ;;
        esac
    done
}

do_uninstall() {
    local path unit
    tool_paths
    end_watchers
    if ours "$BIN" "$(bin_script | sha_of_stdin)"; then
        "$BIN" flush || say "could not flush the rules; run: $BIN flush"
    else
        say "$BIN is missing or not as kvmufw_hook wrote it: our rules are left in place"
    fi
    for path in "$HOOKS/network.d/kvmufw_hook" "$HOOKS/qemu.d/kvmufw_hook" "$HOOKS/network" "$HOOKS/qemu"; do
        claimed_hook "$path" || continue
        remove_ours "$path" "$(hook_script "$(hook_driver "$path")" | sha_of_stdin)"
    done
    uninstall_after_init
    for unit in $SYSTEMD_UNITS; do
        remove_ours "/etc/systemd/system/$unit.service.d/kvmufw_hook.conf" \
            "$(dropin | sha_of_stdin)" "$(legacy_dropin | sha_of_stdin)"
        rmdir "/etc/systemd/system/$unit.service.d" 2>/dev/null || true
    done
    [ -d /run/systemd/system ] && { systemctl daemon-reload || true; }
    remove_ours "$BIN" "$(bin_script | sha_of_stdin)"
    uninstall_package
    if [ -f "$MANIFEST" ]; then  # directories we created, deepest first, if left empty
        grep '^dir ' "$MANIFEST" | cut -d' ' -f2- | sort -r | while read -r dir; do
            [ -L "$dir" ] || rmdir "$dir" 2>/dev/null || true
        done
    fi
    rm -rf "$STATE_DIR" "$MANIFEST_DIR"
    # no SIGHUP: a daemon that still believes hooks exist finds none and runs nothing
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
trap on_exit EXIT
"$action"
