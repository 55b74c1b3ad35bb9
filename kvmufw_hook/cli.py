"""The ``kvmufw_hook`` command. ``main(argv) -> int``; exit 0 success, 1 failure,
2 bad usage or bad input.

The command line is declared, not parsed by hand: ``COMMANDS`` lists each command, the
module under ``kvmufw_hook/commands/`` that declares it, and its one-line help. A module is
imported only when its command is the one given (``register`` fills that command's parser,
``func`` is its handler), so that ``kvmufw_hook restore`` loads nothing of ``doctor``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import import_module
from typing import Any, NoReturn

from . import __version__
from .errors import ApplyError, InputError, printable

# name, module under kvmufw_hook/commands/, one-line help (``kvmufw_hook --help``)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("plan", "plan", "print the rules that XML files would apply (no root)"),
    ("replay", "replay", "re-apply every rule from libvirt's live state"),
    ("restore", "restore", "put our rules back from our own state (no libvirt)"),
    ("status", "status", "each forward, its target and whether its rules are in"),
    ("forward", "forward",
     "add, remove or list port forwards (edits the metadata, applies now)"),
    ("doctor", "doctor", "check the host; each finding with its fix"),
    ("flush", "flush", "remove all our rules and chains"),
    ("install", "install", "install the hooks (and, from the source tree, the package), "
     "tell libvirt, re-apply every rule"),
    ("uninstall", "install", "remove every rule and everything install wrote"),
    ("ufw-entry", "install", "add (or remove) the entry in UFW's after.init that puts our "
     "rules back after every ufw reload"),
)

EPILOG = """examples:
  kvmufw_hook plan /etc/libvirt/qemu/networks/default.xml web1.xml
  kvmufw_hook replay --dry-run
  kvmufw_hook forward add web1 2222:22
  kvmufw_hook status --json
  kvmufw_hook doctor
"""


def _err(message: object) -> None:
    sys.stderr.write(f"kvmufw_hook: {printable(' '.join(str(message).split()))}\n")


class Parser(argparse.ArgumentParser):
    """Every parser of the command line: bad usage is one line on stderr and exit
    status 2 (``--help`` says the rest)."""

    _intermixed = False

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        _err(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")
        raise SystemExit(2)

    def parse_known_args(  # type: ignore[override]
            self, args: Sequence[str] | None = None,
            namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """A command's own parser takes its options and positionals in any order
        (``forward add web1 --source 10.0.0.0/8 2222:22``) and says what it does not take
        (``forward add: unrecognized arguments: ...``), not the top one after it."""
        if self._subparsers is not None or self._intermixed:
            return super().parse_known_args(args, namespace)
        self._intermixed = True  # parse_known_intermixed_args calls back here (3.11)
        try:
            parsed, extra = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra


class _Command(Parser):
    """A command's parser, filled in by its module (``register``) when the command line
    names it: before parsing its arguments or printing its help."""

    def __init__(self, *, module: str = "", command: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._module, self._command = module, command

    def parse_known_args(  # type: ignore[override]
            self, args: Sequence[str] | None = None,
            namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if self._module:
            module, self._module = import_module(f".commands.{self._module}", __package__), ""
            self.set_defaults(needs_root=True)  # unless the module says otherwise
            module.register(self, self._command)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kvmufw_hook", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="libvirt hooks for KVM guests beside UFW: NAT, forwarding and port "
                    "forwards from libvirt XML metadata.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"kvmufw_hook {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="say more on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Command)
    for name, module, what in COMMANDS:
        sub.add_parser(name, help=what, module=module, command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, bad usage exits 2
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if args.verbose:
        from . import log
        log.VERBOSE = True
    # a command on the host's firewall needs root; one on a file tree (--root DIR) does not
    if args.needs_root and os.geteuid() != 0 and not getattr(args, "root", ""):
        _err(f"{args.command} needs root (it reads and changes the firewall): "
             f"sudo kvmufw_hook {args.command} ...")
        return 1
    try:
        return int(args.func(args))
    except InputError as exc:
        _err(exc)
        return 2
    except ApplyError as exc:
        _err(exc)
        return 1
    except KeyboardInterrupt:
        return 1
