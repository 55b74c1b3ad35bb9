"""Operations: what a hook call or a command does, from parsed model to applied rules.

Each operation that changes rules holds the state lock for its whole
read-check-write, so concurrent hooks cannot interleave or both claim a port.
``backend`` arguments are a ``backends.base.Backend``; None means the host's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from . import state
from .backends import default_backend
from .errors import ApplyError, InputError, shown
from .model import Domain, ForwardSpec, Network, NetworkPort
from .names import domain_owner, network_owner
from .plan import (
    Rule,
    check_conflicts,
    plan_domain_owner,
    plan_network_owner,
    resolve_network_forwards,
)

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass
class Applied:
    payload: str  # what was written (iptables, then any nft script); empty: nothing changed


def apply_rules(rules: Mapping[str, Sequence[Rule]], drop=None,
                backend=None, log: Log = _quiet) -> Applied:
    """Replace the named owners' rules (and drop matching others) in one write.

    Where libvirt uses its nftables backend, the forwards' accepts inside libvirt's table
    follow in one ``nft -f`` after the iptables write, even when iptables has nothing to
    change (libvirt rebuilt its table: the hooks that run after that put them back).
    If the kernel refuses either write, our chains are put back as they were and
    ApplyError is raised: a change is applied whole or not at all.
    """
    from .backends.libvirt_nft import plan_accepts
    backend = backend or default_backend()
    before = backend.read()
    payload = backend.change(before, rules, drop)
    accepts = plan_accepts(backend, before, rules, drop)
    if not payload and not accepts.script:
        return Applied("")
    try:
        backend.write(payload)
        accepts.write()  # last: one transaction, so if it fails nothing of it is in
    except ApplyError:
        try:
            if payload:
                backend.write(backend.revert(backend.read(), before))
        except ApplyError as exc:
            log(f"rollback failed too: {exc}")
        raise
    return Applied(payload + accepts.text)


def claims(networks: Mapping[str, Network], domains: Mapping[str, Domain],
           skip: str) -> list[tuple[str, Iterable[ForwardSpec]]]:
    """Forwards of every owner but ``skip``, labelled for conflict messages."""
    out = [(f"network {shown(n.name)}", n.forwards) for n in networks.values()
           if network_owner(n.name) != skip and n.managed]
    out += [(f"domain {shown(d.name)}", d.forwards) for d in domains.values()
            if domain_owner(d.name) != skip]
    return out


def check_claims(label: str, owner: str, forwards: Iterable[ForwardSpec],
                 networks: Mapping[str, Network], domains: Mapping[str, Domain]) -> None:
    """InputError if ``owner``'s forwards claim a host port another owner has."""
    check_conflicts(label, forwards, claims(networks, domains, owner))


# --------------------------------------------------------------------------- networks

def validate_network(net: Network) -> None:
    resolve_network_forwards(net)
    if net.forwards:
        check_claims(f"network {shown(net.name)}", network_owner(net.name), net.forwards,
                     state.load_networks(), state.load_domains())


def network_started(net: Network, raw: bytes, backend=None, log: Log = _quiet) -> Applied:
    """Add the network's rules and forwards; re-add forwards of running guests on it."""
    if not net.managed:
        return Applied("")
    with state.locked():
        networks = state.load_networks(log)
        networks[net.name] = net
        domains = state.load_domains(log)
        rules: dict[str, Sequence[Rule]] = {network_owner(net.name): plan_network_owner(net)}
        if net.forwards:
            check_claims(f"network {shown(net.name)}", network_owner(net.name), net.forwards,
                         networks, domains)
        for dom in domains.values():
            if any(nic.network == net.name or (nic.bridge and nic.bridge == net.bridge)
                   for nic in dom.nics):
                try:
                    rules[domain_owner(dom.name)] = plan_domain_owner(dom, networks)
                except InputError as exc:
                    log(f"not re-adding forwards: {exc}")
        state.save_network(net.name, raw)
        applied = apply_rules(rules, backend=backend, log=log)
    log(f"network {shown(net.name)} ({net.bridge}): rules for "
        + ", ".join(sorted(rules)) + (" applied" if applied.payload else " already in place"))
    return applied


def network_stopped(net: Network, backend=None, log: Log = _quiet) -> Applied:
    """Remove everything that targets the network: its rules and guests' forwards to it."""
    bridge = net.bridge
    with state.locked():
        state.forget_network(net.name)
        if not net.managed:
            return Applied("")
        applied = apply_rules({network_owner(net.name): ()},
                              drop=(lambda t: t.get("b") == bridge) if bridge else None,
                              backend=backend, log=log)
    log(f"network {shown(net.name)} ({bridge}): rules removed")
    return applied


def network_port(net: Network, raw: bytes, port: NetworkPort | None, deleted: bool,
                 backend=None, log: Log = _quiet) -> Applied:
    """port-created/-deleted/updated: keep the network's and the owner guest's rules
    current (after a daemon restart libvirt re-creates every port, then reconnects)."""
    if not net.managed:
        return Applied("")
    with state.locked():
        state.save_network(net.name, raw)
        networks = state.load_networks(log)
        networks[net.name] = net
        rules: dict[str, Sequence[Rule]] = {network_owner(net.name): plan_network_owner(net)}
        owner = port.owner_name if port else None
        domains = state.load_domains(log)
        if owner and owner in domains:
            dom = domains[owner]
            if deleted and port.mac:
                dom = replace(dom, nics=tuple(n for n in dom.nics if n.mac != port.mac))
            try:
                rules[domain_owner(dom.name)] = plan_domain_owner(dom, networks)
            except InputError as exc:
                log(f"keeping the current rules: {exc}")
        return apply_rules(rules, backend=backend, log=log)


