"""Who may have which forward: every check between owners, for every operation. Pure:
the facts of the host (networks, running guests, libvirt's records of ports and leases,
the kernel's neighbour table, the host's addresses and listeners, the kernel's claims,
root's configuration) come in as data,
read by the caller (``ops``, ``edit``, ``status``, ``doctor``); nothing here reads the
kernel, the disk or libvirt.

A forward reaches only what its owner owns: a host port no other owner holds, a port
no host service uses unless root consents, and a guest address that is the owner's own.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from . import host
from .errors import ConfigError, InputError, Unavailable, shown
from .intents import Claim, Held, Intent
from .model import Domain, ForwardSpec, IPAddress, Network, PortRange
from .names import domain_owner, network_owner
from .plan import (
    Resolved,
    _booked_for,
    check_conflicts,
    eui64_address,
    plan_forwards,
    resolve_domain_forwards,
    resolved_with_families,
)

Claims = list[tuple[str, Iterable[ForwardSpec | Claim]]]
Facts = host.HostFacts | Callable[[], host.HostFacts]
Ports = Callable[[str], list[tuple[str, str]]]  # network name -> (MAC, owner) of its ports
Leases = Callable[[Network], Iterable[tuple[IPAddress, str | None]]]  # (address, MAC)
# the host's neighbour table on a network's bridge: (address, MAC it was last seen at)
Neighbours = Callable[[Network], Iterable[tuple[IPAddress, str]]]
# given an owner's forwards in the families they take: what the others claim that may clash
Others = Callable[[list[ForwardSpec]], Claims]


def withdraws(exc: InputError) -> bool:
    """Whether a re-check that refused an owner's forwards with ``exc`` must take its
    current rules away (fail closed): every refusal but an ``Unavailable`` one (its
    network is down, another owner holds its port) says a forward may reach what its
    owner does not own. Root's configuration being wrong (``ConfigError``) changes
    nothing either."""
    return not isinstance(exc, (Unavailable, ConfigError))


def kept_for_availability(owner: str, targets: Iterable[Resolved],
                          held: Iterable[Claim],
                          check: Callable[[list[Resolved]], None]) -> tuple[Intent, ...]:
    """An owner's forward rules after a refusal for availability (``withdraws`` false):
    each forward checked alone (``check``, given its resolved targets); one that passes
    gets its rules, one refused for availability keeps only the rules it has now (its
    targets at the guest address and host port the kernel holds for it, ``held``: none
    if it was never applied). A forward whose own refusal withdraws raises it: one
    unavailable forward shields no other. The owner's own rules (a network's bridge
    rules and fences) are the caller's, re-planned whatever happens."""
    forwards: dict[int, list[Resolved]] = {}
    for t in targets:
        forwards.setdefault(id(t.spec), []).append(t)
    held = tuple(held)
    out: list[Intent] = []
    for mine in forwards.values():
        try:
            check(mine)
        except InputError as exc:
            if withdraws(exc):
                raise
            mine = [t for t in mine if any(
                h.proto == t.spec.proto and h.host_port == t.spec.host_port
                and h.host_ip == t.spec.host_ip and t.guest_ip in h.guest_ips for h in held)]
        out += plan_forwards(owner, mine)
    return tuple(out)


def no_leases(_net: Network) -> tuple[tuple[IPAddress, str | None], ...]:
    return ()


def no_neighbours(_net: Network) -> tuple[tuple[IPAddress, str], ...]:
    return ()


def resolve_domain(dom: Domain, networks: Mapping[str, Network], ports: Ports,
                   leases: Leases = no_leases,
                   neighbours: Neighbours = no_neighbours) -> tuple[Resolved, ...]:
    """A guest's forwards resolved, and each target proven its own: no NIC with a copy
    of another running guest's MAC (``check_own_macs``), no address the host's records
    give another guest (``check_own_addresses``). Every operation resolves guests here."""
    check_own_macs(dom, networks, ports)
    try:
        targets = resolve_domain_forwards(dom, networks)
    except Unavailable as exc:  # the others are still checked: reaching someone wins
        check_own_addresses(dom, exc.resolved, ports, leases, neighbours)
        raise
    check_own_addresses(dom, targets, ports, leases, neighbours)
    return targets


