"""What the host itself has, read from /proc of the current network namespace (no process
spawned): its local addresses of both families, and the sockets its own services listen on.

A forward may only take traffic addressed to this host and only a port no host service
uses: ``host-ip`` must be one of the host's addresses (never loopback, never IPv6
link-local, never an IPv6 address another host on the link holds), and a host port on
which a host service listens (tcp) or is bound (udp) is refused unless root consents in
the configuration file (``config.py``: ``allow_host_service``, naming the owner, the
protocol and the port; the XML's ``allow-host-service`` is guest-writable and grants
nothing). Ports are per family: a forward takes a host port only in
the families the plan gives it (at most ``ForwardSpec.families``), and a socket only
takes the families it is bound in. Both are checked whenever rules are applied, because addresses
and services come and go.
"""

from __future__ import annotations

import json
import os
import sys
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from .config import Config
from .errors import InputError, Unavailable, printable, shown
from .model import ForwardSpec, IPAddress, Network, PortRange
from .names import dnsmasq_dir, login_defs_path, unsafe_name
from .process import read_elsewhere
from .sockdiag import tcp_listeners

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only
    from .intents import Claim

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"
IFA_F_DADFAILED = 0x08  # if_inet6 flags: duplicate address detection found another holder
UNPRIVILEGED_PORT = 1024  # net.ipv4.ip_unprivileged_port_start, the kernel's default
USER_UIDS = (1000, 60000)  # login.defs' UID_MIN and UID_MAX when it does not say


def read_user_uids(path: str | None = None) -> tuple[int, int]:
    """(UID_MIN, UID_MAX) of people's accounts, as the host's login.defs says: every
    uid outside is root or a system account (Ubuntu's libvirt-qemu 64055, systemd's
    DynamicUser 61184-65519, nobody 65534), whose sockets are host services."""
    if path is None:
        path = login_defs_path()
    found = dict(zip(("UID_MIN", "UID_MAX"), USER_UIDS, strict=True))
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 2 and fields[0] in found and fields[1].isdigit():
                    found[fields[0]] = int(fields[1])
    except OSError:
        pass  # no login.defs: the shadow suite's defaults
    return found["UID_MIN"], found["UID_MAX"]


def read_unprivileged_port(proc: str = "/proc") -> int:
    """net.ipv4.ip_unprivileged_port_start: below it only privileged processes bind."""
    try:
        with open(f"{proc}/sys/net/ipv4/ip_unprivileged_port_start", encoding="utf-8",
                  errors="replace") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return UNPRIVILEGED_PORT


@dataclass(frozen=True, slots=True)
class Listener:
    """A socket a host service listens on (tcp) or is bound to (udp)."""

    proto: str  # tcp or udp
    addr: IPv4Address | IPv6Address  # unspecified (0.0.0.0, ::) = every address
    port: int
    inode: int
    uid: int = 0
    v6only: bool = False  # known for tcp (sock_diag); a udp ``::`` socket takes both

    def is_service(self, users: tuple[int, int] = USER_UIDS,
                   unprivileged: int = UNPRIVILEGED_PORT) -> bool:
        """Whether this is the host's own service: a privileged port (only privileged
        processes bind those), or a socket of root or a system account (any uid outside
        ``users``, login.defs' UID_MIN..UID_MAX). A socket an ordinary user opened later
        (``nc -l 8080``) vetoes nothing root configured."""
        return self.port < unprivileged or not users[0] <= self.uid <= users[1]

    def bound(self) -> tuple[IPAddress, tuple[int, ...]]:
        """The address this socket is bound to, and the families whose traffic it takes:
        an IPv4-mapped IPv6 address is that IPv4 address; ``::`` takes IPv4 too unless
        the socket is IPv6-only."""
        addr = self.addr
        if isinstance(addr, IPv6Address):
            if addr.ipv4_mapped is not None:
                return addr.ipv4_mapped, (4,)
            if addr.is_unspecified and not self.v6only:
                return addr, (4, 6)
            return addr, (6,)
        return addr, (4,)

    def reaches(self, family: int, host_ip: IPAddress | None = None) -> bool:
        """Whether a connection of ``family`` that our forward would DNAT (addressed to
        ``host_ip``, or to any local address if None) could have reached this socket:
        the socket takes that family, and is not loopback-only."""
        addr, families = self.bound()
        if family not in families or addr.is_loopback:
            return False  # forwards never DNAT loopback destinations
        return addr.is_unspecified or host_ip is None or addr == host_ip


