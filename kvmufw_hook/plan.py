"""model -> plan: what each owner wants, as intents (``intents.py``). Pure.

A network owns what makes its bridge and subnet work (egress, masquerade, fences
between networks, DHCP/DNS to the host) and the forwards of its own metadata. A domain
owns the forwards of its metadata. Every intent records its owner and the bridge and
subnet it serves, so that removal is exact; each backend turns intents into its own
rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv6Network

from .errors import InputError, Unavailable, shown
from .intents import (
    BridgeLocal,
    Claim,
    Egress,
    Fence,
    Forward,
    HostServices,
    NetworkIntent,
)
from .model import (
    FAMILIES,
    Domain,
    ForwardSpec,
    IPAddress,
    IPNetwork,
    Network,
    PortRange,
)
from .names import network_owner

DEFAULT_NAT_PORTS = PortRange(1024, 65535)  # libvirt's default for <nat>


@dataclass(frozen=True)
class Resolved:
    """A forward with its guest resolved in one family: which address, behind which
    network (a forward reachable over IPv4 and IPv6 resolves twice)."""

    spec: ForwardSpec
    guest_ip: IPAddress
    network: Network
    subnet: IPNetwork

    @property
    def family(self) -> int:
        return self.guest_ip.version


# --------------------------------------------------------------------------- networks

def _routes(net: Network, subnet: IPNetwork) -> bool:
    """Whether libvirt routes ``subnet`` rather than NATs it: route and open networks,
    and a nat network's IPv6 unless ``<nat ipv6='yes'/>``."""
    if net.mode == "nat":
        return subnet.version == 6 and not net.nat_ipv6
    return net.mode in ("route", "open")


def plan_network(net: Network,
                 others: Mapping[str, Network] | None = None) -> tuple[NetworkIntent, ...]:
    """What lets a managed network's guests talk, beside UFW's DROP policies, in each
    family the network has an address in. ``others``: the other active networks: a way
    out of the bridge to any interface (no ``<forward dev=…>``) is fenced from their
    bridges, whose libvirt rules refuse it (``LIBVIRT_FWI``) unless that network is
    routed; an open network's way into its bridge from any interface is fenced from what
    comes out of their bridges (``LIBVIRT_FWO`` refuses it out of an isolated one):
    between networks we are never looser than libvirt."""
    if net.bridged:
        return plan_bridged(net)
    if not net.managed:
        return ()
    owner = network_owner(net.name)
    bridge = net.bridge
    assert bridge is not None
    out: list[NetworkIntent] = []
    fenced = tuple(_fenced(net, others or {}))
    for subnet in net.subnets:
        mine = (owner, subnet.version, bridge, subnet)
        dev = net.dev if net.mode != "open" else None
        if net.mode != "isolated" and dev is None and fenced:  # before the way out to
            out.append(Fence(*mine, others=fenced))  # anywhere (a forward's: never fenced)
        if net.mode == "nat" and not _routes(net, subnet):
            out.append(Egress(*mine, dev=net.dev, masquerade=True,
                              nat_ports=net.nat_ports or DEFAULT_NAT_PORTS))
        elif net.mode != "isolated":  # routed: both ways, as libvirt does; an open
            # network's way in from another network's bridge is libvirt's to refuse
            out.append(Egress(*mine, dev=dev,
                              fence_inbound=fenced if net.mode == "open" else ()))
    for family in _families(net):
        first = next((s for s in net.subnets if s.version == family), None)
        out.append(BridgeLocal(owner, family, bridge, first))
        if first is not None:  # libvirt runs dnsmasq for it: DHCP and DNS to the host
            out.append(HostServices(owner, family, bridge, first))
    return tuple(out)


def plan_bridged(net: Network) -> tuple[NetworkIntent, ...]:
    """A bridge network's guests beside br_netfilter: frames that merely cross the bridge
    (between its ports: guests, the host's NIC) must pass UFW's FORWARD policy, in both
    families: never a packet the host routes, into, out of or back into the bridge."""
    assert net.bridge is not None
    return tuple(BridgeLocal(network_owner(net.name), family, net.bridge, None, bridged=True)
                 for family in FAMILIES)


def _fenced(net: Network, others: Mapping[str, Network]) -> list[str]:
    """The bridges of the other active networks whose libvirt rules refuse what comes
    from another bridge (every mode but open, which libvirt leaves alone), sorted."""
    return sorted({o.bridge for o in others.values() if o.managed and o.bridge
                   and o.bridge != net.bridge and o.mode != "open"})