def _on(dom: Domain, net: Network) -> set[str]:
    """The MACs of the guest's NICs on ``net`` (by name, or by its bridge)."""
    return {nic.mac for nic in dom.nics if nic.mac and (
        nic.network == net.name or (nic.bridge is not None and nic.bridge == net.bridge))}


def check_own_addresses(dom: Domain, targets: Iterable[Resolved], ports: Ports,
                        leases: Leases, neighbours: Neighbours = no_neighbours) -> None:
    """InputError if a forward's guest address is another guest's by the host's own
    records: a dnsmasq lease of a MAC that is none of this guest's NICs on that network
    (or of a client no record ties to a MAC: a DHCPv6 DUID without one),
    (IPv6, a /64) the SLAAC address of another guest's port there, or an address the
    host's neighbour table has at the MAC of another guest's port there (a static or a
    stable-privacy address: the MAC's owner now decides; a MAC of no port names no
    one). Reservations are ``plan``'s (they are in the network's XML). Each network's
    records are read once; the neighbour table only where another guest has a port."""
    seen: dict[str, dict[IPAddress, str]] = {}
    for t in targets:
        net = t.network
        theirs = seen.get(net.name)
        if theirs is None:
            theirs = seen[net.name] = _theirs(dom, net, ports, leases, neighbours)
        holder = theirs.get(t.guest_ip) if theirs else None
        if holder is not None:
            raise InputError(f"domain {shown(dom.name)}: {t.spec.label}: guest "
                             f"{t.guest_ip} on network {shown(net.name)} is another "
                             f"guest's ({holder}); a domain forwards only to its own "
                             "addresses")


def _theirs(dom: Domain, net: Network, ports: Ports, leases: Leases,
            neighbours: Neighbours) -> dict[IPAddress, str]:
    """The addresses on ``net`` the host's records give another than ``dom``, each with
    the record that says so. The neighbour table only speaks for addresses no
    reservation, lease or SLAAC address of this guest names (a guest that answers ARP
    or neighbour solicitations for another's address takes nothing from it)."""
    own = _on(dom, net)
    theirs: dict[IPAddress, str] = {}
    slaac = [s for s in net.subnets if s.version == 6 and s.prefixlen == 64]
    booked = {ip for mac in own for ip in _booked_for(dom, mac, net).values()}
    booked |= {eui64_address(subnet, mac) for mac in own for subnet in slaac}
    for ip, mac in leases(net):
        if mac is None:  # a client no record ties to a MAC: not provably this one
            theirs.setdefault(ip, "leased by dnsmasq to a client whose DUID "
                                  "names no MAC of this guest")
        elif mac not in own:
            theirs.setdefault(ip, f"leased by dnsmasq to MAC {mac}")
        else:
            booked.add(ip)
    others: dict[str, str] = {}  # MAC -> the other guest whose port has it
    for mac, owner in ports(net.name):
        if owner != dom.name and mac not in own:
            others.setdefault(mac, owner)
    for mac, owner in others.items():
        for subnet in slaac:
            theirs.setdefault(eui64_address(subnet, mac),
                              f"the SLAAC address of domain {shown(owner)}'s MAC {mac}")
    for ip, mac in neighbours(net) if others else ():
        if mac in others and ip not in booked:  # another's ARP never outweighs root's
            # reservation, dnsmasq's lease or the SLAAC address of this guest's MAC
            theirs.setdefault(ip, f"the host's neighbour table has it at MAC {mac}, "
                                  f"the MAC of domain {shown(others[mac])}'s port")
    return theirs


def owner_label(owner: str) -> str:
    """How messages name an owner known only by its tag: ``domain 'web1'``."""
    kind, _, name = owner.partition("=")
    return f"{'network' if kind == 'n' else 'domain'} {shown(name)}"


