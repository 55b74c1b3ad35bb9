"""Intents as netfilter rules: the iptables backend's vocabulary (stages, verdicts,
conntrack states, how ``iptables-save`` prints sources). Pure.

Each intent expands to the rules that carry it out, in a fixed order (the golden text of
``tests/golden`` is this order rendered); an owner's rules are its intents' rules with
each identical rule once (two forwards to one guest port share their accepts).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Network, IPv6Network

from ..intents import BridgeLocal, Egress, Fence, Forward, HostServices, Intent
from ..model import IPAddress, IPNetwork, PortRange
from ..names import Tag

LOOPBACK = {4: IPv4Network("127.0.0.0/8"), 6: IPv6Network("::1/128")}
DHCP_SERVER_PORT = {4: 67, 6: 547}  # DHCPv4, DHCPv6: dnsmasq on the bridge
DNS_PORT = 53


def host_network(ip: IPAddress) -> IPNetwork:
    """The /32 or /128 of one address (from its int: no text round trip, 5x faster)."""
    return IPv4Network(int(ip)) if ip.version == 4 else IPv6Network(int(ip))


@dataclass(frozen=True)
class Rule:
    """One netfilter rule. ``stage`` is where in the packet's path it sits: input,
    forward, prerouting, output, postrouting (netfilter's hooks). ``family`` is 4 or 6,
    the family of the addresses it serves (set even on rules that match no address, such
    as bridge to bridge)."""

    stage: str
    family: int
    owner: str
    bridge: str
    subnet: str
    verdict: str  # ACCEPT, DNAT, MASQUERADE, RETURN (back to the built-in chain)
    src: IPNetwork | None = None
    dst: IPNetwork | None = None
    not_dst: IPNetwork | None = None
    iif: str | None = None
    oif: str | None = None
    proto: str | None = None
    sport: PortRange | None = None
    dport: PortRange | None = None  # DNAT: the host ports
    dst_local: bool = False  # destination is one of the host's addresses
    bridged: bool = False  # a frame the bridge forwards between its ports (br_netfilter)
    not_bcast_mcast: bool = False  # destination is neither broadcast nor multicast
    ctstate: str | None = None
    not_ctstate: str | None = None
    to_addr: IPAddress | None = None  # DNAT: the guest
    to_ports: PortRange | None = None  # DNAT (guest ports, same width as dport) or
    #                                    MASQUERADE (source ports)

    @property
    def tag(self) -> Tag:
        return Tag(self.owner, self.bridge, self.subnet)


def netfilter_rules(intents: Iterable[Intent]) -> tuple[Rule, ...]:
    """The rules of one owner's intents, in order, each identical rule once."""
    return tuple(dict.fromkeys(rule for intent in intents for rule in expand(intent)))


def expand(intent: Intent) -> list[Rule]:
    """The rules that carry out one intent."""
    rule = partial(Rule, family=intent.family, owner=intent.owner, bridge=intent.bridge,
                   subnet=intent.tag.subnet)
    bridge = intent.bridge
    if isinstance(intent, Forward):
        return _forward(intent, rule)
    if isinstance(intent, Fence):
        if intent.inbound:
            return [rule("forward", dst=intent.subnet, iif=other, oif=bridge,
                         not_ctstate="DNAT", verdict="RETURN") for other in intent.others]
        return [rule("forward", src=intent.subnet, iif=bridge, oif=other, not_ctstate="DNAT",
                     verdict="RETURN") for other in intent.others]
    if isinstance(intent, Egress):
        subnet, dev = intent.subnet, intent.dev
        if intent.masquerade:
            ports = intent.nat_ports
            out = [rule("forward", src=subnet, iif=bridge, oif=dev, verdict="ACCEPT"),
                   rule("forward", dst=subnet, iif=dev, oif=bridge,
                        ctstate="RELATED,ESTABLISHED", verdict="ACCEPT")]
            # IPv6 has no broadcast; multicast stays
            out += [rule("postrouting", src=subnet, not_dst=subnet, oif=dev, proto=proto,
                         not_bcast_mcast=intent.family == 4, verdict="MASQUERADE",
                         to_ports=ports if proto else None) for proto in ("tcp", "udp", None)]
            return out
        return [rule("forward", src=subnet, iif=bridge, oif=dev, verdict="ACCEPT"),
                *(rule("forward", dst=subnet, iif=other, oif=bridge, not_ctstate="DNAT",
                       verdict="RETURN") for other in intent.fence_inbound),
                rule("forward", dst=subnet, iif=dev, oif=bridge, verdict="ACCEPT")]
    if isinstance(intent, BridgeLocal):
        return [rule("forward", iif=bridge, oif=bridge, bridged=intent.bridged,
                     verdict="ACCEPT")]
    if isinstance(intent, HostServices):
        dhcp = DHCP_SERVER_PORT[intent.family]
        return [rule("input", iif=bridge, proto="udp", dport=PortRange(dhcp, dhcp),
                     verdict="ACCEPT"),
                *(rule("input", iif=bridge, proto=proto, dport=PortRange(DNS_PORT, DNS_PORT),
                       verdict="ACCEPT") for proto in ("udp", "tcp"))]
    raise TypeError(f"not an intent: {intent!r}")


def _forward(f: Forward, rule: partial[Rule]) -> list[Rule]:
    """DNAT from outside and from the host, FORWARD accepts limited to DNAT'd connections
    (both directions: replies must pass libvirt's and UFW's rejects on isolated networks
    too), and hairpin masquerade for guests on the same subnet."""
    guest = host_network(f.guest)
    rule = partial(rule, proto=f.proto)
    dnat = partial(rule, verdict="DNAT", dport=f.host_ports, to_addr=f.guest,
                   to_ports=f.guest_ports)
    host = host_network(f.host_ip) if f.host_ip is not None else None
    sources = source_matches(f.sources)
    # dst_local always, host-ip or not: a forward never matches traffic that is not
    # addressed to this host (a host-ip that stops being local matches nothing)
    out = [dnat("prerouting", src=src, dst=host, dst_local=True) for src in sources]
    out += [dnat("output", src=src, dst=host,
                 not_dst=LOOPBACK[f.family] if host is None else None, dst_local=True)
            for src in sources]
    out += [rule("forward", dst=guest, oif=f.bridge, dport=f.guest_ports, ctstate="DNAT",
                 verdict="ACCEPT"),
            rule("forward", src=guest, iif=f.bridge, sport=f.guest_ports, ctstate="DNAT",
                 verdict="ACCEPT"),
            rule("postrouting", src=f.subnet, dst=guest, oif=f.bridge, dport=f.guest_ports,
                 ctstate="DNAT", verdict="MASQUERADE")]
    return out


def source_matches(sources: tuple[IPNetwork, ...]) -> tuple[IPNetwork | None, ...]:
    """The ``-s`` of each DNAT rule: one per source, or one matching every source (None)
    when there is none or one is a whole family (``::/0``, ``0.0.0.0/0``: iptables-save
    prints no ``-s`` for those, so a rule written with one would never be seen in place
    again, and every apply would delete and re-add it)."""
    if not sources or any(net.prefixlen == 0 for net in sources):
        return (None,)
    return sources
