"""``kvmufw_hook restore``: our rules back from our own state, without libvirt (UFW's
after.init, libvirt's unit at boot)."""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..log import log
from ..ops import restore, watch_jumps
from . import describe, refusals


def register(parser: argparse.ArgumentParser, name: str) -> None:
    describe(parser, "Re-apply the rules of the networks and guests that the hooks recorded, "
             "and put our jumps first, without connecting to libvirt: safe from UFW's "
             "after.init and from libvirt's own unit at boot. Rules of owners the state does "
             "not know are left alone (replay decides those).",
             "example:\n  kvmufw_hook restore")
    parser.add_argument("--jumps-only", action="store_true",
                        help="only put our jumps back at position 1 (after a libvirt start)")
    parser.add_argument("--watch", type=float, default=0, metavar="SECONDS",
                        help="with --jumps-only: keep putting them back for SECONDS (libvirt "
                        "reloads its rules a few seconds after it starts)")
    parser.add_argument("--wait", type=float, default=10, metavar="SECONDS",
                        help="how long to wait for a running hook to finish "
                        "(default: %(default)s)")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    if args.watch:
        if not args.jumps_only:
            raise InputError("--watch goes with --jumps-only")
        repaired = watch_jumps(args.watch, log=log, lock_timeout=args.wait)
        print(f"our jumps put back first {repaired} time(s) in {args.watch:g} s")
        return 0
    result = restore(jumps_only=args.jumps_only, log=log, lock_timeout=args.wait)
    if args.jumps_only:
        print("our jumps put back first" if result.payload else "our jumps are in place")
    else:
        changed = "changed" if result.payload else "already up to date"
        print(f"restored {result.owners} owner(s) from kvmufw_hook's state: {changed}")
    return refusals("restore", result.problems)