def claims(networks: Mapping[str, Network], domains: Mapping[str, Domain], skip: str,
           kernel: Held | None = None,
           held_only: bool = False) -> Claims:
    """Forwards of every owner but ``skip``, labelled for conflict messages: what our
    state says (the forwards as declared), and what the kernel holds for every owner
    the state does not know (a lost or corrupt state file hides no holder).
    ``held_only``: an owner of the state with rules in the kernel claims each forward in
    the families the kernel holds it in, not in every family its metadata allows."""
    kernel = kernel or {}

    def theirs(owner: str, specs: Sequence[ForwardSpec]) -> Sequence[ForwardSpec | Claim]:
        return _as_held(specs, kernel[owner]) if held_only and owner in kernel else specs

    out: Claims = [(f"network {shown(n.name)}", theirs(network_owner(n.name), n.forwards))
                   for n in networks.values() if n.managed and network_owner(n.name) != skip]
    out += [(f"domain {shown(d.name)}", theirs(domain_owner(d.name), d.forwards))
            for d in domains.values() if domain_owner(d.name) != skip]
    known = {network_owner(n) for n in networks} | {domain_owner(d) for d in domains}
    out += [(owner_label(owner), specs) for owner, specs in kernel.items()
            if owner != skip and owner not in known]
    return out


def _as_held(specs: Sequence[ForwardSpec], held: Sequence[Claim]) -> list[ForwardSpec]:
    """Each forward in the families its rules in the kernel hold it in (the kernel's
    claims carry the guest address, so their family); as declared where none does."""
    guests: dict[tuple[str, PortRange, IPAddress | None], dict[int, IPAddress]] = {}
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
                 kernel: Held | None = None) -> None:
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


def check_host(label: str, owner: str, forwards: Sequence[ForwardSpec], facts: Facts,
               networks: Mapping[str, Network], held: Iterable[Claim] = (),
               families: Sequence[Iterable[int]] | None = None) -> None:
    """InputError if a forward takes libvirt's own DNS/DHCP on a bridge address, if its
    host-ip is not the host's, or if it takes a host service's port without root's
    consent (``host.py``, ``config.py``). ``facts``: the host's, or how to read them
    (only when there are forwards: a guest without any reads nothing); ``held``: what
    the owner's rules take now, which a later socket does not take away; ``families``:
    per forward, the families it was planned in."""
    if not forwards:
        return
    check_libvirt_ports(label, forwards, networks)
    host.check_forwards(label, forwards, facts if isinstance(facts, host.HostFacts)
                        else facts(), held=held, families=families, owner=owner)


def check_forwards(label: str, owner: str, specs: Sequence[ForwardSpec],
                   targets: Sequence[Resolved], others: Others,
                   networks: Mapping[str, Network], facts: Facts | None,
                   held: Iterable[Claim] = ()) -> list[ForwardSpec]:
    """Every check of one owner's forwards (``specs``, resolved to ``targets``) against
    the other owners and the host, as each operation re-plans it: InputError names the
    owner, forward and reason. ``others``: given the forwards in the families they take,
    what the other owners claim that could clash; ``facts``: the host's (or how to read
    them), None for XML files that describe no host (``plan``: only what XML alone
    decides); ``held``: what the owner's rules take now. Returns the forwards in the
    families they take (what the owner claims once its rules are in)."""
    mine, families = resolved_with_families(specs, targets)
    check_conflicts(label, mine, others(mine))
    if facts is None:
        check_libvirt_ports(label, specs, networks)
    else:
        check_host(label, owner, specs, facts, networks, held, families)
    return mine


def held_by_others(owner: str, held: Held) -> Others:
    """``check_forwards``' ``others`` for an event: the ports the other owners' rules in
    the kernel hold (``held``)."""
    claimed: Claims = [(owner_label(o), specs) for o, specs in held.items() if o != owner]
    return lambda _mine: claimed


