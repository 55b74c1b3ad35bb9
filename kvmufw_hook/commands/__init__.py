"""The commands of ``kvmufw_hook``, one module per command group. Each module declares its
command line and its handler: ``register(parser, name)`` fills the parser ``cli.py`` made
for the command ``name`` (its options, its description, ``set_defaults(func=handler)``),
and the handler takes the parsed arguments and returns the exit status. ``cli.py`` lists
the commands and imports a module only when its command runs."""

from __future__ import annotations

import argparse
import json
import sys


def add_connect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--connect", default="qemu:///system", metavar="URI",
                        help="libvirt URI (default: %(default)s)")


def describe(parser: argparse.ArgumentParser, description: str, epilog: str) -> None:
    """A command's own ``--help``: what it does, then examples (kept as written)."""
    parser.description, parser.epilog = description, epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def write_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def refusals(what: str, problems: list[str]) -> int:
    """Each refusal on stderr and in syslog; exit status 1 if there was any."""
    from ..log import log
    for problem in problems:
        log(f"{what}: refused: {problem}", error=True)
    return 1 if problems else 0
