"""Operations: what a hook call or a command does, from parsed model to applied rules.

Each operation that changes rules holds the state lock for its whole
read-check-write, so concurrent hooks cannot interleave or both claim a port.
``backend`` arguments are a ``backends.base.Backend``; None means the host's own.

Who holds a host port is what the kernel's owner-tagged rules say, completed by our
state files (a network whose rules a firewall reload wiped still holds its ports):
a newcomer never takes a port from its current holder, whatever order owners are
planned in, and a lost or corrupt state file cannot hide a holder.

State follows the kernel and libvirt (``state.py``): a network's file is written after
its rules, a stop removes rules before state, and an operation whose write fails is run
again on a fresh read (``apply.retrying``): whatever is killed or fails, ``restore``
(which never asks libvirt) and ``replay`` bring every running owner back and leave
nothing of a stopped one. After ``uninstall`` every operation applies nothing.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from . import host, state
from .apply import (  # noqa: F401 - the stop path lives there
    Applied,
    apply_rules,
    covering,
    domain_stopped,
    families_of,
    retrying,
)
from .backends import default_backend
from .backends.bridgeports import BridgePorts, follow
from .errors import ApplyError, InputError, shown
from .hairpin import plan_hairpin, plan_host_hairpin
from .model import Domain, ForwardSpec, IPAddress, Network, NetworkPort
from .names import domain_owner, network_owner, safe_name
from .plan import (
    Rule,
    check_conflicts,
    forward_families,
    plan_forwards,
    plan_network,
    resolve_domain_forwards,
    resolve_network_forwards,
    resolved_specs,
)

Log = Callable[[str], None]
Claims = list[tuple[str, Iterable[ForwardSpec]]]


def _quiet(_msg: str) -> None:
    pass


def owner_label(owner: str) -> str:
    """How messages name an owner known only by its tag: ``domain 'web1'``."""
    kind, _, name = owner.partition("=")
    return f"{'network' if kind == 'n' else 'domain'} {shown(name)}"


def claims(networks: Mapping[str, Network], domains: Mapping[str, Domain], skip: str,
           kernel: Mapping[str, list[ForwardSpec]] | None = None,
           held_only: bool = False) -> Claims:
    """Forwards of every owner but ``skip``, labelled for conflict messages: what our
    state says (the forwards as declared), and what the kernel holds for every owner
    the state does not know (a lost or corrupt state file hides no holder).
    ``held_only``: an owner of the state with rules in the kernel claims each forward in
    the families the kernel holds it in, not in every family its metadata allows."""
    kernel = kernel or {}

    def theirs(owner: str, specs: Sequence[ForwardSpec]) -> Sequence[ForwardSpec]:
        return _as_held(specs, kernel[owner]) if held_only and owner in kernel else specs

    out: Claims = [(f"network {shown(n.name)}", theirs(network_owner(n.name), n.forwards))
                   for n in networks.values() if n.managed and network_owner(n.name) != skip]
    out += [(f"domain {shown(d.name)}", theirs(domain_owner(d.name), d.forwards))
            for d in domains.values() if domain_owner(d.name) != skip]
    known = {network_owner(n) for n in networks} | {domain_owner(d) for d in domains}
    out += [(owner_label(owner), specs) for owner, specs in kernel.items()
            if owner != skip and owner not in known]
    return out


def _as_held(specs: Sequence[ForwardSpec], held: Sequence[ForwardSpec]) -> list[ForwardSpec]:
    """Each forward in the families its rules in the kernel hold it in (the kernel's
    claims carry the guest address, so their family); as declared where none does."""
    guests: dict[tuple, dict[int, IPAddress]] = {}
    for h in held:
        for ip in h.guest_ips:
            guests.setdefault((h.proto, h.host_port, h.host_ip), {}).setdefault(ip.version, ip)
    out = []
    for spec in specs:
        found = guests.get((spec.proto, spec.host_port, spec.host_ip))
        out.append(replace(spec, guest_ips=tuple(found.values())) if found else spec)
    return out


def check_claims(label: str, owner: str, forwards: Iterable[ForwardSpec],
                 networks: Mapping[str, Network], domains: Mapping[str, Domain],
                 kernel: Mapping[str, list[ForwardSpec]] | None = None) -> None:
    """InputError if ``owner``'s forwards claim a host port another owner has. Checked
    first against what the others declare (cheap: no copies); only if that finds a
    clash, again against the families their rules in the kernel really hold (a guest
    with an IPv4 address only does not hold the IPv6 port its metadata would allow)."""
    forwards = tuple(forwards)
    try:
        check_conflicts(label, forwards, claims(networks, domains, owner, kernel))
    except InputError:
        if not kernel:
            raise
        check_conflicts(label, forwards, claims(networks, domains, owner, kernel, True))


def kernel_claims(backend=None) -> dict[str, list[ForwardSpec]]:
    """owner -> the host ports its rules in the kernel hold right now."""
    backend = backend or default_backend()
    return backend.claims(backend.read())


def check_host(label: str, forwards: Sequence[ForwardSpec], backend=None,
               held: Iterable[ForwardSpec] = (),
               families: Sequence[Iterable[int]] | None = None) -> None:
    """InputError if a forward's host-ip is not the host's or it takes a host service's
    port (``host.py``; read only when there are forwards, in the backend's namespace);
    ``held``: what the owner's rules take now, which a later socket does not take away;
    ``families``: per forward, the families it was planned in."""
    host.check_forwards(label, forwards, held=held, prefix=_prefix(backend),
                        families=families)


def _prefix(backend) -> Sequence[str]:
    return getattr(backend, "prefix", None) or ()


# --------------------------------------------------------------------------- networks

def validate_network(net: Network) -> None:
    networks = state.load_networks()
    targets = resolve_network_forwards(net, networks)
    if net.forwards:
        label = f"network {shown(net.name)}"
        check_claims(label, network_owner(net.name), net.forwards, networks,
                     state.load_domains())
        check_host(label, net.forwards, families=forward_families(net.forwards, targets))


class _Owner:
    """An owner's forwards re-planned by a network event (start, port): its rules, or
    why its current rules stay (a forward now takes a port another owner or a host
    service holds: a guest that gains an IPv6 address gains the IPv6 ports too)."""

    def __init__(self, label: str, owner: str, specs: Sequence[ForwardSpec], targets,
                 own: Sequence[Rule] = ()) -> None:
        self.label, self.owner, self.specs = label, owner, specs
        self.families = forward_families(specs, targets)
        self.resolved = resolved_specs(specs, targets)  # each in the families it takes
        self.rules: Sequence[Rule] = tuple(own) + plan_forwards(owner, targets)

    def check(self, held, backend) -> None:
        check_conflicts(self.label, self.resolved, [(owner_label(o), specs) for o, specs
                                                    in held.items() if o != self.owner])
        check_host(self.label, self.specs, backend, held.get(self.owner, ()), self.families)


def _network_owner(net: Network, networks: Mapping[str, Network]) -> _Owner:
    return _Owner(f"network {shown(net.name)}", network_owner(net.name), net.forwards,
                  resolve_network_forwards(net, networks), plan_network(net))


def _domain_owner(dom: Domain, networks: Mapping[str, Network]) -> _Owner:
    # a guest holding a copy of another running guest's MAC gets no forwards back
    check_own_macs(dom, networks, state.network_ports)
    return _Owner(f"domain {shown(dom.name)}", domain_owner(dom.name), dom.forwards,
                  resolve_domain_forwards(dom, networks))


@retrying(lambda: Applied(""))
def network_started(net: Network, raw: bytes, backend=None, log: Log = _quiet) -> Applied:
    """Add the network's rules and forwards; re-add forwards of running guests on it.
    The state file is written after the rules: if they fail (or this is killed), libvirt
    counts the network as not started and runs no ``stopped``: nothing may say it is
    active."""
    if not net.with_rules:
        return Applied("")
    backend = backend or default_backend()
    with state.locked():
        networks = state.load_networks()
        networks[net.name] = net
        domains = state.load_domains()
        mine = _network_owner(net, networks)
        guests: list[_Owner] = []
        for dom in domains.values():
            if any(nic.network == net.name or (nic.bridge and nic.bridge == net.bridge)
                   for nic in dom.nics):
                try:
                    guests.append(_domain_owner(dom, networks))
                except InputError as exc:
                    log(f"not re-adding forwards: {exc}")
        before = backend.read(families_of({o.owner: o.rules for o in [mine, *guests]}))
        held = backend.claims(before)
        rules: dict[str, Sequence[Rule]] = {mine.owner: mine.rules}
        if net.forwards:
            check_claims(mine.label, mine.owner, mine.resolved, networks, domains, held)
            check_host(mine.label, net.forwards, backend, held.get(mine.owner, ()),
                       mine.families)
        for guest in guests:
            try:  # a port taken meanwhile (replay while this network was down) stays
                guest.check(held, backend)
                rules[guest.owner] = guest.rules
            except InputError as exc:
                log(f"not re-adding forwards: {exc}")
        applied = apply_rules(rules, backend=backend, log=log, before=before)
        state.save_network(net.name, raw)
        state.mark_starting(net.name)
    log(f"network {shown(net.name)} ({net.bridge}): rules for "
        + ", ".join(sorted(rules)) + (" applied" if applied.payload else " already in place"))
    return applied


@retrying(lambda: Applied(""))
def network_stopped(net: Network, backend=None, log: Log = _quiet) -> Applied:
    """Remove everything that targets the network: its rules and guests' forwards to it.
    The rules first: if their removal fails, the state file stays, and as libvirt removed
    its status file before calling us, ``restore`` removes what is left."""
    bridge = net.bridge
    with state.locked():
        state.forget_starting(net.name)
        if not net.with_rules:
            state.forget_network(net.name)
            return Applied("")
        applied = apply_rules({network_owner(net.name): ()},
                              drop=(lambda t: t.bridge == bridge) if bridge else None,
                              backend=backend, log=log)
        state.forget_network(net.name)
    log(f"network {shown(net.name)} ({bridge}): rules removed")
    return applied


@retrying(lambda: Applied(""))
def network_port(net: Network, raw: bytes, port: NetworkPort | None, deleted: bool,
                 backend=None, log: Log = _quiet) -> Applied:
    """port-created/-deleted/updated: keep the network's and the owner guest's rules
    current (after a daemon restart libvirt re-creates every port, then reconnects). An
    owner whose re-planned forwards would take a port someone else holds keeps the rules
    it has."""
    if not net.managed:
        return Applied("")
    backend = backend or default_backend()
    with state.locked():
        state.save_network(net.name, raw)
        if port and port.mac and port.owner_name is not None:
            state.record_port(net.name, port.mac, port.owner_name, deleted)
        networks = state.load_networks()
        networks[net.name] = net
        owners: list[_Owner] = []
        owner = port.owner_name if port else None
        domains = state.load_domains()
        rules: dict[str, Sequence[Rule]] = {}
        if port and port.mac and owner is not None and not deleted:
            for other in _same_mac(net, domains, port.mac, owner):
                rules[domain_owner(other)] = ()  # its forwards may reach this guest now
                log(f"domain {shown(other)}: forwards removed: its NIC {port.mac} on network "
                    f"{shown(net.name)} has the MAC of the port of domain {shown(owner)}")
        try:
            owners.append(_network_owner(net, networks))
        except InputError as exc:
            log(f"keeping the current rules: {exc}")
        if owner and owner in domains:
            dom = domains[owner]
            if deleted and port and port.mac:
                dom = replace(dom, nics=tuple(n for n in dom.nics if n.mac != port.mac))
            try:
                owners.append(_domain_owner(dom, networks))
            except InputError as exc:
                log(f"keeping the current rules: {exc}")
        before = backend.read(families_of({o.owner: o.rules for o in owners}))
        held = backend.claims(before) if any(o.specs for o in owners) else {}
        for planned in owners:
            try:
                if planned.specs:
                    planned.check(held, backend)
                rules[planned.owner] = planned.rules
            except InputError as exc:
                log(f"keeping the current rules: {exc}")
        return apply_rules(rules, backend=backend, log=log, before=before)


def _same_mac(net: Network, domains: Mapping[str, Domain], mac: str, owner: str) -> list[str]:
    """Running guests with forwards, other than ``owner``, with a NIC of MAC ``mac`` on
    ``net``: a guest that started with a copy of another's MAC while that one was down
    (``check_own_macs`` refuses it only when the other's port already exists)."""
    return sorted(d.name for d in domains.values() if d.name != owner and d.forwards
                  and any(nic.mac == mac and (nic.network == net.name or (
                      nic.bridge is not None and nic.bridge == net.bridge)) for nic in d.nics))


# --------------------------------------------------------------------------- domains

def check_own_macs(dom: Domain, networks: Mapping[str, Network],
                   ports: Callable[[str], list[tuple[str, str]]]) -> None:
    """InputError if a NIC of a guest with forwards has the MAC of another guest's port
    on that network (libvirt starts two guests with one MAC): its reservation, and so
    the address its forwards would reach, is not this guest's."""
    if not dom.forwards:
        return
    by_bridge = {n.bridge: n for n in networks.values() if n.bridge}
    for nic in dom.nics:
        net = networks.get(nic.network or "") or by_bridge.get(nic.bridge or "")
        if net is None or not nic.mac:
            continue
        others = sorted({o for mac, o in ports(net.name) if mac == nic.mac and o != dom.name})
        if others:
            raise InputError(f"domain {shown(dom.name)}: NIC {nic.mac} on network "
                             f"{shown(net.name)} has the MAC of the port of domain "
                             f"{shown(others[0])}: that guest's address is not this one's")


def _domain_checked(dom: Domain, backend) -> tuple[tuple[Rule, ...], object]:
    """Every check of a guest's forwards against this host, under the state lock:
    (its rules, the firewall as read). InputError names the guest, forward and reason."""
    owner = domain_owner(dom.name)
    label = f"domain {shown(dom.name)}"
    networks = state.load_networks()
    check_own_macs(dom, networks, state.network_ports)
    targets = resolve_domain_forwards(dom, networks)
    rules = plan_forwards(owner, targets)
    before = backend.read(families_of({owner: rules}))
    held = backend.claims(before)
    check_claims(label, owner, resolved_specs(dom.forwards, targets), networks,
                 state.load_domains(), held)
    families = forward_families(dom.forwards, targets)
    check_host(label, dom.forwards, backend, held.get(owner, ()), families)
    return rules, before


@retrying(lambda: None)  # after uninstall: nothing to check
def domain_arriving(dom: Domain, backend=None) -> None:
    """qemu ``migrate``, on the destination: the checks of ``domain_started`` and
    nothing else (no state, no rule). A host port held here, a ``host-ip`` that is not
    this host's, ... refuse the migration before anything moves; the guest keeps running
    on the source with its forwards. ``start`` checks again and applies when it arrives."""
    if not dom.forwards:
        return
    with state.locked():
        _domain_checked(dom, backend or default_backend())


@retrying(lambda: Applied(""))
def domain_started(dom: Domain, raw: bytes, backend=None, log: Log = _quiet,
                   running: bool = False) -> Applied:
    """Resolve the guest's forwards, refuse conflicts, add its rules (qemu start,
    reconnect, replay of one guest). ``running``: the guest runs whatever happens here
    (``reconnect``): a failure keeps its state, so that ``restore`` brings it back."""
    owner = domain_owner(dom.name)
    backend = backend or default_backend()
    with state.locked():
        rules, before = _domain_checked(dom, backend)
        # The state is written first: it is what lets stopped/release remove the rules
        # (a start that fails or is killed is followed by them). If the write fails, the
        # old rules are back (revert); a guest being started keeps the state only while
        # rules of it are in the kernel, a running one (reconnect) keeps it.
        if dom.forwards:
            state.save_domain(dom.name, raw)
        try:
            applied = apply_rules({owner: rules}, backend=backend, log=log, before=before)
        except ApplyError:
            if not running and owner not in backend.claims(backend.read()):
                state.forget_domain(dom.name)
            raise
        state.forget_stopped(owner)
        follow(backend, {owner: plan_hairpin(dom, rules)}, log)  # its own forwards' way back
        if not dom.forwards:
            state.forget_domain(dom.name)
    if dom.forwards:
        log(f"domain {shown(dom.name)}: {len(dom.forwards)} forward(s), "
            + ("applied" if applied.payload else "already in place")
            + "".join(f" (IPv{f} left out)" for f in sorted(applied.skipped)))
    elif applied.payload:
        log(f"domain {shown(dom.name)}: forwards removed")
    return applied


# --------------------------------------------------------------------------- whole host

@dataclass
class HostPlan:
    """Every owner's rules for a whole host, and the owners that failed."""

    rules: dict[str, Sequence[Rule]]  # owner -> rules, for every owner that planned
    problems: list[str]  # one line per owner that did not
    failed: set[str]  # those owners: their current rules must be left alone


class _Claimed:
    """Forwards claimed so far, by protocol and first host port: each owner is checked
    against the few that could overlap its own, not against all (a replay of hundreds
    of guests would be quadratic). Same answers and messages as checking against all."""

    def __init__(self) -> None:
        self.starts: dict[str, list[tuple[int, int]]] = {}  # proto -> sorted (first, index)
        self.entries: list[tuple[str, ForwardSpec]] = []
        self.widest = 0

    def near(self, forwards: Iterable[ForwardSpec]) -> list[tuple[str, tuple[ForwardSpec]]]:
        found = []
        for spec in forwards:  # an overlap starts within [first - widest, last]
            starts = self.starts.get(spec.proto, [])
            lo = bisect_left(starts, (spec.host_port.first - self.widest, -1))
            hi = bisect_right(starts, (spec.host_port.last, len(self.entries)))
            found += [self.entries[i] for _first, i in starts[lo:hi]]
        return [(label, (spec,)) for label, spec in found]

    def add(self, label: str, forwards: Iterable[ForwardSpec]) -> None:
        for spec in forwards:
            insort(self.starts.setdefault(spec.proto, []),
                   (spec.host_port.first, len(self.entries)))
            self.entries.append((label, spec))
            self.widest = max(self.widest, spec.host_port.last - spec.host_port.first)


def plan_host(networks: Mapping[str, Network], domains: Mapping[str, Domain],
              holders: Mapping[str, list[ForwardSpec]] | None = None,
              facts: host.HostFacts | None = None, broken: Iterable[str] = (),
              reserved: Iterable[str] = (),
              ports: Callable[[str], list[tuple[str, str]]] | None = None) -> HostPlan:
    """Every owner's rules for a whole host, each checked against the forwards of
    those planned before it. The current holders of ports (``holders``: owner -> the
    ports its rules in the kernel hold) are planned first, so a newcomer never takes a
    port from the guest or network that has it; then networks before guests, in name
    order. An owner that fails is reported and skipped, its rules stay as they are (and
    so do the ports they hold); the others still plan. With ``facts`` forwards are
    checked against the host itself (``host.py``): not for ``plan``, which describes XML
    files, not this host. ``broken``: owners whose XML did not even parse; they fail
    too, keeping their rules and ports. ``reserved``: owners whose forwards were applied
    and who still run (our state says so): planned right after the holders, and if they
    fail (their network is down, say) their ports stay theirs. ``ports``: the MACs of
    each network's ports as libvirt reported them (``check_own_macs``)."""
    held = holders or {}
    kept = set(reserved)
    result = HostPlan({}, [], set(broken))
    claimed = _Claimed()
    for o in result.failed:
        if o in held:
            claimed.add(owner_label(o), held[o])

    def add(owner: str, label: str, forwards, resolve, plan_own) -> None:
        try:
            targets = resolve()
            mine = resolved_specs(forwards, targets)  # the families each really takes
            check_conflicts(label, mine, claimed.near(mine))
            rules = plan_own() + plan_forwards(owner, targets)
            if facts is not None:
                host.check_forwards(label, forwards, facts, held.get(owner, ()),
                                    families=forward_families(forwards, targets))
            result.rules[owner] = rules
            claimed.add(label, mine)
        except InputError as exc:
            result.problems.append(str(exc))
            result.failed.add(owner)
            if owner in held:  # its rules stay in the kernel: so do its ports
                claimed.add(label, held[owner])
            if owner in kept:  # still running with them: its ports wait for it
                claimed.add(label, forwards)

    def resolve_domain(dom: Domain):
        if ports is not None:
            check_own_macs(dom, networks, ports)
        return resolve_domain_forwards(dom, networks)

    owners = [(network_owner(name), f"network {shown(name)}", net.forwards,
               lambda net=net: resolve_network_forwards(net, networks),
               lambda net=net: plan_network(net))
              for name, net in sorted(networks.items()) if net.with_rules]
    owners += [(domain_owner(name), f"domain {shown(name)}", dom.forwards,
                lambda dom=dom: resolve_domain(dom), tuple)
               for name, dom in sorted(domains.items()) if dom.forwards]
    # stable: holders first, then owners still running with theirs, order kept
    owners.sort(key=lambda o: 0 if o[0] in held else 1 if o[0] in kept else 2)
    for owner in owners:
        add(*owner)
    return result


@dataclass
class Replayed:
    """What ``replay`` wrote and the problems it found."""

    payload: str
    problems: list[str]
    owners: int


TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a guest start milliseconds; annotations are strings here
    from typing import TypeVar
    Parsed = TypeVar("Parsed", Network, Domain)


def _parse_each(raws: Iterable[bytes], parse: Callable[[bytes], Parsed],
                owner: Callable[[str], str], kind: str, problems: list[str],
                broken: set[str], kept: set[tuple[str, str]]) -> dict[str, tuple[Parsed, bytes]]:
    """name -> (model, raw) of each document that parses. One that does not is a
    problem; if its name can still be read, that owner fails: its rules, ports and state
    stay as they are."""
    from .parse import object_name
    out: dict[str, tuple[Parsed, bytes]] = {}
    for raw in raws:
        try:
            obj = parse(raw)
        except InputError as exc:
            problems.append(str(exc))
            name = object_name(raw)
            if name is not None:
                broken.add(owner(name))
                kept.add((kind, name))
            continue
        out[obj.name] = (obj, raw)
    return out


def _parse_all(network_xmls: Iterable[bytes], domain_xmls: Iterable[bytes],
               problems: list[str]):
    from .parse import parse_domain_xml, parse_network_xml
    broken: set[str] = set()
    kept: set[tuple[str, str]] = set()  # (state kind, name) whose files stay
    networks = _parse_each(network_xmls, parse_network_xml, network_owner, "networks",
                           problems, broken, kept)
    domains = _parse_each(domain_xmls, parse_domain_xml, domain_owner, "domains",
                          problems, broken, kept)
    # forward add --network on a running network: libvirt's live XML is stale until the
    # network restarts; the override is the truth (the hooks drop it at network start)
    for name, (net, raw) in list(networks.items()):
        try:
            networks[name] = (state.with_override(net), raw)
        except InputError as exc:
            problems.append(f"network {shown(name)}: override: {exc}")
            broken.add(network_owner(name))
    return networks, domains, broken, kept


@retrying(lambda: Replayed("", [], 0))
def replay(network_xmls: Iterable[bytes], domain_xmls: Iterable[bytes], dry_run: bool = False,
           backend=None, log: Log = _quiet) -> Replayed:
    """Re-derive every rule from the live XML of active networks and running guests:
    add what is missing, remove our rules that no longer match, fix the jumps, and
    rewrite the state files. An owner that fails keeps whatever rules it has. The way an
    install starts: it lifts ``uninstall``'s marker."""
    backend = backend or default_backend()
    problems: list[str] = []
    networks, domains, broken, kept = _parse_all(network_xmls, domain_xmls, problems)
    with state.locked(installing=True):
        if not dry_run:
            state.mark_installed()
            state.sweep()
        before = backend.read()
        planned = plan_host({n: net for n, (net, _r) in networks.items()},
                         {n: dom for n, (dom, _r) in domains.items()},
                         holders=backend.claims(before), broken=broken,
                         facts=host.HostFacts.read(_prefix(backend)),
                         reserved=[domain_owner(n) for n in state.load_domains()
                                   if n in domains],
                         ports=state.network_ports)
        problems += planned.problems

        def drop(tagged) -> bool:
            return tagged.owner not in planned.failed

        if dry_run:
            from .backends.libvirt_nft import plan_accepts
            before = covering(backend, before, planned.rules)
            payload = (backend.change(before, planned.rules, drop).text
                       + plan_accepts(backend, before, planned.rules, drop).text)
        else:
            payload = apply_rules(planned.rules, drop=drop, backend=backend, log=log,
                                  before=before).payload
            follow(backend, plan_host_hairpin({n: d for n, (d, _r) in domains.items()},
                                              planned.rules),
                   log, everyone=True, keep=planned.failed)
            state.replace_all(
                {name: raw for name, (net, raw) in networks.items() if net.with_rules},
                {name: raw for name, (dom, raw) in domains.items() if dom.forwards},
                keep=kept)
            for owner in state.stopped_owners():  # every stale rule is gone now
                state.forget_stopped(owner)
    _report("replay", planned, payload, problems, dry_run, log)
    return Replayed(payload, problems, len(planned.rules))


@retrying(lambda: Replayed("", [], 0))
def restore(jumps_only: bool = False, backend=None, log: Log = _quiet,
            lock_timeout: float | None = None) -> Replayed:
    """Put our rules back from our own state and the kernel, never asking libvirt (it
    runs from UFW's after.init and from libvirt's own unit, where a call into libvirt
    would deadlock a boot). Owners in the state are re-applied; rules of owners the
    state knows nothing of are left alone (only ``replay``, which asks libvirt, may
    call them stale), except what libvirt and our state say is stopped: a network
    libvirt's status files do not list (our ``started`` of it failed or was killed, or
    its ``stopped`` failed), and an owner whose removal failed (``state.stopped_owners``).
    ``jumps_only``: just put our jumps back first."""
    backend = backend or default_backend()
    problems: list[str] = []
    with state.locked(lock_timeout):
        before = backend.read()
        if jumps_only:
            payload = apply_rules({}, backend=backend, log=log, before=before).payload
            if payload:
                log("restore: our jumps put back first")
            return Replayed(payload, [], 0)
        state.sweep()
        networks = state.load_networks(problems.append)
        gone, stopped = _stopped(networks, backend.owners(before))
        bridges = {net.bridge for net in stopped.values() if net.bridge}
        domains = state.load_domains(problems.append)
        planned = plan_host(networks, domains,
                            holders=backend.claims(before),
                            facts=host.HostFacts.read(_prefix(backend)),
                            reserved=[domain_owner(n) for n in domains],
                            ports=state.network_ports)
        problems += planned.problems

        def drop(tagged) -> bool:  # guests' forwards into a stopped network go with it
            return tagged.bridge in bridges and tagged.owner not in planned.rules

        rules = {**{o: () for o in gone}, **planned.rules}
        payload = apply_rules(rules, drop=drop if bridges else None, backend=backend,
                              log=log, before=before).payload
        follow(backend, plan_host_hairpin(domains, planned.rules), log)
        for owner in gone:
            state.forget_stopped(owner)
        for name in stopped:
            state.forget_network(name)
    _report("restore", planned, payload, problems, False, log)
    return Replayed(payload, problems, len(planned.rules))


def _stopped(networks: dict[str, Network],
             in_kernel: Iterable[str]) -> tuple[set[str], dict[str, Network]]:
    """(owners whose rules are stale, the networks among them) as our state and
    libvirt's status files say, without asking libvirt; the stopped networks are taken
    out of ``networks``. A network libvirt does not list is stopped unless our
    ``started`` of it finished after libvirt last changed its status files (libvirt is
    writing its file now); so are networks with rules but neither state nor status file,
    and owners whose removal failed."""
    activity = state.NetworkActivity()
    stopped = {name: net for name, net in networks.items()
               if not activity.active(name) and not activity.starting(name)}
    for name in stopped:
        del networks[name]
    known = state.state_network_tokens() | {safe_name(n) for n in networks}
    gone = set(state.stopped_owners()) | {network_owner(n) for n in stopped}
    gone |= {o for o in in_kernel
             if o.startswith("n=") and o[2:] not in known and activity.stale(o[2:])}
    return gone, stopped


def watch_jumps(seconds: float, interval: float = 1.0, backend=None, log: Log = _quiet,
                lock_timeout: float | None = None) -> int:
    """Put our jumps back first now, and again whenever they lose first place during the
    next ``seconds``: libvirt reloads its networks' rules (and puts its jumps at position
    1) a few seconds after its unit counts as started. The number of repairs."""
    import os
    import time
    deadline = time.monotonic() + seconds
    repaired = 0
    while os.path.exists(__file__):  # uninstalled meanwhile: nothing more to keep
        if restore(jumps_only=True, backend=backend, log=log,
                   lock_timeout=lock_timeout).payload:
            repaired += 1
        if time.monotonic() + interval > deadline:
            break
        time.sleep(interval)
    return repaired


def _report(what: str, planned: HostPlan, payload: str, problems: list[str],
            dry_run: bool, log: Log) -> None:
    """The outcome in one line (the problems themselves are the caller's to show)."""
    if not dry_run:
        log(f"{what}: {len(planned.rules)} owner(s) with rules, "
            + ("changed" if payload else "nothing to change")
            + (f", {len(problems)} problem(s)" if problems else ""))


def flush(backend=None) -> Applied:
    """Remove all our rules and chains, and our accepts in libvirt's nftables table."""
    backend = backend or default_backend()
    with state.locked(installing=True):
        return _flush(backend)


def _flush(backend) -> Applied:
    from .backends.libvirt_nft import clear_accepts
    change = backend.clear(backend.read())
    backend.write(change)
    text = change.text + clear_accepts(backend)
    text += "".join(f"# {line}\n" for line in BridgePorts.beside(backend).release_all())
    return Applied(text)


def uninstall(backend=None) -> Applied:
    """What an uninstaller calls once no new hook can start (hook files and UFW's
    ``after.init`` entry removed): under the state lock, remove all our rules, chains and
    accepts and every state file, and leave the ``uninstalled`` marker, so that a hook
    or ``restore`` that was already waiting for the lock, or still starting, applies
    nothing. ``replay`` (or ``state.mark_installed``) lifts the marker at install."""
    backend = backend or default_backend()
    with state.locked(installing=True):
        flushed = _flush(backend)
        state.clear_for_uninstall()
    return flushed