def captured(net: Network, held: Held) -> set[str]:
    """Owners whose forwards in the kernel reach a guest address inside ``net``'s
    subnets: a network that starts or changes may capture them (a narrower subnet
    beside theirs wins the route)."""
    subnets = net.subnets
    return {owner for owner, specs in held.items()
            if any(ip in s for spec in specs for ip in spec.guest_ips for s in subnets
                   if ip.version == s.version)}


LIBVIRT_PORTS = (("udp", 53), ("tcp", 53), ("udp", 67), ("udp", 547))  # dnsmasq's
_LIBVIRT_LOWEST = min(port for _proto, port in LIBVIRT_PORTS)
_LIBVIRT_HIGHEST = max(port for _proto, port in LIBVIRT_PORTS)


def check_libvirt_ports(label: str, forwards: Iterable[ForwardSpec],
                        networks: Mapping[str, Network]) -> None:
    """InputError if a forward would take libvirt's own DNS or DHCP on a bridge
    address: without host-ip it takes every local address, the bridges' included (and
    those of networks that start later); with a host-ip that is a network's address on
    its bridge. Never granted, by XML or by root's configuration: guests of that
    network would get the forward's answers."""
    bridged = {iface.ip for net in networks.values() for iface in net.interfaces}
    for index, spec in enumerate(forwards, start=1):
        if spec.host_port.first > _LIBVIRT_HIGHEST or spec.host_port.last < _LIBVIRT_LOWEST:
            continue  # most forwards: none of those ports (the loop below says the same)
        if spec.host_ip is not None and spec.host_ip not in bridged:
            continue
        for proto, port in LIBVIRT_PORTS:
            if spec.proto == proto and spec.host_port.first <= port <= spec.host_port.last:
                where = ("every local address, the bridges' included" if spec.host_ip is None
                         else f"{spec.host_ip}, a network's address on its bridge")
                raise InputError(f"{label}: forward #{index} ({spec.label}): host port "
                                 f"{port}/{proto} is libvirt's own DNS/DHCP on {where}; "
                                 "set a host-ip that is not a bridge's, or another port")


def same_mac(net: Network, domains: Mapping[str, Domain], mac: str, owner: str) -> list[str]:
    """Running guests with forwards, other than ``owner``, with a NIC of MAC ``mac`` on
    ``net``: a guest that started with a copy of another's MAC while that one was down
    (``check_own_macs`` refuses it only when the other's port already exists)."""
    return sorted(d.name for d in domains.values() if d.name != owner and d.forwards
                  and any(nic.mac == mac and (nic.network == net.name or (
                      nic.bridge is not None and nic.bridge == net.bridge)) for nic in d.nics))



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



@dataclass
class _Claimed:
    """Forwards claimed so far, by protocol and first host port: each owner is checked
    against the few that could overlap its own, not against all (a replay of hundreds
    of guests would be quadratic). Same answers and messages as checking against all."""

    # proto -> sorted (first host port, index into ``entries``)
    starts: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # (label, forward or claim)
    entries: list[tuple[str, ForwardSpec | Claim]] = field(default_factory=list)
    widest: int = 0  # the widest range claimed: how far back an overlap may start

    def near(self, forwards: Iterable[ForwardSpec]) -> Claims:
        found = []
        for spec in forwards:  # an overlap starts within [first - widest, last]
            starts = self.starts.get(spec.proto, [])
            lo = bisect_left(starts, (spec.host_port.first - self.widest, -1))
            hi = bisect_right(starts, (spec.host_port.last, len(self.entries)))
            found += [self.entries[i] for _first, i in starts[lo:hi]]
        return [(label, (spec,)) for label, spec in found]

    def add(self, label: str, forwards: Iterable[ForwardSpec | Claim]) -> None:
        for spec in forwards:
            insort(self.starts.setdefault(spec.proto, []),
                   (spec.host_port.first, len(self.entries)))
            self.entries.append((label, spec))
            self.widest = max(self.widest, spec.host_port.last - spec.host_port.first)
