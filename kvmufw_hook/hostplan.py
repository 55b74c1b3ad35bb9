"""An owner's rules, composed one way for every operation (``compose``; ``settle`` when
checks may refuse some of its forwards), and the whole host's desired state from
everything known (``plan_host``: every owner's rules, each checked against the owners
planned before it), with the parsing of the recorded owners' XML. Pure: the kernel's
holders, the host's facts and libvirt's records of ports and leases come in as data.
Hooks, ``replay``, ``restore``, ``plan``, ``status`` and ``doctor`` plan through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from . import host, state
from .errors import InputError, shown
from .intents import Claim, Held, Intent
from .model import Domain, ForwardSpec, IPAddress, Network
from .names import domain_owner, network_owner
from .parse import object_name, parse_domain_xml, parse_network_xml
from .plan import (
    Resolved,
    forward_families,
    plan_forwards,
    plan_network,
    resolve_network_forwards,
    resolved_specs,
)
from .policy import (
    Leases,
    Neighbours,
    Ports,
    _Claimed,
    check_forwards,
    kept_for_availability,
    no_leases,
    no_neighbours,
    owner_label,
    resolve_domain,
    withdraws,
)


def no_ports(_network: str) -> list[tuple[str, str]]:
    return []


def owner_of(subject: Network | Domain) -> str:
    """The owner tag of a network or a guest."""
    return (network_owner if isinstance(subject, Network) else domain_owner)(subject.name)


def label_of(subject: Network | Domain) -> str:
    """How messages name a network or a guest: ``domain 'web1'``."""
    return f"{'network' if isinstance(subject, Network) else 'domain'} {shown(subject.name)}"


@dataclass(frozen=True)
class Composed:
    """An owner's forwards resolved and its rules planned, before any check between
    owners."""

    owner: str
    label: str
    specs: tuple[ForwardSpec, ...]
    targets: tuple[Resolved, ...]
    rules: tuple[Intent, ...]  # its own (a network's bridge rules and fences), then forwards

    @property
    def resolved(self) -> list[ForwardSpec]:
        """Each forward limited to the families it takes host ports in."""
        return resolved_specs(self.specs, self.targets)

    @property
    def families(self) -> list[tuple[int, ...]]:
        return forward_families(self.specs, self.targets)


def own_rules(subject: Network | Domain,
              networks: Mapping[str, Network] | None = None) -> tuple[Intent, ...]:
    """What an owner has whatever its forwards: a network's bridge rules and fences."""
    return plan_network(subject, networks) if isinstance(subject, Network) else ()


def compose(subject: Network | Domain, networks: Mapping[str, Network] | None = None,
            ports: Ports = no_ports, leases: Leases = no_leases,
            neighbours: Neighbours = no_neighbours) -> Composed:
    """The one way an owner's rules are composed, for every operation and every test:
    its own rules, then its forwards resolved (a guest's through ``policy.resolve_domain``,
    each target proven its own by ``ports`` and ``leases``, libvirt's records, and
    ``neighbours``, the host's neighbour table) and planned. InputError if a forward
    cannot be resolved. ``networks``: the active ones."""
    owner = owner_of(subject)
    if isinstance(subject, Network):
        targets = resolve_network_forwards(subject, networks)
    else:
        targets = resolve_domain(subject, networks or {}, ports, leases, neighbours)
    return Composed(owner, label_of(subject), tuple(subject.forwards), tuple(targets),
                    own_rules(subject, networks) + plan_forwards(owner, targets))


def owner_rules(subject: Network | Domain, networks: Mapping[str, Network] | None = None,
                ports: Ports = no_ports, leases: Leases = no_leases) -> tuple[Intent, ...]:
    """Everything an owner's rules are (``compose``), checked against no other owner."""
    return compose(subject, networks, ports, leases).rules


Check = Callable[[str, str, Sequence[ForwardSpec], Sequence[Resolved]], None]


