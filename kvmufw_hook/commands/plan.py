"""``kvmufw_hook plan``: what XML files would apply on a host with none of our rules."""

from __future__ import annotations

import argparse
import sys

from ..backends import default_backend
from ..errors import InputError
from ..hostplan import plan_host
from ..model import Domain, Network
from ..parse import parse_any
from . import describe


def register(parser: argparse.ArgumentParser, name: str) -> None:
    describe(parser, "Print the iptables-restore payload for a network and domains, as on a "
             "host with none of our rules. Needs no root and no libvirt.",
             "example:\n  kvmufw_hook plan net-lab.xml web1.xml | iptables-restore --test "
             "--noflush")
    parser.add_argument("files", nargs="+", metavar="XML",
                        help="network and domain XML files (virsh net-dumpxml / dumpxml)")
    parser.set_defaults(func=command, needs_root=False)


def command(args: argparse.Namespace) -> int:
    """Print what the given XML files would apply on a host with none of our rules, in
    the host's firewall backend's terms (iptables: one restore payload per family)."""
    networks: dict[str, Network] = {}
    domains: dict[str, Domain] = {}
    for path in args.files:
        try:
            with open(path, "rb") as fh:
                doc = parse_any(fh.read(), path)
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror}") from None
        if isinstance(doc, Network):
            networks[doc.name] = doc
        else:
            domains[doc.name] = doc
    host = plan_host(networks, domains)
    if host.problems:
        raise InputError(host.problems[0])
    sys.stdout.write(default_backend().render(host.rules))
    return 0