def _hex_address(text: str) -> IPv4Address | IPv6Address:
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":  # /proc prints each 32-bit word in host byte order
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ip_address(raw)


def read_listeners(proc: str = "/proc") -> tuple[Listener, ...]:
    out = []
    for proto, files, wanted in (("tcp", ("tcp", "tcp6"), _TCP_LISTEN),
                                 ("udp", ("udp", "udp6"), _UDP_UNCONNECTED)):
        if proto == "tcp" and proc == "/proc":
            try:  # the same sockets, without walking every connection (sockdiag.py)
                out += [Listener("tcp", ip_address(addr), port, inode, uid, v6only)
                        for addr, port, inode, uid, v6only in tcp_listeners()]
                continue
            except OSError:
                pass  # no sock_diag in this kernel: /proc/net/tcp*
        for name in files:
            try:
                with open(f"{proc}/net/{name}", encoding="utf-8", errors="replace") as fh:
                    next(fh, None)
                    for line in fh:
                        fields = line.split()
                        if len(fields) < 10 or fields[3] != wanted:
                            continue
                        addr, _, port = fields[1].partition(":")
                        out.append(Listener(proto, _hex_address(addr), int(port, 16),
                                            int(fields[9]), int(fields[7])))
            except FileNotFoundError:
                continue  # no IPv6 in this kernel
    return tuple(out)


def read_local_addresses(proc: str = "/proc") -> frozenset[IPAddress]:
    """Every address of this host: IPv4 the kernel routes as local (``/32 host LOCAL``
    in fib_trie), IPv6 configured on an interface (if_inet6) and not a duplicate."""
    return read_ipv4_addresses(proc) | read_ipv6_addresses(proc)[0]


def read_ipv4_addresses(proc: str = "/proc") -> frozenset[IPv4Address]:
    local = set()
    last = None
    with open(f"{proc}/net/fib_trie", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            text = line.strip()
            if text.startswith("|--"):
                last = text[3:].strip()
            elif text.startswith("/32 host LOCAL") and last:
                local.add(IPv4Address(last))
    return frozenset(local)


def read_ipv6_addresses(proc: str = "/proc") -> tuple[frozenset[IPv6Address],
                                                      frozenset[IPv6Address]]:
    """(usable, duplicates): the IPv6 addresses of this host's interfaces, and those whose
    duplicate address detection failed (another host on the link holds them; the kernel
    keeps them but never uses them). A tentative address (DAD still running, for a
    second after it is added, as at boot) counts as usable: refusing it would fail a
    guest's autostart for a race with DAD. Both empty without IPv6 in this kernel. (An
    interface's name may hold any bytes but '/', ':' and whitespace: text is read with
    errors replaced, as every /proc file here.)"""
    usable: set[IPv6Address] = set()
    duplicates: set[IPv6Address] = set()
    try:
        with open(f"{proc}/net/if_inet6", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()  # address ifindex prefixlen scope flags device
                if len(fields) < 5 or len(fields[0]) != 32:
                    continue
                addr = IPv6Address(bytes.fromhex(fields[0]))
                dadfailed = int(fields[4], 16) & IFA_F_DADFAILED
                (duplicates if dadfailed else usable).add(addr)
    except FileNotFoundError:
        pass  # IPv6 disabled at boot (ipv6.disable=1)
    return frozenset(usable), frozenset(duplicates - usable)


def process_of(inode: int, proc: str = "/proc") -> str:
    """``sshd (pid 812)`` for the process holding a socket inode, or ``a process``."""
    needle = f"socket:[{inode}]"
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"{proc}/{pid}/fd"):
                if os.readlink(f"{proc}/{pid}/fd/{fd}") == needle:
                    with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="replace") as fh:
                        return f"{fh.read().strip()} (pid {pid})"
        except OSError:
            continue
    return "a process"


