"""``kvmufw_hook status``: each network and guest we know of, each forward with its
resolved target, and whether its rules are in the kernel right now."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from .. import state
from ..backends import default_backend, libvirt_firewall
from ..backends.base import AnyBackend
from ..errors import ApplyError, InputError, printable
from ..host import network_leases
from ..intents import Intent
from ..model import ForwardSpec
from ..names import domain_owner, network_owner
from ..neighbours import reader
from ..plan import (
    Resolved,
    plan_forwards,
    plan_network,
    resolve_network_forwards,
)
from ..policy import resolve_domain
from . import describe, write_json
from .table import shown_name, table

Row = dict[str, Any]  # one line of the report, as ``--json`` prints it
Check = Callable[[Row, str, Sequence[Intent]], None]  # look up once the kernel is read


def _forward(owner: str, target: Resolved | None, spec: ForwardSpec, error: str | None,
             check: Check) -> Row:
    """One row per forward and family (a dual-stack forward has two)."""
    row = {
        "family": f"ipv{target.family}" if target else None,
        "proto": spec.proto,
        "host_ip": str(spec.host_ip) if spec.host_ip else None,
        "host_port": str(spec.host_port),
        "guest_ip": str(target.guest_ip) if target else None,
        "guest_port": str(spec.guest_port),
        "network": target.network.name if target else None,
        "sources": [str(s) for s in spec.sources],
        "comment": spec.comment,
        "present": False,
    }
    if target:
        check(row, "present", plan_forwards(owner, [target]))
    if error:
        row["error"] = error
    return row


def _forwards(owner: str, specs: Sequence[ForwardSpec],
              resolve: Callable[[], Sequence[Resolved]], check: Check) -> list[Row]:
    """Rows for an owner's forwards: resolved, or each carrying the reason it is not."""
    try:
        return [_forward(owner, t, t.spec, None, check) for t in resolve()]
    except InputError as exc:
        return [_forward(owner, None, s, str(exc), check) for s in specs]


class _Reading(threading.Thread):
    """The firewall read in the background: iptables-save takes about as long as loading
    and planning the state, and while it runs the waiting is in another process."""

    def __init__(self, backend: AnyBackend) -> None:
        super().__init__(name="iptables-save", daemon=True)
        self.backend = backend
        self.snapshot = None
        self.error: str | None = None
        self.failure: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:  # IPv6 where rules of ours are (none there: none present, nothing to read)
            self.snapshot = self.backend.read()
        except ApplyError as exc:
            self.error = str(exc)
        except BaseException as exc:  # raised again in the caller's thread
            self.failure = exc

    def result(self) -> tuple[Any, str | None]:
        self.join()
        if self.failure is not None:
            raise self.failure
        return self.snapshot, self.error


def collect(backend: AnyBackend | None = None) -> Row:
    """Every network and guest of the state with its forwards; whether each one's rules
    are in the kernel is decided once the snapshot is in, from one set of its lines."""
    backend = backend or default_backend()
    reading = _Reading(backend)
    checks: list[tuple[Row, str, Sequence[Intent]]] = []  # (row, key, intents) to look up

    def check(row: Row, key: str, rules: Sequence[Intent]) -> None:
        checks.append((row, key, rules))

    networks = state.load_networks()
    report: Row = {"networks": [], "domains": [], "kernel_error": None,
                    "libvirt_firewall": None}
    for name, net in sorted(networks.items()):
        if not net.managed:
            continue
        owner = network_owner(name)
        entry: Row = {"name": name, "bridge": net.bridge, "mode": net.mode,
                 "subnets": [str(s) for s in net.subnets], "rules_present": False}
        check(entry, "rules_present", plan_network(net, networks))
        entry["forwards"] = _forwards(owner, net.forwards,
                                      partial(resolve_network_forwards, net, networks), check)
        report["networks"].append(entry)
    neighbours = reader(backend.prefix)  # read once, if a guest's forward needs it
    for name, dom in sorted(state.load_domains().items()):
        report["domains"].append({"name": name, "forwards": _forwards(
            domain_owner(name), dom.forwards,
            partial(resolve_domain, dom, networks, state.network_ports, network_leases,
                    neighbours),
            check)})
    snapshot, report["kernel_error"] = reading.result()
    # where libvirt uses nftables, a forward also needs its accepts in libvirt's table:
    # the backend's participants read and check those too
    report["libvirt_firewall"] = libvirt_firewall(backend, snapshot).backend
    for row, key, intents in checks:
        row[key] = snapshot is not None and backend.present(snapshot, intents)
    return report


def _bracketed(address: str | None) -> str | None:
    """An IPv6 address in brackets, so that the port after it reads as a port."""
    return f"[{address}]" if address and ":" in address else address


def format_table(report: Row) -> str:
    """The report for people: every cell escaped (a comment may not draw a row of its
    own or move the cursor); ``--json`` keeps the exact text."""
    rows: list[tuple[str, ...]] = [
        ("OWNER", "PROTO", "HOST", "GUEST", "SOURCE", "RULES", "COMMENT")]
    for kind in ("networks", "domains"):
        for entry in report[kind]:
            owner = f"{kind[:-1]} {shown_name(entry['name'])}"
            if kind == "networks":
                rows.append((owner, "-", f"bridge {entry['bridge']}",
                             ",".join(entry["subnets"]) or "-", "-",
                             "ok" if entry["rules_present"] else "MISSING", entry["mode"]))
            for f in entry["forwards"]:
                host = f"{_bracketed(f['host_ip']) or '*'}:{f['host_port']}"
                guest = f"{_bracketed(f['guest_ip']) or '?'}:{f['guest_port']}"
                state_text = "ok" if f["present"] else ("ERROR" if f.get("error") else "MISSING")
                rows.append((owner, f["proto"], host, guest, ",".join(f["sources"]) or "any",
                             state_text, f.get("error") or f["comment"] or ""))
    text = table(rows) if len(rows) > 1 else "no networks or guests with kvmufw rules known\n"
    if report.get("kernel_error"):
        text += f"cannot read the firewall: {printable(report['kernel_error'])}\n"
    return text


def register(parser: argparse.ArgumentParser, name: str) -> None:
    describe(parser, "Each network and guest kvmufw_hook knows of, each forward with its "
             "resolved target, and whether its rules are in the kernel right now.",
             "example:\n  kvmufw_hook status --json")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        write_json(report)
    else:
        sys.stdout.write(format_table(report))
    return 0
