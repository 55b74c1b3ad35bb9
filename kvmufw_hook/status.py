"""``kvmufw_hook status``: each network and guest we know of, each forward with its
resolved target, and whether its rules are in the kernel right now."""

from __future__ import annotations

from . import state
from .backends import default_backend
from .errors import ApplyError, InputError
from .names import domain_owner, network_owner
from .plan import (
    Target,
    plan_forwards,
    plan_network,
    resolve_domain_forwards,
    resolve_network_forwards,
)


def _forward(owner: str, target: Target | None, spec, error: str | None, present) -> dict:
    row = {
        "proto": spec.proto,
        "host_ip": str(spec.host_ip) if spec.host_ip else None,
        "host_port": str(spec.host_port),
        "guest_ip": str(target.guest_ip) if target else None,
        "guest_port": str(spec.guest_port),
        "network": target.network.name if target else None,
        "sources": [str(s) for s in spec.sources],
        "comment": spec.comment,
        "present": bool(target) and present(plan_forwards(owner, [target])),
    }
    if error:
        row["error"] = error
    return row


def _forwards(owner: str, specs, resolve, present) -> list[dict]:
    """Rows for an owner's forwards: resolved, or each carrying the reason it is not."""
    try:
        return [_forward(owner, t, t.spec, None, present) for t in resolve()]
    except InputError as exc:
        return [_forward(owner, None, s, str(exc), present) for s in specs]


def collect(backend=None) -> dict:
    backend = backend or default_backend()
    try:
        snapshot = backend.read()
        kernel_error = None
    except ApplyError as exc:
        snapshot, kernel_error = None, str(exc)

    # where libvirt uses nftables, a forward also needs its accepts in libvirt's table
    from .backends.libvirt_nft import LibvirtNft, libvirt_firewall
    nft, accepts = LibvirtNft.beside(backend), None
    firewall = libvirt_firewall(snapshot, nft)
    if snapshot is not None and firewall.table:
        try:
            accepts = nft.read()
        except ApplyError as exc:
            kernel_error = str(exc)

    def present(rules) -> bool:
        return snapshot is not None and backend.present(snapshot, rules) and (
            accepts is None or nft.present(accepts, rules))

    networks = state.load_networks()
    report: dict = {"networks": [], "domains": [], "kernel_error": kernel_error,
                    "libvirt_firewall": firewall.backend}
    for name, net in sorted(networks.items()):
        if not net.managed:
            continue
        owner = network_owner(name)
        entry = {"name": name, "bridge": net.bridge, "mode": net.mode,
                 "subnets": [str(s) for s in net.subnets],
                 "rules_present": present(plan_network(net))}
        entry["forwards"] = _forwards(owner, net.forwards,
                                      lambda net=net: resolve_network_forwards(net), present)
        report["networks"].append(entry)
    for name, dom in sorted(state.load_domains().items()):
        report["domains"].append({"name": name, "forwards": _forwards(
            domain_owner(name), dom.forwards,
            lambda dom=dom: resolve_domain_forwards(dom, networks), present)})
    return report


def format_table(report: dict) -> str:
    rows = [("OWNER", "PROTO", "HOST", "GUEST", "SOURCE", "RULES", "COMMENT")]
    for kind in ("networks", "domains"):
        for entry in report[kind]:
            owner = f"{kind[:-1]} {entry['name']}"
            if kind == "networks":
                rows.append((owner, "-", f"bridge {entry['bridge']}",
                             ",".join(entry["subnets"]) or "-", "-",
                             "ok" if entry["rules_present"] else "MISSING", entry["mode"]))
            for f in entry["forwards"]:
                host = f"{f['host_ip'] or '*'}:{f['host_port']}"
                guest = f"{f['guest_ip'] or '?'}:{f['guest_port']}"
                state_text = "ok" if f["present"] else ("ERROR" if f.get("error") else "MISSING")
                rows.append((owner, f["proto"], host, guest, ",".join(f["sources"]) or "any",
                             state_text, f.get("error") or f["comment"] or ""))
    if len(rows) == 1:
        text = "no networks or guests with kvmufw rules known\n"
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        text = "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] + "\n"
                       for r in rows)
    if report.get("kernel_error"):
        text += f"cannot read the firewall: {report['kernel_error']}\n"
    return text
