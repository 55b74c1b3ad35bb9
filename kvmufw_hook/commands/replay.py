"""``kvmufw_hook replay``: every rule re-derived from libvirt's live state."""

from __future__ import annotations

import argparse
import sys

from ..log import log
from ..ops import replay
from ..virt import live_xml
from . import add_connect, describe, refusals


def register(parser: argparse.ArgumentParser, name: str) -> None:
    describe(parser, "Re-derive every rule from the active networks and running guests: add "
             "what is missing, remove our stale rules, put our jumps first.",
             "example:\n  kvmufw_hook replay --dry-run")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the change instead of applying it")
    add_connect(parser)
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    nets, doms = live_xml(args.connect)
    result = replay(nets, doms, dry_run=args.dry_run, log=log)
    if args.dry_run:
        sys.stdout.write(result.payload or "# nothing to change\n")
    else:
        changed = "changed" if result.payload else "already up to date"
        print(f"replayed {len(nets)} network(s), {len(doms)} running domain(s): "
              f"{result.owners} owner(s) with rules, {changed}")
    return refusals("replay", result.problems)
