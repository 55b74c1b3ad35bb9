#!/bin/sh
# Build the Debian package kvmufw-hook:   ./build-deb.sh [OUTDIR]   (default: dist/)
# Runs `dpkg-buildpackage -us -uc -b` in a copy of this tree (dpkg-buildpackage writes
# into the parent directory), puts kvmufw-hook_VERSION_all.deb in OUTDIR and runs lintian
# on it. Needs: apt install dpkg-dev debhelper dh-python pybuild-plugin-pyproject
# python3-all python3-setuptools lintian
set -eu
# the distribution's python3 and tools, whatever else is first on PATH (pyenv, a venv)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
SRC=$(cd "$(dirname "$0")" && pwd)
OUT=$(mkdir -p "${1:-$SRC/dist}" && cd "${1:-$SRC/dist}" && pwd)
WORK=$(mktemp -d /tmp/kvmufw-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/kvmufw-hook"
# the tree as it is (committed or not), without what git ignores
(cd "$SRC" && git ls-files -co --exclude-standard -z 2>/dev/null | xargs -0 tar -cf - 2>/dev/null \
    || tar -cf - --exclude=.git --exclude=dist .) | tar -xf - -C "$WORK/kvmufw-hook"
(cd "$WORK/kvmufw-hook" && dpkg-buildpackage -us -uc -b >"$WORK/build.log" 2>&1) || {
    tail -n 40 "$WORK/build.log" >&2
    echo "build-deb.sh: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
for deb in "$WORK"/*.deb; do
    cp "$deb" "$OUT/"
    echo "built $OUT/$(basename "$deb")"
    if command -v lintian >/dev/null 2>&1; then
        lintian --fail-on error,warning "$OUT/$(basename "$deb")"
    fi
done