# --------------------------------------------------------------------------- domains

def domain_started(dom: Domain, raw: bytes, backend=None, log: Log = _quiet) -> Applied:
    """Resolve the guest's forwards, refuse conflicts, add its rules (qemu start,
    reconnect, replay of one guest)."""
    owner = domain_owner(dom.name)
    with state.locked():
        networks = state.load_networks(log)
        rules = plan_domain_owner(dom, networks)
        check_claims(f"domain {shown(dom.name)}", owner, dom.forwards, networks,
                     state.load_domains(log))
        if dom.forwards:
            state.save_domain(dom.name, raw)
        else:
            state.forget_domain(dom.name)
        try:
            applied = apply_rules({owner: rules}, backend=backend, log=log)
        except ApplyError:
            state.forget_domain(dom.name)
            raise
    if dom.forwards:
        log(f"domain {shown(dom.name)}: {len(dom.forwards)} forward(s), "
            + ("applied" if applied.payload else "already in place"))
    elif applied.payload:
        log(f"domain {shown(dom.name)}: forwards removed")
    return applied


def domain_stopped(name: str, backend=None, log: Log = _quiet) -> Applied:
    with state.locked():
        state.forget_domain(name)
        applied = apply_rules({domain_owner(name): ()}, backend=backend, log=log)
    if applied.payload:
        log(f"domain {shown(name)}: forwards removed")
    return applied


# --------------------------------------------------------------------------- whole host

@dataclass
class HostPlan:
    rules: dict[str, Sequence[Rule]]  # owner -> rules, for every owner that planned
    problems: list[str]  # one line per owner that did not
    failed: set[str]  # those owners: their current rules must be left alone


def plan_host(networks: Mapping[str, Network], domains: Mapping[str, Domain]) -> HostPlan:
    """Every owner's rules for a whole host: networks first, then guests, each checked
    against the forwards of those planned before it. An owner that fails is reported
    and skipped; the others still plan."""
    result = HostPlan({}, [], set())
    claimed: list[tuple[str, Iterable[ForwardSpec]]] = []

    def add(owner: str, label: str, forwards, planner) -> None:
        try:
            check_conflicts(label, forwards, claimed)
            result.rules[owner] = planner()
            claimed.append((label, forwards))
        except InputError as exc:
            result.problems.append(str(exc))
            result.failed.add(owner)

    for name, net in sorted(networks.items()):
        if net.managed:
            add(network_owner(name), f"network {shown(name)}", net.forwards,
                lambda net=net: plan_network_owner(net))
    for name, dom in sorted(domains.items()):
        if dom.forwards:
            add(domain_owner(name), f"domain {shown(name)}", dom.forwards,
                lambda dom=dom: plan_domain_owner(dom, networks))
    return result


@dataclass
class Replayed:
    payload: str
    problems: list[str]
    owners: int


def replay(network_xmls: Iterable[bytes], domain_xmls: Iterable[bytes], dry_run: bool = False,
           backend=None, log: Log = _quiet) -> Replayed:
    """Re-derive every rule from the live XML of active networks and running guests:
    add what is missing, remove our rules that no longer match, fix the jumps, and
    rewrite the state files. An owner that fails keeps whatever rules it has."""
    from .parse import parse_domain_xml, parse_network_xml
    backend = backend or default_backend()
    problems: list[str] = []
    networks: dict[str, tuple[Network, bytes]] = {}
    domains: dict[str, tuple[Domain, bytes]] = {}
    for raws, parse, into in ((network_xmls, parse_network_xml, networks),
                              (domain_xmls, parse_domain_xml, domains)):
        for raw in raws:
            try:
                obj = parse(raw)
            except InputError as exc:
                problems.append(str(exc))
                continue
            into[obj.name] = (obj, raw)

    host = plan_host({n: net for n, (net, _r) in networks.items()},
                     {n: dom for n, (dom, _r) in domains.items()})
    problems += host.problems

    def drop(tagged: dict[str, str]) -> bool:
        return tagged["owner"] not in host.failed

    with state.locked():
        if dry_run:
            from .backends.libvirt_nft import plan_accepts
            before = backend.read()
            payload = (backend.change(before, host.rules, drop)
                       + plan_accepts(backend, before, host.rules, drop).text)
        else:
            payload = apply_rules(host.rules, drop=drop, backend=backend, log=log).payload
            state.replace_all(
                {name: raw for name, (net, raw) in networks.items() if net.managed},
                {name: raw for name, (dom, raw) in domains.items() if dom.forwards})
    if not dry_run:
        log(f"replay: {len(host.rules)} owner(s) with rules, "
            + ("changed" if payload else "nothing to change")
            + (f", {len(problems)} problem(s)" if problems else ""))
    return Replayed(payload, problems, len(host.rules))


def flush(backend=None) -> Applied:
    """Remove all our rules and chains, and our accepts in libvirt's nftables table."""
    from .backends.libvirt_nft import clear_accepts
    backend = backend or default_backend()
    with state.locked():
        payload = backend.clear(backend.read())
        backend.write(payload)
        payload += clear_accepts(backend)
    return Applied(payload)
