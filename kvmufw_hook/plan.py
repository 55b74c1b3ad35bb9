"""model -> plan: the rules each owner wants, as backend-neutral data. Pure.

A network owns the rules that make its bridge and subnet work (masquerade, forward
accepts, DHCP/DNS to the host) and the forwards of its own metadata. A domain owns
the forwards of its metadata. Every rule records its owner and the bridge and subnet
it serves, so that removal is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network

from .errors import InputError, shown
from .model import Domain, ForwardSpec, Network, PortRange
from .names import domain_owner, network_owner

DEFAULT_NAT_PORTS = PortRange(1024, 65535)  # libvirt's default for <nat>
LOOPBACK = IPv4Network("127.0.0.0/8")


@dataclass(frozen=True)
class Rule:
    """One firewall rule, independent of the backend that renders it.

    ``hook`` is where it sits: input, forward, prerouting, output, postrouting.
    """

    hook: str
    owner: str
    bridge: str
    subnet: str
    verdict: str  # ACCEPT, DNAT, MASQUERADE
    src: IPv4Network | None = None
    dst: IPv4Network | None = None
    not_dst: IPv4Network | None = None  # ! -d
    iif: str | None = None
    oif: str | None = None
    proto: str | None = None
    sport: PortRange | None = None
    dport: PortRange | None = None
    dst_local: bool = False  # destination is one of the host's addresses
    not_bcast_mcast: bool = False  # destination is neither broadcast nor multicast
    ctstate: str | None = None
    to_addr: IPv4Address | None = None  # DNAT
    to_ports: PortRange | None = None  # DNAT (guest ports) or MASQUERADE (source ports)
    to_base: int | None = None  # DNAT of a shifted range: the first host port


@dataclass(frozen=True)
class Target:
    """A forward with its guest resolved: which address, behind which network."""

    spec: ForwardSpec
    guest_ip: IPv4Address
    network: Network
    subnet: IPv4Network


# --------------------------------------------------------------------------- networks

def plan_network(net: Network) -> tuple[Rule, ...]:
    """The rules that let a managed network's guests talk, beside UFW's DROP policies."""
    if not net.managed:
        return ()
    owner = network_owner(net.name)
    bridge = net.bridge
    assert bridge is not None
    first = str(net.subnets[0]) if net.subnets else "-"
    rules: list[Rule] = []
    for subnet in net.subnets:
        rule = partial(Rule, owner=owner, bridge=bridge, subnet=str(subnet))
        if net.mode == "nat":
            rules.append(rule("forward", src=subnet, iif=bridge, oif=net.dev,
                              verdict="ACCEPT"))
            rules.append(rule("forward", dst=subnet, iif=net.dev, oif=bridge,
                              ctstate="RELATED,ESTABLISHED", verdict="ACCEPT"))
            ports = net.nat_ports or DEFAULT_NAT_PORTS
            for proto in ("tcp", "udp", None):
                rules.append(rule("postrouting", src=subnet, not_dst=subnet, oif=net.dev,
                                  proto=proto, not_bcast_mcast=True, verdict="MASQUERADE",
                                  to_ports=ports if proto else None))
        elif net.mode in ("route", "open"):
            dev = net.dev if net.mode == "route" else None
            rules.append(rule("forward", src=subnet, iif=bridge, oif=dev,
                              verdict="ACCEPT"))
            rules.append(rule("forward", dst=subnet, iif=dev, oif=bridge,
                              verdict="ACCEPT"))
    rule = partial(Rule, owner=owner, bridge=bridge, subnet=first)
    rules.append(rule("forward", iif=bridge, oif=bridge, verdict="ACCEPT"))
    if net.subnets:  # libvirt runs dnsmasq for it: DHCP and DNS to the host
        rules.append(rule("input", iif=bridge, proto="udp", dport=PortRange(67, 67),
                          verdict="ACCEPT"))
        rules.append(rule("input", iif=bridge, proto="udp", dport=PortRange(53, 53),
                          verdict="ACCEPT"))
        rules.append(rule("input", iif=bridge, proto="tcp", dport=PortRange(53, 53),
                          verdict="ACCEPT"))
    return tuple(rules)


def resolve_network_forwards(net: Network) -> tuple[Target, ...]:
    what = f"network {shown(net.name)}"
    if net.forwards and not net.managed:
        raise InputError(f"{what}: forwards need a nat, route, open or isolated network "
                         f"with a bridge; this one is mode {shown(net.mode)}")
    targets = []
    for index, spec in enumerate(net.forwards, start=1):
        where = f"{what}: forward #{index} ({spec.label})"
        if spec.guest_ip is not None:
            guest = spec.guest_ip
            if spec.guest_mac and net.reservation(spec.guest_mac) not in (None, guest):
                raise InputError(f"{where}: guest-ip {guest} disagrees with the DHCP "
                                 f"reservation of guest-mac {spec.guest_mac}")
        elif spec.guest_mac is not None:
            found = net.reservation(spec.guest_mac)
            if found is None:
                raise InputError(f"{where}: guest-mac {spec.guest_mac} has no "
                                 f"<dhcp><host> reservation in network {shown(net.name)}")
            guest = found
        else:
            raise InputError(f"{where}: needs guest-ip or guest-mac")
        subnet = net.subnet_of(guest)
        if subnet is None:
            raise InputError(f"{where}: guest-ip {guest} is outside the subnets of network "
                             f"{shown(net.name)} ({_subnets(net)})")
        _check_guest_address(where, guest, net, subnet)
        targets.append(Target(spec, guest, net, subnet))
    return tuple(targets)


def _check_guest_address(where: str, ip: IPv4Address, net: Network,
                         subnet: IPv4Network) -> None:
    """A forward's guest is a guest: never the subnet's network or broadcast address (a
    packet to them reaches every guest, or none), nor the network's own address on the
    bridge (that is the host: a forward there is a way into the host's services)."""
    if subnet.prefixlen < 31 and ip in (subnet.network_address, subnet.broadcast_address):
        which = "network" if ip == subnet.network_address else "broadcast"
        raise InputError(f"{where}: guest {ip} is the {which} address of {subnet} "
                         f"(network {shown(net.name)}), not a guest")
    if any(iface.ip == ip for iface in net.ipv4):
        raise InputError(f"{where}: guest {ip} is the address of network {shown(net.name)} "
                         "on its bridge (the host itself), not a guest")


def _reserved_by_others(dom: Domain, attached: list[tuple[str, Network]]) -> dict:
    """address -> who holds it by a <dhcp><host> reservation in the domain's networks:
    a MAC that is none of the domain's NICs, or a name-only entry not named as it.
    Built once per domain: a guest may have thousands of forwards, a network thousands
    of reservations."""
    own = {nic.mac for nic in dom.nics if nic.mac}
    held: dict[IPv4Address, str] = {}
    for net in {id(n): n for _m, n in attached}.values():
        for host in net.hosts:
            if host.mac is not None and host.mac not in own:
                held.setdefault(host.ip, f"MAC {host.mac} in network {shown(net.name)}")
            elif host.mac is None and host.name != dom.name:
                held.setdefault(host.ip, f"host {shown(host.name)} in network "
                                         f"{shown(net.name)}")
    return held


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


def resolve_domain_forwards(dom: Domain, networks: Mapping[str, Network]) -> tuple[Target, ...]:
    """Each forward's guest address: its NIC's DHCP reservation, or ``guest-ip``.

    Without ``mac``, a forward targets the first NIC on a managed network whose MAC
    has a reservation (or, with ``guest-ip``, whose subnet holds that address).
    """
    what = f"domain {shown(dom.name)}"
    attached = domain_networks(dom, networks)
    others: dict | None = None
    targets = []
    for index, spec in enumerate(dom.forwards, start=1):
        where = f"{what}: forward #{index} ({spec.label})"
        candidates = attached
        if spec.mac is not None:
            candidates = [(mac, net) for mac, net in attached if mac == spec.mac]
            if not candidates:
                if any(nic.mac == spec.mac for nic in dom.nics):
                    raise InputError(f"{where}: NIC {spec.mac} is not on a nat, route, open "
                                     "or isolated network with a bridge")
                raise InputError(f"{where}: the domain has no NIC with mac {spec.mac}")
        if not attached:
            raise InputError(f"{where}: the domain has no NIC on a nat, route, open or "
                             "isolated network that is active")
        target = None
        if spec.guest_ip is not None:
            for _mac, net in candidates:
                subnet = net.subnet_of(spec.guest_ip)
                if subnet is not None:
                    target = Target(spec, spec.guest_ip, net, subnet)
                    break
            if target is None:
                nets = ", ".join(f"{net.name} ({_subnets(net)})" for _m, net in candidates)
                raise InputError(f"{where}: guest-ip {spec.guest_ip} is outside the subnets "
                                 f"of the networks the guest is attached to: {nets}")
            if others is None:
                others = _reserved_by_others(dom, attached)
            holder = others.get(spec.guest_ip)
            if holder is not None:
                raise InputError(f"{where}: guest-ip {spec.guest_ip} is reserved for "
                                 f"another guest ({holder}); a domain forwards only to "
                                 "its own addresses")
        else:
            for mac, net in candidates:
                ip = net.reservation(mac)
                subnet = net.subnet_of(ip) if ip is not None else None
                if ip is not None and subnet is not None:
                    target = Target(spec, ip, net, subnet)
                    break
            if target is None:
                macs = ", ".join(f"{mac} on {net.name}" for mac, net in candidates)
                raise InputError(f"{where}: cannot resolve the guest address: no <dhcp><host> "
                                 f"reservation for {macs}; add one or set guest-ip")
        _check_guest_address(where, target.guest_ip, target.network, target.subnet)
        targets.append(target)
    return tuple(targets)


# --------------------------------------------------------------------------- forwards

def plan_forwards(owner: str, targets: Iterable[Target]) -> tuple[Rule, ...]:
    """DNAT from outside and from the host, FORWARD accepts limited to DNAT'd
    connections (both directions: replies must pass libvirt's and UFW's rejects on
    isolated networks too), and hairpin masquerade for guests on the same subnet."""
    rules: list[Rule] = []
    for t in targets:
        spec, bridge = t.spec, t.network.bridge
        assert bridge is not None
        guest = IPv4Network(int(t.guest_ip))  # /32; from an int: no text round trip (5x)
        rule = partial(Rule, owner=owner, bridge=bridge, subnet=str(t.subnet), proto=spec.proto)
        shifted = spec.guest_port.width > 1 and spec.guest_port != spec.host_port
        dnat = partial(rule, verdict="DNAT", dport=spec.host_port, to_addr=t.guest_ip,
                       to_ports=spec.guest_port,
                       to_base=spec.host_port.first if shifted else None)
        host = IPv4Network(spec.host_ip) if spec.host_ip is not None else None
        # --dst-type LOCAL always, host-ip or not: a forward never matches traffic that
        # is not addressed to this host (a host-ip that stops being local matches nothing)
        for src in spec.sources or (None,):
            rules.append(dnat("prerouting", src=src, dst=host, dst_local=True))
        for src in spec.sources or (None,):
            rules.append(dnat("output", src=src, dst=host,
                              not_dst=LOOPBACK if host is None else None, dst_local=True))
        rules.append(rule("forward", dst=guest, oif=bridge, dport=spec.guest_port,
                          ctstate="DNAT", verdict="ACCEPT"))
        rules.append(rule("forward", src=guest, iif=bridge, sport=spec.guest_port,
                          ctstate="DNAT", verdict="ACCEPT"))
        rules.append(rule("postrouting", src=t.subnet, dst=guest, oif=bridge,
                          dport=spec.guest_port, ctstate="DNAT", verdict="MASQUERADE"))
    return tuple(rules)


def plan_network_owner(net: Network) -> tuple[Rule, ...]:
    """Everything the network owns: its bridge rules and its metadata forwards."""
    return plan_network(net) + plan_forwards(network_owner(net.name),
                                             resolve_network_forwards(net))


def plan_domain_owner(dom: Domain, networks: Mapping[str, Network]) -> tuple[Rule, ...]:
    return plan_forwards(domain_owner(dom.name), resolve_domain_forwards(dom, networks))


# --------------------------------------------------------------------------- conflicts

def same_host_port(a: ForwardSpec, b: ForwardSpec) -> bool:
    """The one definition of "the same forward": both would catch a connection (the
    same proto, overlapping host ports, the same host-ip or either on every address).
    Conflicts between owners, and ``forward add/remove``, all use it."""
    return (a.proto == b.proto and a.host_port.overlaps(b.host_port)
            and (a.host_ip is None or b.host_ip is None or a.host_ip == b.host_ip))


def check_conflicts(owner_label: str, specs: Iterable[ForwardSpec],
                    others: Iterable[tuple[str, Iterable[ForwardSpec]]]) -> None:
    """InputError if a host port (proto, host-ip) is claimed twice.

    ``others`` is (label, forwards) of every other owner currently applied. A sweep
    over port ranges sorted by their start: O(n log n), so that a guest with thousands
    of forwards is checked in milliseconds.
    """
    entries: list[tuple[str, int, int, ForwardSpec, str | None]] = [
        (s.proto, s.host_port.first, i, s, None) for i, s in enumerate(specs)]
    entries += [(s.proto, s.host_port.first, -1, s, label)
                for label, theirs in others for s in theirs]
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    active: list[tuple] = []
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
                raise InputError(f"{owner_label}: {mine.label}: host port already "
                                 f"forwarded by {whose} ({theirs.label})")
        active.append(entry)


def validate_domain(dom: Domain) -> None:
    """What ``prepare`` can check before any network is known: the metadata parsed
    (the parser did that) and no forward overlapping another of the same guest."""
    check_conflicts(f"domain {shown(dom.name)}", dom.forwards, ())


def _subnets(net: Network) -> str:
    return ", ".join(str(s) for s in net.subnets) or "no IPv4 subnet"