def _families(net: Network) -> tuple[int, ...]:
    """The families of the network's subnets; IPv4 alone for a network without any
    (its guests still talk to each other across the bridge)."""
    return tuple(f for f in FAMILIES if any(s.version == f for s in net.subnets)) or (4,)


def _subnets(net: Network) -> str:
    return ", ".join(str(s) for s in net.subnets) or "no subnet"


def _family_name(family: int) -> str:
    return f"IPv{family}"


def resolve_network_forwards(net: Network,
                             others: Mapping[str, Network] | None = None) -> tuple[Resolved, ...]:
    """Each forward of a network's own metadata, in each family it has a guest address
    in: ``guest-ip`` (one per family), or ``guest-mac``'s IPv4 reservation and the IPv6
    reservation of the same host name. ``others``: the other networks (active), whose
    subnets a guest address must not lie in (``_routed_elsewhere``)."""
    what = f"network {shown(net.name)}"
    if net.forwards and not net.managed:
        raise InputError(f"{what}: forwards need a nat, route, open or isolated network "
                         f"with a bridge; this one is mode {shown(net.mode)}")
    out: list[Resolved] = []
    for index, spec in enumerate(net.forwards, start=1):
        where = f"{what}: forward #{index} ({spec.label})"
        if not spec.guest_ips and spec.guest_mac is None:
            raise InputError(f"{where}: needs guest-ip or guest-mac")
        booked = _booked_by_mac(net, spec.guest_mac) if spec.guest_mac else {}
        if spec.guest_mac is not None and not booked:
            raise InputError(f"{where}: guest-mac {spec.guest_mac} has no "
                             f"<dhcp><host> reservation in network {shown(net.name)}")
        targets = []
        for family in spec.families:
            guest = spec.guest_ip(family)
            if guest is not None and booked.get(family) not in (None, guest):
                raise InputError(f"{where}: guest-ip {guest} disagrees with the DHCP "
                                 f"reservation of guest-mac {spec.guest_mac}")
            guest = guest or booked.get(family)
            if guest is None:
                continue
            subnet = net.subnet_of(guest)
            if subnet is None:
                raise InputError(f"{where}: guest-ip {guest} is outside the subnets of "
                                 f"network {shown(net.name)} ({_subnets(net)})")
            targets.append(Resolved(spec, guest, net, subnet))
        out += _checked(where, spec, targets, others)
    return tuple(out)


def _booked_by_mac(net: Network, mac: str) -> dict[int, IPAddress]:
    """family -> the address reserved for ``mac``: its IPv4 ``<host mac=…>``, and the
    IPv6 ``<host>`` with that entry's name."""
    for host in net.hosts:
        if host.mac == mac:
            out = {4: host.ip}
            v6 = net.named_reservation(host.name, 6) if host.name else None
            if v6 is not None:
                out[6] = v6
            return out
    return {}


def _checked(where: str | Callable[[], str], spec: ForwardSpec, targets: list[Resolved],
             networks: Mapping[str, Network] | None = None,
             passed: set[tuple[IPAddress, int, IPNetwork]] | None = None) -> list[Resolved]:
    """The resolved targets, each a real guest of its own network; InputError when none
    is left in a family the forward is limited to (host-ip or sources of one family).
    ``where``: how messages name the forward (or how to spell it, only when needed);
    ``passed``: the (address, id of its network, subnet) already proven a guest's
    against the same ``networks`` (a guest's forwards mostly reach one address). Keyed
    by value, not by the ids of the address and subnet objects: an id can be reused once
    its object is freed, and a reused id would let an unproven address through."""
    if not targets:
        wanted = " or ".join(map(_family_name, spec.families)) or "any family"
        raise InputError(f"{_spelt(where)}: the guest has no {wanted} address to forward "
                         "to (host-ip and source limit the family)")
    for t in targets:
        key = (t.guest_ip, id(t.network), t.subnet)  # the network: alive with ``networks``
        if passed is not None and key in passed:
            continue
        _check_guest_address(_spelt(where), t.guest_ip, t.network, t.subnet)
        _routed_elsewhere(_spelt(where), t, networks or {})
        if passed is not None:
            passed.add(key)
    return targets


def _spelt(where: str | Callable[[], str]) -> str:
    return where if isinstance(where, str) else where()