@dataclass(slots=True)
class HostFacts:
    """The host's local addresses (both families), the IPv6 addresses another host on
    the link holds (DAD failed), and the listening sockets, read once."""

    local: frozenset[IPAddress]
    listeners: tuple[Listener, ...]
    duplicates: frozenset[IPv6Address] = frozenset()
    users: tuple[int, int] = USER_UIDS  # login.defs' UID_MIN, UID_MAX
    unprivileged: int = UNPRIVILEGED_PORT
    config: Config | None = None  # root's consents (``config.load``); None: none

    @classmethod
    def read(cls, prefix: Sequence[str] = ()) -> HostFacts:
        """This network namespace's facts; with ``prefix`` (``ip netns exec NS``, as a
        backend that runs elsewhere has it) that namespace's, read by a child there."""
        if prefix:
            return cls._read_in(prefix)
        ipv6, duplicates = read_ipv6_addresses()
        return cls(read_ipv4_addresses() | ipv6, read_listeners(), duplicates,
                   read_user_uids(), read_unprivileged_port())

    @classmethod
    def _read_in(cls, prefix: Sequence[str]) -> HostFacts:
        local, duplicates, listeners, unprivileged = read_elsewhere(
            prefix, "from kvmufw_hook.host import HostFacts; f = HostFacts.read(); "
            "print(json.dumps([sorted(map(str, f.local)), sorted(map(str, f.duplicates)),"
            " [[l.proto, str(l.addr), l.port, l.inode, l.uid, l.v6only]"
            " for l in f.listeners], f.unprivileged]))", "the host's facts")
        return cls(frozenset(ip_address(a) for a in local),
                   tuple(Listener(p, ip_address(a), port, inode, uid, v6)
                         for p, a, port, inode, uid, v6 in listeners),
                   frozenset(IPv6Address(a) for a in duplicates), read_user_uids(),
                   unprivileged)

    def check(self, where: str, spec: ForwardSpec, held: Iterable[int] | bool = (),
              families: Iterable[int] | None = None, owner: str = "") -> None:
        """InputError with one line if ``spec`` may not be applied on this host.
        ``families``: those in which the forward takes its host port (None: what its
        metadata allows, ``spec.families``). ``held``: the families in which the owner's
        rules already take this port (True: every family): a socket that came later does
        not take it away there (it never sees a packet: our DNAT comes first).
        ``owner``: whose forward, for root's consents."""
        self.check_host_ip(where, spec.host_ip)
        if spec.proto not in ("tcp", "udp") or held is True:
            return
        held = () if held is False else tuple(held)
        for family in spec.families if families is None else families:
            if family not in held:
                self.check_port(where, spec, family, owner)

    def check_host_ip(self, where: str, host_ip: IPAddress | None) -> None:
        if host_ip is None:
            return
        if host_ip.is_loopback:
            raise InputError(f"{where}: host-ip {host_ip} is a loopback address; "
                             "forwards never take loopback traffic")
        if host_ip.version == 6 and host_ip.is_link_local:
            raise InputError(f"{where}: host-ip {host_ip} is a link-local address, which "
                             "names nothing without its interface; use a global or "
                             "unique-local address of this host")
        if host_ip in self.duplicates:
            raise InputError(f"{where}: host-ip {host_ip} failed duplicate address "
                             "detection: another host on the link holds it; a forward "
                             "only takes traffic addressed to this host")
        if host_ip not in self.local:
            raise InputError(f"{where}: host-ip {host_ip} is not an address of this "
                             "host; a forward only takes traffic addressed to the host")

    def check_port(self, where: str, spec: ForwardSpec, family: int, owner: str = "") -> None:
        first, last = spec.host_port.first, spec.host_port.last
        for sock in self.listeners:
            if sock.proto == spec.proto and first <= sock.port <= last \
                    and sock.reaches(family, spec.host_ip) \
                    and sock.is_service(self.users, self.unprivileged) \
                    and not (self.config and self.config.consents(owner, sock.proto,
                                                                  sock.port)):
                verb = "listens" if sock.proto == "tcp" else "is bound"
                raise Unavailable(
                    f"{where}: host port {sock.port}/{sock.proto} is used by a host service: "
                    f"{shown(process_of(sock.inode))} {verb} on {sock.addr}; forward another "
                    "port, or have root allow it in the configuration file "
                    f"(allow_host_service = [ \"{consent_entry(owner, sock.proto, sock.port)}"
                    '" ]; the XML\'s allow-host-service grants nothing)')