@dataclass(frozen=True)
class Settled:
    """An owner's rules after its checks, and why not every forward got its new ones."""

    rules: tuple[Intent, ...]
    problem: InputError | None = None
    withdrawn: bool = False  # fail closed: its forwards went (else kept for availability)


def settle(subject: Network | Domain, networks: Mapping[str, Network], check: Check,
           held: Iterable[Claim] = (), ports: Ports = no_ports,
           leases: Leases = no_leases, neighbours: Neighbours = no_neighbours) -> Settled:
    """An owner re-planned (a network event, ``replay``, ``restore``): its composed rules
    if ``check`` (``policy.check_forwards``, given label, owner, forwards and targets)
    passes. If not, its own rules (a network's bridge rules and fences, re-planned
    whatever happens) and, when the reason is availability (``policy.withdraws``), each
    forward checked alone: its new rules, or the current ones (``held``) of a forward
    refused for availability (``policy.kept_for_availability``); otherwise its forwards
    are withdrawn."""
    owner, label = owner_of(subject), label_of(subject)
    composed: Composed | None = None
    try:
        composed = compose(subject, networks, ports, leases, neighbours)
        check(label, owner, composed.specs, composed.targets)
        return Settled(composed.rules)
    except InputError as exc:
        problem = exc
    own = own_rules(subject, networks)
    if not withdraws(problem):  # each forward alone: its new rules, or those it has
        targets = composed.targets if composed else getattr(problem, "resolved", ())
        try:
            return Settled(own + kept_for_availability(
                owner, targets, held,
                lambda mine: check(label, owner, [mine[0].spec], mine)), problem)
        except InputError as worse:  # one forward's refusal withdraws: all go
            problem = worse
    return Settled(own, problem, withdrawn=True)


@dataclass
class HostPlan:
    """Every owner's rules for a whole host, and the owners that failed."""

    rules: dict[str, Sequence[Intent]]  # owner -> rules, for every owner that planned
    problems: list[str]  # one line per owner that did not
    failed: set[str]  # owners whose XML did not parse: their current rules stay as they are


def plan_host(networks: Mapping[str, Network], domains: Mapping[str, Domain],
              holders: Held | None = None,
              facts: host.HostFacts | None = None, broken: Iterable[str] = (),
              reserved: Iterable[str] = (),
              ports: Ports | None = None,
              neighbours: Neighbours = no_neighbours) -> HostPlan:
    """Every owner's rules for a whole host, each checked against the forwards of
    those planned before it. The current holders of ports (``holders``: owner -> the
    ports its rules in the kernel hold) are planned first, so a newcomer never takes a
    port from the guest or network that has it; then networks before guests, in name
    order. Each owner is settled (``settle``) as every event settles it; one refused
    is reported, and the ports of forwards it keeps for availability stay its own. The
    others still plan. With ``facts`` forwards are
    checked against the host itself (``host.py``): not for ``plan``, which describes XML
    files, not this host. ``broken``: owners whose XML did not even parse; they fail
    too, keeping their rules and ports. ``reserved``: owners whose forwards were applied
    and who still run (our state says so): planned right after the holders, and if they
    fail (their network is down, say) their ports stay theirs. ``ports``: the MACs of
    each network's ports as libvirt reported them (``check_own_macs``), with the
    dnsmasq leases; None for XML files (``plan``): no records of a host. ``neighbours``:
    the host's neighbour table (``neighbours.reader``)."""
    held = holders or {}
    kept = set(reserved)
    result = HostPlan({}, [], set(broken))
    claimed = _Claimed()
    for o in result.failed:
        if o in held:
            claimed.add(owner_label(o), held[o])
    # plan: XML files, not this host: no records of its ports or leases
    leases: Leases = _leases_once() if ports is not None else no_leases
    if ports is not None:
        ports = _ports_once(ports)

    def check(label: str, owner: str, specs: Sequence[ForwardSpec],
              targets: Sequence[Resolved]) -> None:
        claimed.add(label, check_forwards(label, owner, specs, targets, claimed.near,
                                          networks, facts, held.get(owner, ())))

    def add(subject: Network | Domain) -> None:
        owner = owner_of(subject)
        settled = settle(subject, networks, check, held.get(owner, ()), ports or no_ports,
                         leases, neighbours)
        result.rules[owner] = settled.rules
        if settled.problem is None:
            return
        if not settled.withdrawn:  # refused for availability
            result.problems.append(str(settled.problem))
            if owner in held:  # its rules stay in the kernel: so do its ports
                claimed.add(label_of(subject), held[owner])
            if owner in kept:  # still running with them: its ports wait for it
                claimed.add(label_of(subject), subject.forwards)
            return
        # fail closed: its forwards go, its ports are free
        result.problems.append(f"{settled.problem} (forwards withdrawn)" if owner in held
                               else str(settled.problem))

    owners: list[Network | Domain] = [net for _name, net in sorted(networks.items())
                                      if net.with_rules]
    owners += [dom for _name, dom in sorted(domains.items()) if dom.forwards]
    # stable: holders first, then owners still running with theirs, order kept
    owners.sort(key=lambda o: 0 if owner_of(o) in held else 1 if owner_of(o) in kept else 2)
    for subject in owners:
        add(subject)
    return result


