"""The ``kvmufw_hook`` command. ``main(argv) -> int``; exit 0 success, 1 failure,
2 bad usage or bad input. Each command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .errors import ApplyError, InputError

EPILOG = """examples:
  kvmufw_hook plan /etc/libvirt/qemu/networks/default.xml web1.xml
  kvmufw_hook replay --dry-run
  kvmufw_hook forward add web1 2222:22
  kvmufw_hook status --json
  kvmufw_hook doctor
"""


def _err(message: object) -> None:
    from .errors import printable
    sys.stderr.write(f"kvmufw_hook: {printable(' '.join(str(message).split()))}\n")


def cmd_plan(args) -> int:
    """Print what the given XML files would apply on a host with none of our rules, in
    the host's firewall backend's terms (iptables: one restore payload per family)."""
    from .backends import default_backend
    from .hostplan import plan_host
    from .model import Domain, Network
    from .parse import parse_any

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


def _refusals(what: str, problems: list[str]) -> int:
    """Each refusal on stderr and in syslog; exit status 1 if there was any."""
    from .log import log
    for problem in problems:
        log(f"{what}: refused: {problem}", error=True)
    return 1 if problems else 0


def cmd_replay(args) -> int:
    from .log import log
    from .ops import replay
    from .virt import live_xml
    nets, doms = live_xml(args.connect)
    result = replay(nets, doms, dry_run=args.dry_run, log=log)
    if args.dry_run:
        sys.stdout.write(result.payload or "# nothing to change\n")
    else:
        changed = "changed" if result.payload else "already up to date"
        print(f"replayed {len(nets)} network(s), {len(doms)} running domain(s): "
              f"{result.owners} owner(s) with rules, {changed}")
    return _refusals("replay", result.problems)


def cmd_restore(args) -> int:
    from .log import log
    from .ops import restore
    if args.watch:
        if not args.jumps_only:
            raise InputError("--watch goes with --jumps-only")
        from .ops import watch_jumps
        repaired = watch_jumps(args.watch, log=log, lock_timeout=args.wait)
        print(f"our jumps put back first {repaired} time(s) in {args.watch:g} s")
        return 0
    result = restore(jumps_only=args.jumps_only, log=log, lock_timeout=args.wait)
    if args.jumps_only:
        print("our jumps put back first" if result.payload else "our jumps are in place")
    else:
        changed = "changed" if result.payload else "already up to date"
        print(f"restored {result.owners} owner(s) from kvmufw_hook's state: {changed}")
    return _refusals("restore", result.problems)


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
    from .log import log
    from .ops import flush
    result = flush()
    if result.payload:
        log("flush: removed all kvmufw rules and chains")
    print("removed all kvmufw rules and chains" if result.payload
          else "no kvmufw rules or chains present")
    return 0


def cmd_forward(args) -> int:
    from . import edit
    from .log import log
    if args.action == "list":
        if len(args.args) > 1 or (args.network and args.args):
            raise InputError("usage: kvmufw_hook forward list [DOMAIN | --network NAME]")
        rows = edit.list_forwards(args.connect, args.args[0] if args.args else None,
                                  args.network)
        if args.json:
            json.dump(rows, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        sys.stdout.write(edit.format_list(rows))
        return 0
    expected = 1 if args.network else 2
    if len(args.args) != expected:
        raise InputError(f"usage: kvmufw_hook forward {args.action} "
                         + ("--network NAME SPEC" if args.network else "DOMAIN SPEC")
                         + "  (SPEC: HOST_PORT[:GUEST_PORT][/PROTO])")
    target, spec_text = (args.network, args.args[0]) if args.network else args.args
    spec = edit.parse_spec(spec_text)
    if args.action == "remove":
        extra = [o for o in ("source", "mac", "comment", "guest_ip", "guest_mac")
                 if getattr(args, o, None) is not None] + \
            (["allow_host_service"] if args.allow_host_service else [])
        if extra or ":" in spec_text:
            raise InputError("forward remove takes only DOMAIN (or --network NAME), "
                             "HOST_PORT[/PROTO] and --host-ip")
        if args.host_ip is not None:
            spec["host-ip"] = args.host_ip
    else:
        # `is not None`: an empty value (--source '') is checked, and refused, as typed
        for option, attr in (("source", "source"), ("host_ip", "host-ip"),
                             ("comment", "comment"), ("mac", "mac"),
                             ("guest_ip", "guest-ip"), ("guest_mac", "guest-mac")):
            if getattr(args, option, None) is not None:
                spec[attr] = getattr(args, option)
        if args.allow_host_service:
            spec["allow-host-service"] = "yes"
        if args.network and not (args.guest_ip or args.guest_mac):
            raise InputError("a network forward needs --guest-ip or --guest-mac")
        if args.network and args.mac:
            raise InputError("--mac picks a domain's NIC; with --network use --guest-mac")
        if not args.network and (args.guest_mac):
            raise InputError("--guest-mac is for --network forwards; a domain forward "
                             "picks its NIC with --mac")
        label = f"{'network' if args.network else 'domain'} '{target}'"
        edit.validate_spec(spec, bool(args.network), label)
    change = edit.edit_network if args.network else edit.edit_domain
    message = change(args.connect, target, args.action, spec, log=log)
    log(message)
    print(message)
    return 0


def cmd_doctor(args) -> int:
    from . import doctor
    findings = doctor.run(args.connect)
    if args.json:
        json.dump(doctor.as_json(findings), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(doctor.format_findings(findings))
    return 1 if any(f.level == "FAIL" for f in findings) else 0


def cmd_install(args) -> int:
    from .commands import install
    action = args.command if args.command != "ufw-entry" else f"ufw-entry-{args.action}"
    return install.run(action, root=args.root, source=getattr(args, "source", ""),
                       prefix=getattr(args, "prefix", "/usr/local"),
                       packaged=getattr(args, "packaged", False))


def _add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="", metavar="DIR",
                        help="the host's file system under DIR (a mounted image, a test's "
                        "temporary directory): no daemon is told, no rule is applied")


def _add_connect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--connect", default="qemu:///system", metavar="URI",
                        help="libvirt URI (default: %(default)s)")


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
    _add_connect(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("restore", help="put our rules back from our own state (no libvirt)",
                       description="Re-apply the rules of the networks and guests that the "
                       "hooks recorded, and put our jumps first, without connecting to "
                       "libvirt: safe from UFW's after.init and from libvirt's own unit at "
                       "boot. Rules of owners the state does not know are left alone (replay "
                       "decides those).", epilog="example:\n  kvmufw_hook restore",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jumps-only", action="store_true",
                   help="only put our jumps back at position 1 (after a libvirt start)")
    p.add_argument("--watch", type=float, default=0, metavar="SECONDS",
                   help="with --jumps-only: keep putting them back for SECONDS (libvirt "
                   "reloads its rules a few seconds after it starts)")
    p.add_argument("--wait", type=float, default=10, metavar="SECONDS",
                   help="how long to wait for a running hook to finish (default: %(default)s)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("status", help="each forward, its target and whether its rules are in",
                       epilog="example:\n  kvmufw_hook status --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "forward", help="add, remove or list port forwards (edits the metadata, applies now)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Edit the forwards metadata through libvirt and apply it at once: a "
        "running guest keeps running; a network's persistent definition is updated and its "
        "rules applied now. Everything is checked before anything is written.",
        epilog="examples:\n"
        "  kvmufw_hook forward add web1 2222:22\n"
        "  kvmufw_hook forward add web1 6000-6002:5000-5002/udp --source 198.51.100.0/24\n"
        "  kvmufw_hook forward add --network lab 8080:80 --guest-mac 52:54:00:00:00:20\n"
        "  kvmufw_hook forward remove web1 2222/tcp [--host-ip IP]\n"
        "  kvmufw_hook forward list web1")
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("args", nargs="*", metavar="DOMAIN SPEC",
                   help="the domain (unless --network) and HOST_PORT[:GUEST_PORT][/PROTO]")
    p.add_argument("--network", metavar="NAME", help="a network forward instead of a domain's")
    p.add_argument("--source", metavar="CIDR[,CIDR…]", help="only from these addresses")
    p.add_argument("--host-ip", metavar="IP", help="only to this host address")
    p.add_argument("--mac", metavar="MAC", help="domain: which NIC")
    p.add_argument("--guest-ip", metavar="IP", help="the guest's address")
    p.add_argument("--guest-mac", metavar="MAC",
                   help="network: resolve the guest through <dhcp><host>")
    p.add_argument("--comment", metavar="TEXT", help="shown by status and list")
    p.add_argument("--allow-host-service", action="store_true",
                   help="set allow-host-service=yes (grants nothing by itself: root "
                   "allows host services in /etc/kvmufw_hook/kvmufw_hook.conf)")
    p.add_argument("--json", action="store_true", help="list: machine-readable output")
    _add_connect(p)
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("doctor", help="check the host; each finding with its fix",
                       epilog="example:\n  kvmufw_hook doctor --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Check IP forwarding, UFW, libvirt's firewall backend and "
                       "chains, our jumps, the hooks, and every forward. Exit 1 if anything "
                       "FAILs.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_connect(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("flush", help="remove all our rules and chains",
                       epilog="example:\n  kvmufw_hook flush",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_flush)

    for name, what in (("install", "install the hooks (and, from the source tree, the "
                        "package), tell libvirt, re-apply every rule"),
                       ("uninstall", "remove every rule and everything install wrote")):
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ". "
                           "Never overwrites, deletes or follows a file it did not write.",
                           epilog="example:\n  sudo ./install.sh"
                           f"{' --uninstall' * (name == 'uninstall')}   (from the source tree)\n"
                           f"  kvmufw_hook {name} --packaged"
                           "   (the Debian package's maintainer scripts)",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--source", default="", metavar="DIR",
                       help="the source tree to install from (install.sh passes it)")
        p.add_argument("--prefix", default="/usr/local", metavar="DIR",
                       help="with --source: where the package and command go "
                       "(default: %(default)s)")
        p.add_argument("--packaged", action="store_true",
                       help="the Debian package's files, which dpkg owns")
        _add_root(p)
        p.set_defaults(func=cmd_install)

    p = sub.add_parser("ufw-entry", help="add (or remove) the entry in UFW's after.init that "
                       "puts our rules back after every ufw reload",
                       epilog="example:\n  kvmufw_hook ufw-entry add",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("add", "remove"))
    _add_root(p)
    p.set_defaults(func=cmd_install)
    return parser


NEEDS_ROOT = (cmd_replay, cmd_restore, cmd_status, cmd_flush, cmd_doctor, cmd_install)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # `forward add --network lab 8080:80`: positionals after an option land in extra
        if extra and getattr(args, "func", None) is cmd_forward \
                and not any(e.startswith("-") for e in extra):
            args.args += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse: --help/--version exit 0, bad usage exits 2
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if args.verbose:
        from . import log
        log.VERBOSE = True
    if os.geteuid() != 0 and not getattr(args, "root", "") and (
            args.func in NEEDS_ROOT or (args.func is cmd_forward and args.action != "list")):
        _err(f"{args.command} needs root (it reads and changes the firewall): "
             f"sudo kvmufw_hook {args.command} ...")
        return 1
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
