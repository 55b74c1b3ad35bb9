"""``kvmufw_hook flush``: every rule and chain of ours out."""

from __future__ import annotations

import argparse

from ..log import log
from ..ops import flush
from . import describe


def register(parser: argparse.ArgumentParser, name: str) -> None:
    describe(parser, "Remove all our rules and chains.",
             "example:\n  kvmufw_hook flush")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    result = flush()
    if result.payload:
        log("flush: removed all kvmufw rules and chains")
    print("removed all kvmufw rules and chains" if result.payload
          else "no kvmufw rules or chains present")
    return 0