def _routed_elsewhere(where: str, t: Resolved, networks: Mapping[str, Network]) -> None:
    """A guest address that lies in another network's subnet at least as specific as
    its own is that network's: the kernel routes it there (the longest prefix wins),
    where that network's rules may let it in (IPv6 of a nat network is routed: all of it
    passes), and this network's reservations know nothing of its guests. libvirt refuses
    a network whose route exists already, not one whose subnet holds another's."""
    for other in networks.values():
        if other.name == t.network.name or not other.managed:
            continue
        theirs = other.subnet_of(t.guest_ip)
        if theirs is not None and theirs.prefixlen >= t.subnet.prefixlen:
            raise InputError(f"{where}: guest {t.guest_ip} is in {theirs} of network "
                             f"{shown(other.name)}, not a guest of network "
                             f"{shown(t.network.name)} ({t.subnet})")


def _check_guest_address(where: str, ip: IPAddress, net: Network,
                         subnet: IPNetwork) -> None:
    """A forward's guest is a guest: never the subnet's network address (IPv4: a packet
    to it or to the broadcast address reaches every guest, or none; IPv6: the
    subnet-router anycast address, the router), nor the network's own address on the
    bridge (that is the host: a forward there is a way into the host's services)."""
    if ip.version == 4 and subnet.prefixlen < 31 and ip in (subnet.network_address,
                                                            subnet.broadcast_address):
        which = "network" if ip == subnet.network_address else "broadcast"
        raise InputError(f"{where}: guest {ip} is the {which} address of {subnet} "
                         f"(network {shown(net.name)}), not a guest")
    if ip.version == 6 and subnet.prefixlen < 127 and ip == subnet.network_address:
        raise InputError(f"{where}: guest {ip} is the subnet-router anycast address of "
                         f"{subnet} (network {shown(net.name)}), not a guest")
    if any(iface.ip == ip for iface in net.interfaces):
        raise InputError(f"{where}: guest {ip} is the address of network {shown(net.name)} "
                         "on its bridge (the host itself), not a guest")


def _reserved_by_others(dom: Domain,
                        attached: list[tuple[str, Network]]) -> dict[IPAddress, str]:
    """address -> who holds it by a <dhcp><host> reservation in the domain's networks:
    a MAC that is none of the domain's NICs, or a name-only entry (every IPv6 one) not
    named as it. Built once per domain: a guest may have thousands of forwards, a
    network thousands of reservations."""
    held: dict[IPAddress, str] = {}
    for net in {id(n): n for _m, n in attached}.values():
        # a reservation is the guest's only through a NIC on that very network: a second
        # NIC elsewhere (another network, an unmanaged bridge) with the MAC of another
        # guest's reservation here makes that guest's address no more this one's
        own = {mac for mac, n in attached if n is net}
        slaac = [s for s in net.subnets if s.version == 6 and s.prefixlen == 64]
        for host in net.hosts:
            if host.mac is not None and host.mac not in own:
                held.setdefault(host.ip, f"MAC {host.mac} in network {shown(net.name)}")
                for subnet in slaac:  # the address that MAC's guest autoconfigures
                    held.setdefault(eui64_address(subnet, host.mac),
                                    f"the SLAAC address of MAC {host.mac} in network "
                                    f"{shown(net.name)}")
            elif host.mac is None and host.name != dom.name:
                held.setdefault(host.ip, f"host {shown(host.name)} in network "
                                         f"{shown(net.name)}")
    return held


# remembered: each guest's check computes those of every other guest's port and
# reservation on its network (8 us each; 200 dual-stack guests: 40,000 per replay)
@lru_cache(maxsize=8192)
def eui64_address(subnet: IPNetwork, mac: str) -> IPAddress:
    """The address a NIC with ``mac`` autoconfigures in a /64 by SLAAC with a modified
    EUI-64 interface ID (RFC 4291, appendix A): ifupdown's and many appliances' default,
    so as much that guest's as its reservation."""
    raw = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([raw[0] ^ 0x02]) + raw[1:3] + b"\xff\xfe" + raw[3:6]
    return IPv6Network(subnet)[int.from_bytes(iid, "big")]


# --------------------------------------------------------------------------- domains

def domain_networks(dom: Domain, networks: Mapping[str, Network]) -> list[tuple[str, Network]]:
    """(MAC, network) of each NIC that sits on a network we manage, in NIC order."""
    by_bridge = {n.bridge: n for n in networks.values() if n.bridge}
    out = []
    for nic in dom.nics:
        net = networks.get(nic.network) if nic.network else by_bridge.get(nic.bridge or "")
        if net is not None and net.managed and nic.mac:
            out.append((nic.mac, net))
    return out


def _booked_for(dom: Domain, mac: str, net: Network) -> dict[int, IPAddress]:
    """family -> the guest's reserved address on one NIC: IPv4 by its MAC, IPv6 by the
    domain's name (libvirt's IPv6 reservations carry no MAC)."""
    out: dict[int, IPAddress] = {}
    for family, ip in ((4, net.reservation(mac)), (6, net.named_reservation(dom.name, 6))):
        if ip is not None and ip.version == family and net.subnet_of(ip) is not None:
            out[family] = ip
    return out


