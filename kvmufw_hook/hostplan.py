"""The whole host's desired state from everything known: every owner's rules, each
checked against the owners planned before it, and the parsing of the recorded owners'
XML. Pure: the kernel's holders, the host's facts and libvirt's records of ports come
in as data. ``replay``, ``restore``, ``plan``, ``status`` and ``doctor`` plan through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from . import host, state
from .errors import InputError, shown
from .model import Domain, ForwardSpec, Network
from .names import domain_owner, network_owner
from .plan import (
    Rule,
    forward_families,
    plan_forwards,
    plan_network,
    resolve_domain_forwards,
    resolve_network_forwards,
    resolved_specs,
)
from .policy import (
    _Claimed,
    check_conflicts,
    check_host,
    check_libvirt_ports,
    kept_for_availability,
    owner_label,
    resolve_domain,
    withdraws,
)


@dataclass
class HostPlan:
    """Every owner's rules for a whole host, and the owners that failed."""

    rules: dict[str, Sequence[Rule]]  # owner -> rules, for every owner that planned
    problems: list[str]  # one line per owner that did not
    failed: set[str]  # owners whose XML did not parse: their current rules stay as they are


def plan_host(networks: Mapping[str, Network], domains: Mapping[str, Domain],
              holders: Mapping[str, list[ForwardSpec]] | None = None,
              facts: host.HostFacts | None = None, broken: Iterable[str] = (),
              reserved: Iterable[str] = (),
              ports: Callable[[str], list[tuple[str, str]]] | None = None) -> HostPlan:
    """Every owner's rules for a whole host, each checked against the forwards of
    those planned before it. The current holders of ports (``holders``: owner -> the
    ports its rules in the kernel hold) are planned first, so a newcomer never takes a
    port from the guest or network that has it; then networks before guests, in name
    order. An owner refused is reported; for availability (``policy.withdraws``) it
    gets its own rules re-planned (a network's fences included) and, forward by forward,
    the new rules of those that pass and the current ones of those refused
    (``policy.kept_for_availability``; the ports they hold stay theirs); otherwise only
    its own rules (its forwards withdrawn). The others still plan. With ``facts`` forwards are
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

    def check(label: str, owner: str, forwards, targets) -> list[ForwardSpec]:
        mine = resolved_specs(forwards, targets)  # the families each really takes
        check_conflicts(label, mine, claimed.near(mine))
        if facts is not None:
            check_host(label, owner, forwards, facts, networks, held.get(owner, ()),
                       families=forward_families(forwards, targets))
        else:  # plan: XML files, not this host; what XML alone decides still holds
            check_libvirt_ports(label, forwards, networks)
        return mine

    def add(owner: str, label: str, forwards, resolve, plan_own) -> None:
        targets: Sequence = ()
        try:
            targets = resolve()
            mine = check(label, owner, forwards, targets)
            result.rules[owner] = plan_own() + plan_forwards(owner, targets)
            claimed.add(label, mine)
            return
        except InputError as exc:
            problem = exc
        if not withdraws(problem):  # each forward alone: its new rules, or those it has
            def alone(one: list) -> None:
                claimed.add(label, check(label, owner, [one[0].spec], one))

            try:
                kept_rules = kept_for_availability(
                    owner, targets or getattr(problem, "resolved", ()), held.get(owner, ()),
                    alone)
            except InputError as exc:  # one forward's refusal withdraws: all go
                problem = exc
            else:
                result.problems.append(str(problem))
                result.rules[owner] = plan_own() + kept_rules
                if owner in held:  # its rules stay in the kernel: so do its ports
                    claimed.add(label, held[owner])
                if owner in kept:  # still running with them: its ports wait for it
                    claimed.add(label, forwards)
                return
        # fail closed: its forwards go, its ports are free
        result.problems.append(f"{problem} (forwards withdrawn)" if owner in held
                               else str(problem))
        result.rules[owner] = plan_own()

    def resolve(dom: Domain):
        if ports is None:  # plan: XML files, not this host
            return resolve_domain_forwards(dom, networks)
        return resolve_domain(dom, networks, ports, host.network_leases)

    owners = [(network_owner(name), f"network {shown(name)}", net.forwards,
               lambda net=net: resolve_network_forwards(net, networks),
               lambda net=net: plan_network(net, networks))
              for name, net in sorted(networks.items()) if net.with_rules]
    owners += [(domain_owner(name), f"domain {shown(name)}", dom.forwards,
                lambda dom=dom: resolve(dom), tuple)
               for name, dom in sorted(domains.items()) if dom.forwards]
    # stable: holders first, then owners still running with theirs, order kept
    owners.sort(key=lambda o: 0 if o[0] in held else 1 if o[0] in kept else 2)
    for owner in owners:
        add(*owner)
    return result


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