def _ports_once(ports: Ports) -> Ports:
    """``ports``, each network's read once per plan (not once per guest): the state
    is locked meanwhile, so the file is the same on every read."""
    seen: dict[str, list[tuple[str, str]]] = {}

    def once(network: str) -> list[tuple[str, str]]:
        if network not in seen:
            seen[network] = ports(network)
        return seen[network]
    return once


def _leases_once() -> Leases:
    """``host.network_leases``, each bridge's dnsmasq record read once per plan (not
    once per guest on it): one snapshot for every guest."""
    seen: dict[str | None, tuple[tuple[IPAddress, str | None], ...]] = {}

    def once(net: Network) -> tuple[tuple[IPAddress, str | None], ...]:
        if net.bridge not in seen:
            seen[net.bridge] = host.network_leases(net)
        return seen[net.bridge]
    return once


def _parse_all(network_xmls: Iterable[bytes], domain_xmls: Iterable[bytes],
               problems: list[str]) -> tuple[dict[str, tuple[Network, bytes]],
                                             dict[str, tuple[Domain, bytes]],
                                             set[str], set[tuple[str, str]]]:
    """The parsed networks and guests (name -> (model, raw)), the owners that failed
    (``broken``) and the state files that stay (``kept``), as ``replay`` needs them. A
    document that does not parse is a problem; if its name can still be read, that
    owner fails: its rules, ports and state stay as they are."""
    broken: set[str] = set()
    kept: set[tuple[str, str]] = set()  # (state kind, name) whose files stay
    networks: dict[str, tuple[Network, bytes]] = {}
    domains: dict[str, tuple[Domain, bytes]] = {}
    kinds: tuple[tuple[Iterable[bytes], Callable[[bytes], Network | Domain],
                       Callable[[str], str], str], ...] = (
        (network_xmls, parse_network_xml, network_owner, "networks"),
        (domain_xmls, parse_domain_xml, domain_owner, "domains"))
    for raws, parse, owner, kind in kinds:
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
            if isinstance(obj, Network):
                networks[obj.name] = (obj, raw)
            else:
                domains[obj.name] = (obj, raw)
    # forward add --network on a running network: libvirt's live XML is stale until the
    # network restarts; the override is the truth (the hooks drop it at network start)
    for name, (net, raw) in list(networks.items()):
        try:
            networks[name] = (state.with_override(net), raw)
        except InputError as exc:
            problems.append(f"network {shown(name)}: override: {exc}")
            broken.add(network_owner(name))
    return networks, domains, broken, kept