def resolve_domain_forwards(dom: Domain,
                            networks: Mapping[str, Network]) -> tuple[Resolved, ...]:
    """Each forward's guest address in each family: ``guest-ip`` (one per family), or
    the reservations of one NIC (IPv4 by MAC, IPv6 by the domain's name).

    Without ``mac``, a forward targets the first NIC on a managed network with a
    reservation for the guest (or, with ``guest-ip``, whose subnet holds that address).
    """
    what = f"domain {shown(dom.name)}"
    attached = domain_networks(dom, networks)
    others: dict[IPAddress, str] | None = None
    # once per NIC, not per forward
    booked: dict[tuple[str, int], list[tuple[int, IPAddress, IPNetwork]]] = {}
    passed: set[tuple[IPAddress, int, IPNetwork]] = set()  # guest addresses proven
    out: list[Resolved] = []

    def one(index: int, spec: ForwardSpec) -> list[Resolved]:
        nonlocal others

        def where() -> str:  # only for a refusal: thousands of forwards pass
            return f"{what}: forward #{index} ({spec.label})"
        candidates = attached
        if spec.mac is not None:
            candidates = [(mac, net) for mac, net in attached if mac == spec.mac]
            if not candidates:
                if any(nic.mac == spec.mac for nic in dom.nics):
                    raise Unavailable(f"{where()}: NIC {spec.mac} is not on a nat, route, open "
                                      "or isolated network with a bridge that is active")
                raise InputError(f"{where()}: the domain has no NIC with mac {spec.mac}")
        if not attached:
            raise Unavailable(f"{where()}: the domain has no NIC on a nat, route, open or "
                              "isolated network that is active")
        targets: list[Resolved] = []
        if spec.guest_ips:
            if others is None:
                others = _reserved_by_others(dom, attached)
            for guest in spec.guest_ips:
                if not spec.allows(guest.version):
                    continue  # host-ip or sources of the other family
                found = next(((net, sub) for _mac, net in candidates
                              if (sub := net.subnet_of(guest)) is not None), None)
                if found is None:
                    nets = ", ".join(f"{net.name} ({_subnets(net)})" for _m, net in candidates)
                    raise InputError(f"{where()}: guest-ip {guest} is outside the subnets "
                                     f"of the networks the guest is attached to: {nets}")
                holder = others.get(guest)
                if holder is not None:
                    raise InputError(f"{where()}: guest-ip {guest} is reserved for "
                                     f"another guest ({holder}); a domain forwards only "
                                     "to its own addresses")
                targets.append(Resolved(spec, guest, *found))
        else:
            allowed = spec.families
            for mac, net in candidates:
                key = (mac, id(net))
                reserved = booked.get(key)
                if reserved is None:  # (family, address, its subnet), by family
                    reserved = booked[key] = [
                        (family, ip, sub) for family, ip in sorted(
                            _booked_for(dom, mac, net).items())
                        if (sub := net.subnet_of(ip)) is not None]  # each is in one
                targets = [Resolved(spec, ip, net, subnet)
                           for family, ip, subnet in reserved if family in allowed]
                if targets:
                    break
            if not targets:
                macs = ", ".join(f"{mac} on {net.name}" for mac, net in candidates)
                raise InputError(f"{where()}: cannot resolve the guest address: no <dhcp><host> "
                                 f"reservation for {macs} (IPv4: by MAC; IPv6: by the name "
                                 f"{shown(dom.name)}); add one or set guest-ip")
        return _checked(where, spec, targets, networks, passed)

    # every forward is resolved: one whose network is down (Unavailable) must not hide
    # another that now reaches someone else's address (that refusal withdraws, so wins)
    unavailable: Unavailable | None = None
    for index, spec in enumerate(dom.forwards, start=1):
        try:
            out += one(index, spec)
        except Unavailable as exc:
            unavailable = unavailable or exc
    if unavailable is not None:
        unavailable.resolved = tuple(out)
        raise unavailable
    return tuple(out)


# --------------------------------------------------------------------------- forwards

def plan_forwards(owner: str, targets: Iterable[Resolved]) -> tuple[Forward, ...]:
    """Each resolved target as a forward of ``owner``, in its family, from the sources of
    that family."""
    out = []
    for t in targets:
        spec, bridge, family = t.spec, t.network.bridge, t.family
        assert bridge is not None
        out.append(Forward(owner, family, bridge, t.subnet, spec.proto, spec.host_port,
                           t.guest_ip, spec.guest_port, spec.host_ip,
                           spec.sources_in(family) if spec.sources else ()))
    return tuple(out)