def consent_entry(owner: str, proto: str, port: int) -> str:
    """The configuration entry that lets ``owner`` take ``port``: ``domain:web1:tcp:22``."""
    kind, _, token = owner.partition("=")
    name = printable(unsafe_name(token) or "NAME") if token else "NAME"
    return f"{'network' if kind == 'n' else 'domain'}:{name}:{proto}:{port}"


def check_forwards(label: str, specs: Sequence[ForwardSpec], facts: HostFacts | None = None,
                   held: Iterable[ForwardSpec | Claim] = (), prefix: Sequence[str] = (),
                   families: Sequence[Iterable[int]] | None = None, owner: str = "") -> None:
    """Every forward of one owner against the host (read once, only when needed).
    ``families``: for each spec, in order, the families it takes its host port in once
    planned (a guest address from a reservation is known only then: a forward without
    guest-ip whose guest has only an IPv4 address never takes the IPv6 port); None:
    ``spec.families``, what the metadata alone allows. ``held``: what the owner's rules
    in the kernel take now (``Backend.claims``), each in the families its ``families``
    names."""
    specs = tuple(specs)
    if not specs:
        return
    facts = facts or HostFacts.read(prefix)
    taken: dict[tuple[str, PortRange, IPAddress | None], set[int]] = {}
    for h in held:
        taken.setdefault((h.proto, h.host_port, h.host_ip), set()).update(h.families)
    # a forward on every address is refused only for a listener's port in its range:
    # the others (nearly all, on a host of thousands of forwards) need no message spelt
    listening: dict[str, list[int]] = {}  # proto -> the listeners' ports, sorted
    for sock in facts.listeners:
        insort(listening.setdefault(sock.proto, []), sock.port)
    for index, spec in enumerate(specs, start=1):
        ports = listening.get(spec.proto, ())
        if spec.host_ip is None and bisect_left(ports, spec.host_port.first) == bisect_right(
                ports, spec.host_port.last):
            continue
        facts.check(f"{label}: forward #{index} ({spec.label})", spec,
                    taken.get((spec.proto, spec.host_port, spec.host_ip), ()),
                    None if families is None else families[index - 1], owner)


def read_leases(bridge: str | None, directory: str | None = None
                ) -> tuple[tuple[IPAddress, str | None], ...]:
    """(address, MAC or None) of each lease libvirt's dnsmasq holds on ``bridge``, from
    its ``BRIDGE.status`` (JSON written by libvirt's leaseshelper). A DHCPv6 lease has a
    MAC only when dnsmasq knew one, or its client-id is a DUID-LLT/DUID-LL of an
    Ethernet address (``duid_mac``); None: a client no record ties to a MAC (the policy
    counts it as another guest's). Nothing if there is no such file or it cannot be
    read: an unreadable record names no one."""
    if not bridge:
        return ()
    if directory is None:
        directory = dnsmasq_dir()
    try:
        with open(os.path.join(directory, f"{bridge}.status"), encoding="utf-8") as fh:
            entries = json.load(fh)
    except (OSError, ValueError):
        return ()
    out = []
    for entry in entries if isinstance(entries, list) else ():
        try:
            ip = ip_address(str(entry["ip-address"]))
        except (KeyError, TypeError, ValueError):
            continue
        mac = entry.get("mac-address") or duid_mac(str(entry.get("client-id") or ""))
        out.append((ip, str(mac).lower() if mac else None))
    return tuple(out)


def duid_mac(client_id: str) -> str | None:
    """The Ethernet MAC inside a DHCPv6 DUID written as hex pairs (``00:01:…``):
    DUID-LLT (type 1: hardware type, time, address) or DUID-LL (type 3: hardware type,
    address), hardware type 1 (Ethernet); None for any other DUID (DUID-EN, DUID-UUID)."""
    try:
        raw = bytes(int(pair, 16) for pair in client_id.split(":")) if client_id else b""
    except ValueError:
        return None
    if raw[:4] == b"\x00\x01\x00\x01" and len(raw) == 14:
        address = raw[8:]
    elif raw[:4] == b"\x00\x03\x00\x01" and len(raw) == 10:
        address = raw[4:]
    else:
        return None
    return ":".join(f"{b:02x}" for b in address)


def network_leases(net: Network) -> tuple[tuple[IPAddress, str | None], ...]:
    """The leases of a network's dnsmasq (``policy.Leases``)."""
    return read_leases(net.bridge)
