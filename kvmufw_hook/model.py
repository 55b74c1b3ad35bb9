"""The model: frozen facts parsed from libvirt XML, nothing derived from the host."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface

# Forward modes whose bridge and subnet this package manages. Other modes
# (bridge, hostdev, passthrough, private, vepa, …) put guests on a host NIC or
# bridge that libvirt does not route, so there is nothing for us to do.
MANAGED_MODES = ("nat", "route", "open", "isolated")
PROTOCOLS = ("tcp", "udp", "sctp")


@dataclass(frozen=True)
class PortRange:
    """A port or an inclusive range of ports."""

    first: int
    last: int

    @property
    def width(self) -> int:
        return self.last - self.first + 1

    def overlaps(self, other: PortRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class ForwardSpec:
    """One ``<forward>`` of our metadata, as declared (nothing resolved yet)."""

    proto: str
    host_port: PortRange
    guest_port: PortRange
    guest_ip: IPv4Address | None = None
    mac: str | None = None  # domain metadata: which NIC
    guest_mac: str | None = None  # network metadata: resolve through <dhcp><host>
    host_ip: IPv4Address | None = None
    sources: tuple[IPv4Network, ...] = ()
    comment: str | None = None
    allow_host_service: bool = False  # yes: may shadow a port a host service listens on

    @property
    def label(self) -> str:
        """How messages name this forward: ``forward tcp 2222->22``."""
        text = f"forward {self.proto} {self.host_port}"
        if self.guest_port != self.host_port:
            text += f"->{self.guest_port}"
        if self.host_ip is not None:
            text = f"forward {self.proto} {self.host_ip}:{self.host_port}" + (
                f"->{self.guest_port}" if self.guest_port != self.host_port else "")
        return text


@dataclass(frozen=True)
class DhcpHost:
    """A ``<dhcp><host>`` reservation."""

    mac: str | None
    ip: IPv4Address
    name: str | None = None


@dataclass(frozen=True)
class Network:
    """A libvirt ``<network>``: what we need of it."""

    name: str
    uuid: str | None
    mode: str  # 'nat', 'route', 'open', 'isolated', or an unmanaged libvirt mode
    bridge: str | None
    dev: str | None  # <forward dev=…>: the only uplink libvirt allows
    ipv4: tuple[IPv4Interface, ...] = ()
    ipv6: tuple[IPv6Interface, ...] = ()
    hosts: tuple[DhcpHost, ...] = ()
    forwards: tuple[ForwardSpec, ...] = ()
    nat_ports: PortRange | None = None

    @property
    def managed(self) -> bool:
        return self.mode in MANAGED_MODES and self.bridge is not None

    @property
    def subnets(self) -> tuple[IPv4Network, ...]:
        return tuple(i.network for i in self.ipv4)

    def subnet_of(self, ip: IPv4Address) -> IPv4Network | None:
        for net in self.subnets:
            if ip in net:
                return net
        return None

    def reservation(self, mac: str) -> IPv4Address | None:
        for host in self.hosts:
            if host.mac == mac:
                return host.ip
        return None


@dataclass(frozen=True)
class Nic:
    """A guest's ``<interface>``."""

    mac: str | None
    network: str | None  # <source network=…> for type='network'
    bridge: str | None  # known from qemu `start` on
    type: str = "network"


@dataclass(frozen=True)
class Domain:
    """A libvirt ``<domain>``: its NICs and our forwards."""

    name: str
    uuid: str | None
    nics: tuple[Nic, ...] = ()
    forwards: tuple[ForwardSpec, ...] = ()


@dataclass(frozen=True)
class NetworkPort:
    """``<networkport>`` of a port-created/port-deleted call."""

    owner_name: str | None
    owner_uuid: str | None
    mac: str | None
    bridge: str | None