def forward_families(specs: Iterable[ForwardSpec],
                     targets: Iterable[Resolved]) -> list[tuple[int, ...]]:
    """For each of ``specs``, in order, the families it was resolved in (the host's own
    ports it takes: ``host.check_forwards``)."""
    return resolved_with_families(specs, targets)[1]


def resolved_specs(specs: Iterable[ForwardSpec],
                   targets: Iterable[Resolved]) -> list[ForwardSpec]:
    """Each forward limited to the addresses it resolved to, so that its ``families``
    are the ones it takes host ports in (a forward without guest-ip may take both by its
    metadata, and takes only those its guest has an address in)."""
    return resolved_with_families(specs, targets)[0]


def resolved_with_families(specs: Iterable[ForwardSpec], targets: Iterable[Resolved]
                           ) -> tuple[list[ForwardSpec], list[tuple[int, ...]]]:
    """``resolved_specs`` and ``forward_families`` in one pass over the targets (every
    check of an owner needs both: thousands of forwards in a replay)."""
    found: dict[int, list[IPAddress]] = {}
    for t in targets:
        found.setdefault(id(t.spec), []).append(t.guest_ip)
    out: list[ForwardSpec] = []
    families: list[tuple[int, ...]] = []
    for spec in specs:
        ips = tuple(found.get(id(spec), ()))
        out.append(spec if not ips or ips == spec.guest_ips else with_guest_ips(spec, ips))
        families.append((ips[0].version,) if len(ips) == 1
                        else tuple(sorted({ip.version for ip in ips})))
    return out, families


def with_guest_ips(spec: ForwardSpec, ips: tuple[IPAddress, ...]) -> ForwardSpec:
    """``replace(spec, guest_ips=ips)``, built directly (thousands per replay)."""
    return ForwardSpec(spec.proto, spec.host_port, spec.guest_port, ips, spec.mac,
                       spec.guest_mac, spec.host_ip, spec.sources, spec.comment,
                       spec.allow_host_service)


# --------------------------------------------------------------------------- conflicts

def same_host_port(a: ForwardSpec | Claim, b: ForwardSpec | Claim) -> bool:
    """The one definition of "the same forward": both would catch a connection (the
    same proto, overlapping host ports, the same host-ip or either on every address, a
    family in common).
    Conflicts between owners, and ``forward add/remove``, all use it."""
    return (a.proto == b.proto and a.host_port.overlaps(b.host_port)
            and (a.host_ip is None or b.host_ip is None or a.host_ip == b.host_ip)
            and not set(a.families).isdisjoint(b.families))


def check_conflicts(owner_label: str, specs: Iterable[ForwardSpec],
                    others: Iterable[tuple[str, Iterable[ForwardSpec | Claim]]]) -> None:
    """InputError if a host port (proto, host-ip) is claimed twice.

    ``others`` is (label, forwards) of every other owner currently applied. A sweep
    over port ranges sorted by their start: O(n log n), so that a guest with thousands
    of forwards is checked in milliseconds.
    """
    entries: list[tuple[str, int, int, ForwardSpec | Claim, str | None]] = [
        (s.proto, s.host_port.first, i, s, None) for i, s in enumerate(specs)]
    entries += [(s.proto, s.host_port.first, -1, s, label)
                for label, theirs in others for s in theirs]
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    active: list[tuple[str, int, int, ForwardSpec | Claim, str | None]] = []
    for entry in entries:
        proto, first, _i, spec, label = entry
        active = [a for a in active if a[0] == proto and a[3].host_port.last >= first]
        for other in active:
            _p, _f, _j, other_spec, other_label = other
            if (label is None or other_label is None) and same_host_port(spec, other_spec):
                if label is None and other_label is None:
                    raise InputError(f"{owner_label}: {spec.label} overlaps "
                                     f"{other_spec.label} of the same owner")
                mine, theirs, whose = ((spec, other_spec, other_label) if label is None
                                       else (other_spec, spec, label))
                raise Unavailable(f"{owner_label}: {mine.label}: host port already "
                                  f"forwarded by {whose} ({theirs.label})")
        active.append(entry)


def validate_domain(dom: Domain) -> None:
    """What ``prepare`` can check before any network is known: the metadata parsed
    (the parser did that) and no forward overlapping another of the same guest."""
    check_conflicts(f"domain {shown(dom.name)}", dom.forwards, ())
