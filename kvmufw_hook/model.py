"""The model: frozen facts parsed from libvirt XML, nothing derived from the host."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)

# Forward modes whose bridge and subnet this package manages. Other modes
# (bridge, hostdev, passthrough, private, vepa, …) put guests on a host NIC or
# bridge that libvirt does not route, so there is nothing for us to do.
MANAGED_MODES = ("nat", "route", "open", "isolated")
PROTOCOLS = ("tcp", "udp", "sctp")
FAMILIES = (4, 6)  # IPv4, IPv6: an address's family is its ``version``, as in libvirt

TYPE_CHECKING = False
if TYPE_CHECKING:  # to mypy, what it is: a read-only property
    cached = property
else:
    class cached:
        """A property computed once per object, kept in the object's own ``__dict__``
        (a frozen dataclass without slots: the fields never change, so neither does
        it): ``functools.cached_property`` without its lock, which costs more than
        the little it caches here, thousands of times per replay."""

        def __init__(self, compute):
            self.compute, self.name, self.__doc__ = compute, compute.__name__, compute.__doc__

        def __get__(self, obj, owner=None):
            if obj is None:
                return self
            value = obj.__dict__[self.name] = self.compute(obj)
            return value


IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface


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
    guest_ips: tuple[IPAddress, ...] = ()  # guest-ip: at most one address per family
    mac: str | None = None  # domain metadata: which NIC
    guest_mac: str | None = None  # network metadata: resolve through <dhcp><host>
    host_ip: IPAddress | None = None
    sources: tuple[IPNetwork, ...] = ()
    comment: str | None = None
    allow_host_service: bool = False  # yes: may shadow a port a host service listens on

    def guest_ip(self, family: int) -> IPAddress | None:
        """The ``guest-ip`` address of ``family``, if one is given."""
        return next((ip for ip in self.guest_ips if ip.version == family), None)

    def sources_in(self, family: int) -> tuple[IPNetwork, ...]:
        return tuple(net for net in self.sources if net.version == family)

    def allows(self, family: int) -> bool:
        """Whether the forward may exist in ``family`` at all: its host-ip is of that
        family (or there is none), and so is one of its sources (or there are none; a
        forward limited to IPv6 sources must not open to everyone over IPv4)."""
        if self.host_ip is not None and self.host_ip.version != family:
            return False
        if self.guest_ips and self.guest_ip(family) is None:
            return False
        return not self.sources or bool(self.sources_in(family))

    # cached: asked several times of each forward by every check
    @cached
    def families(self) -> tuple[int, ...]:
        """The families in which the forward may take a host port: known from the
        metadata alone (a guest address from a reservation is learnt only later, so
        without guest-ip, host-ip or source a forward may take both)."""
        return tuple(f for f in FAMILIES if self.allows(f))

    @cached
    def label(self) -> str:
        """How messages name this forward: ``forward tcp 2222->22``."""
        text = f"forward {self.proto} {self.host_port}"
        if self.guest_port != self.host_port:
            text += f"->{self.guest_port}"
        if self.host_ip is not None:
            host = f"[{self.host_ip}]" if self.host_ip.version == 6 else str(self.host_ip)
            text = f"forward {self.proto} {host}:{self.host_port}" + (
                f"->{self.guest_port}" if self.guest_port != self.host_port else "")
        return text


@dataclass(frozen=True)
class DhcpHost:
    """A ``<dhcp><host>`` reservation."""

    mac: str | None  # IPv6 reservations have none: libvirt matches them by name or id
    ip: IPAddress
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
    nat_ipv6: bool = False  # <nat ipv6='yes'/>: libvirt masquerades IPv6 too

    @property
    def managed(self) -> bool:
        return self.mode in MANAGED_MODES and self.bridge is not None

    @property
    def bridged(self) -> bool:
        """``<forward mode='bridge'>`` on a host bridge libvirt names: its guests' frames
        cross that bridge, and meet iptables where br_netfilter is on."""
        return self.mode == "bridge" and self.bridge is not None

    @property
    def with_rules(self) -> bool:
        """Whether we keep rules for the network: managed or bridged."""
        return self.managed or self.bridged

    # cached: every guest on the network asks, and a network may hold thousands of
    # reservations
    @cached
    def interfaces(self) -> tuple[IPInterface, ...]:
        """The network's own addresses on its bridge, IPv4 first."""
        return (*self.ipv4, *self.ipv6)

    @cached
    def subnets(self) -> tuple[IPNetwork, ...]:
        return tuple(i.network for i in self.interfaces)

    def subnet_of(self, ip: IPAddress) -> IPNetwork | None:
        for net in self.subnets:
            if ip.version == net.version and ip in net:
                return net
        return None

    def reservation(self, mac: str) -> IPAddress | None:
        """The IPv4 address reserved for ``mac`` (IPv6 reservations carry no MAC): the
        first ``<host>`` with it."""
        return self._by_mac.get(mac)

    def named_reservation(self, name: str, family: int) -> IPAddress | None:
        """The address of ``family`` of the first ``<host>`` entry named exactly ``name``."""
        return self._by_name.get((name, family))

    @cached
    def _by_mac(self) -> dict[str, IPAddress]:
        found: dict[str, IPAddress] = {}
        for host in self.hosts:
            if host.mac is not None:
                found.setdefault(host.mac, host.ip)
        return found

    @cached
    def _by_name(self) -> dict[tuple[str, int], IPAddress]:
        found: dict[tuple[str, int], IPAddress] = {}
        for host in self.hosts:
            if host.name is not None:
                found.setdefault((host.name, host.ip.version), host.ip)
        return found


@dataclass(frozen=True)
class Nic:
    """A guest's ``<interface>``."""

    mac: str | None
    network: str | None  # <source network=…> for type='network'
    bridge: str | None  # known from qemu `start` on
    type: str = "network"
    target: str | None = None  # <target dev=…>: its bridge port (the tap), from `start` on


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
