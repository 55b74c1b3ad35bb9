"""What the planner wants, in no firewall's words. Pure, frozen data.

The planner (``plan.py``) turns libvirt's networks and guests into intents; each backend
(``backends/``) turns intents into its own rules, map elements or accepts. An intent says
what traffic may go where, for whom (``owner``), in which address family, and on which
bridge and subnet it serves (what makes removal exact): never a chain, a table, a verdict
or a match as a tool spells it.

Every intent has ``owner``, ``family``, ``bridge`` and ``subnet`` (the subnet it serves,
None for one that serves the whole bridge); ``tag`` is the owner tag a backend writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .model import FAMILIES, IPAddress, IPNetwork, PortRange
from .names import Tag


@dataclass(frozen=True)
class _Owned:
    """What every intent has (a docstring of its own: dataclasses would otherwise build
    one with ``inspect``, which a guest's start never loads)."""

    owner: str
    family: int  # 4 or 6
    bridge: str
    subnet: IPNetwork | None

    @property
    def tag(self) -> Tag:
        return Tag(self.owner, self.bridge, "-" if self.subnet is None else str(self.subnet))


# --------------------------------------------------------------------------- forwards

@dataclass(frozen=True)
class Forward(_Owned):
    """A resolved port forward in one family: connections to the host's ``host_ports``
    (on ``host_ip``, or every local address) from ``sources`` (empty: anyone) go to
    ``guest``:``guest_ports`` behind ``bridge``, from outside, from the host itself and
    from guests on the same subnet (hairpin); only those connections reach the guest."""

    proto: str
    host_ports: PortRange
    guest: IPAddress
    guest_ports: PortRange
    host_ip: IPAddress | None = None
    sources: tuple[IPNetwork, ...] = ()


# --------------------------------------------------------------------------- networks

@dataclass(frozen=True)
class Fence(_Owned):
    """Traffic between this network's ``subnet`` and the bridges of ``others`` (other
    libvirt networks) is libvirt's to judge, never ours to accept: ``inbound`` fences what
    comes from their bridges into this one, else what leaves this bridge for theirs.
    Connections of a forward (translated to a guest) are not fenced."""

    others: tuple[str, ...] = ()
    inbound: bool = False


@dataclass(frozen=True)
class Egress(_Owned):
    """The subnet's guests reach the outside through ``dev`` (None: any interface).
    ``masquerade``: with the host's address (source ports ``nat_ports``), not to the
    subnet itself nor to broadcast/multicast, replies only coming back in; else routed:
    both ways, as libvirt does. ``fence_inbound`` (an open network): what comes from
    those bridges into the subnet is libvirt's to judge, ahead of the way in."""

    dev: str | None = None
    masquerade: bool = False
    nat_ports: PortRange | None = None
    fence_inbound: tuple[str, ...] = ()


@dataclass(frozen=True)
class BridgeLocal(_Owned):
    """Guests on the same bridge talk to each other. ``bridged``: a bridge network whose
    frames cross a host bridge (br_netfilter), never anything the host routes."""

    bridged: bool = False


@dataclass(frozen=True)
class HostServices(_Owned):
    """The bridge's guests reach libvirt's DHCP and DNS server on the host."""


NetworkIntent = Fence | Egress | BridgeLocal | HostServices
Intent = Forward | NetworkIntent


# --------------------------------------------------------------------------- claims

@dataclass(frozen=True)
class Claim:
    """A host port that a backend reads back as held in the kernel: protocol, host ports,
    host address (None: every local address) and the guest it goes to, which gives the
    claim its family (None when the kernel's rule did not say: then the host address's
    family, or every family). No guest port: only what the kernel holds is known."""

    proto: str
    host_port: PortRange
    guest: IPAddress | None = None
    host_ip: IPAddress | None = None

    @property
    def families(self) -> tuple[int, ...]:
        if self.guest is not None:
            return (self.guest.version,)
        return (self.host_ip.version,) if self.host_ip is not None else FAMILIES

    @property
    def guest_ips(self) -> tuple[IPAddress, ...]:
        return () if self.guest is None else (self.guest,)

    @property
    def label(self) -> str:
        """How messages name the claim: as ``ForwardSpec.label`` names a forward."""
        if self.host_ip is None:
            return f"forward {self.proto} {self.host_port}"
        host = f"[{self.host_ip}]" if self.host_ip.version == 6 else str(self.host_ip)
        return f"forward {self.proto} {host}:{self.host_port}"


Held = Mapping[str, Sequence[Claim]]  # owner -> the host ports its rules hold (``claims``)
