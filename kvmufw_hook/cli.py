"""The ``kvmufw_hook`` command. ``main(argv) -> int``; exit 0 success, 1 failure,
2 bad usage or bad input. Each command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import ApplyError, InputError

EPILOG = """examples:
  kvmufw_hook plan /etc/libvirt/qemu/networks/default.xml web1.xml
  kvmufw_hook replay --dry-run
  kvmufw_hook status --json
"""


def _err(message: str) -> None:
    sys.stderr.write(f"kvmufw_hook: {' '.join(str(message).split())}\n")


def cmd_plan(args) -> int:
    """Print the iptables-restore payload that the given XML files would apply on a
    host with none of our rules."""
    from .backends.iptables import IptablesBackend, Snapshot
    from .model import Network
    from .ops import plan_host
    from .parse import parse_any

    networks, domains = {}, {}
    for path in args.files:
        try:
            with open(path, "rb") as fh:
                doc = parse_any(fh.read(), path)
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror}") from None
        (networks if isinstance(doc, Network) else domains)[doc.name] = doc
    host = plan_host(networks, domains)
    if host.problems:
        raise InputError(host.problems[0])
    sys.stdout.write(IptablesBackend.change(Snapshot.parse(""), host.rules))
    return 0


def _libvirt_xml(uri: str) -> tuple[list[bytes], list[bytes]]:
    try:
        import libvirt
    except ImportError:
        raise ApplyError("libvirt-python is not installed (apt install python3-libvirt)") \
            from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
        nets = [n.XMLDesc(0).encode() for n in conn.listAllNetworks(
            libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE)]
        doms = [d.XMLDesc(0).encode() for d in conn.listAllDomains(
            libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        conn.close()
    except libvirt.libvirtError as exc:
        raise ApplyError(f"libvirt ({uri}): {exc}") from None
    return nets, doms


def cmd_replay(args) -> int:
    from .ops import replay
    nets, doms = _libvirt_xml(args.connect)
    result = replay(nets, doms, dry_run=args.dry_run,
                    log=(lambda m: _err(m)) if args.verbose else (lambda m: None))
    for problem in result.problems:
        _err(problem)
    if args.dry_run:
        sys.stdout.write(result.payload or "# nothing to change\n")
    else:
        changed = "changed" if result.payload else "already up to date"
        print(f"replayed {len(nets)} network(s), {len(doms)} running domain(s): "
              f"{result.owners} owner(s) with rules, {changed}")
    return 1 if result.problems else 0


def cmd_status(args) -> int:
    from .status import collect, format_table
    report = collect()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(report))
    return 0


def cmd_flush(args) -> int:
    from .ops import flush
    result = flush()
    print("removed all kvmufw rules and chains" if result.payload
          else "no kvmufw rules or chains present")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmufw_hook", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="libvirt hooks for KVM guests beside UFW: NAT, forwarding and port "
                    "forwards from libvirt XML metadata.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"kvmufw_hook {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="say more on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plan", help="print the rules that XML files would apply (no root)",
                       description="Print the iptables-restore payload for a network and "
                       "domains, as on a host with none of our rules. Needs no root and "
                       "no libvirt.", epilog="example:\n  kvmufw_hook plan net-lab.xml "
                       "web1.xml | iptables-restore --test --noflush",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="XML",
                   help="network and domain XML files (virsh net-dumpxml / dumpxml)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("replay", help="re-apply every rule from libvirt's live state",
                       description="Re-derive every rule from the active networks and "
                       "running guests: add what is missing, remove our stale rules, put "
                       "our jumps first.", epilog="example:\n  kvmufw_hook replay --dry-run",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="print the change instead of applying it")
    p.add_argument("-c", "--connect", default="qemu:///system", metavar="URI",
                   help="libvirt URI (default: %(default)s)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("status", help="each forward, its target and whether its rules are in",
                       epilog="example:\n  kvmufw_hook status --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("flush", help="remove all our rules and chains",
                       epilog="example:\n  kvmufw_hook flush",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_flush)
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
    try:
        return args.func(args)
    except InputError as exc:
        _err(exc)
        return 2
    except ApplyError as exc:
        _err(exc)
        return 1
    except KeyboardInterrupt:
        return 1
