"""Which bridge ports need hairpin mode: a guest reaching its own forwards through the
host's address where bridged frames meet iptables (br_netfilter). Pure.

With ``net.bridge.bridge-nf-call-iptables`` (``-ip6tables``) on, as wherever Docker runs,
the DNAT of a guest's connection to ``host-address:port`` happens at the bridge layer,
before the bridge's forwarding decision; when the forward leads back to the same guest,
the bridge would have to send the frame out of the port it came in on, which it never
does unless that port is in hairpin mode. Without br_netfilter the same connection is
routed by the host and needs nothing.

Hairpin mode also reflects the guest's own broadcast and multicast frames back to it
(IPv6 duplicate address detection of guests without RFC 7527 nonces may then see its
own probe, ARP stacks their own announcements), so it is wanted only where it is needed:
on the bridge port (``<target dev=…>``) of a guest of ours with a forward of its own,
on a network we manage, and only when br_netfilter is on for a family of that forward
(the kernel participant, ``backends/bridgeports.py``, knows the sysctls and decides).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .intents import Forward, Intent
from .model import Domain
from .names import domain_owner


@dataclass(frozen=True)
class HairpinPort:
    """A guest's bridge port that needs hairpin mode when br_netfilter is on for one of
    ``families``: the guest's forwards lead back to it through ``bridge``."""

    port: str  # the tap, <target dev=…> of the domain's live XML
    bridge: str  # the bridge it must be a port of (else it is not the guest's any more)
    families: tuple[int, ...]


def plan_hairpin(dom: Domain, intents: Iterable[Intent]) -> tuple[HairpinPort, ...]:
    """The ports of ``dom`` that its own forwards lead back to: each NIC with a known tap
    on a bridge one of its forwards goes to, with the families of those forwards."""
    families: dict[str, set[int]] = {}
    for intent in intents:
        if isinstance(intent, Forward):
            families.setdefault(intent.bridge, set()).add(intent.family)
    out: dict[str, HairpinPort] = {}
    for nic in dom.nics:
        if nic.target and nic.bridge and nic.bridge in families:
            out.setdefault(nic.target, HairpinPort(nic.target, nic.bridge,
                                                   tuple(sorted(families[nic.bridge]))))
    return tuple(out.values())


def plan_host_hairpin(domains: Mapping[str, Domain],
                      rules: Mapping[str, Sequence[Intent]]) -> dict[str, tuple[HairpinPort, ...]]:
    """owner -> its ports needing hairpin, for every domain that has intents in ``rules``
    (a whole host's plan: ``replay``, ``restore``)."""
    out = {}
    for name, dom in domains.items():
        owner = domain_owner(name)
        if owner in rules:
            out[owner] = plan_hairpin(dom, rules[owner])
    return out
