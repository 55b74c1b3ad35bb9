"""What the host itself has, read from /proc of the current network namespace (no process
spawned): its local addresses, and the sockets its own services listen on.

A forward may only take traffic addressed to this host and only a port no host service
uses: ``host-ip`` must be one of the host's addresses (never loopback), and a host port on
which a host service listens (tcp) or is bound (udp) is refused unless the forward says
``allow-host-service="yes"``. Both are checked whenever rules are applied, because
addresses and services come and go.
"""

from __future__ import annotations

import os
import sys
from ipaddress import IPv4Address, IPv6Address, ip_address

from .errors import InputError, shown
from .model import ForwardSpec
from .sockdiag import tcp_listeners

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: collections.abc costs a guest start milliseconds
    from collections.abc import Iterable, Sequence

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"
UNPRIVILEGED_PORT = 1024  # net.ipv4.ip_unprivileged_port_start, the kernel's default
FIRST_USER_UID = 1000  # Debian's UID_MIN: below it root and system accounts


class Listener:
    """A socket a host service listens on (tcp) or is bound to (udp). A plain class: a
    dataclass costs every guest start a millisecond to create."""

    __slots__ = ("addr", "inode", "port", "proto", "uid", "v6only")

    def __init__(self, proto: str, addr: IPv4Address | IPv6Address, port: int, inode: int,
                 uid: int = 0, v6only: bool = False) -> None:
        self.proto = proto  # tcp or udp
        self.addr = addr  # unspecified (0.0.0.0, ::) = every address
        self.port = port
        self.inode = inode
        self.uid = uid
        self.v6only = v6only  # known for tcp (sock_diag); a udp ``::`` socket takes both

    def is_service(self) -> bool:
        """Whether this is the host's own service: a privileged port (only privileged
        processes bind those), or a socket of root or a system account. A socket an
        ordinary user opened later (``nc -l 8080``) vetoes nothing root configured."""
        return self.port < UNPRIVILEGED_PORT or self.uid < FIRST_USER_UID

    def reaches(self, host_ip: IPv4Address | None) -> bool:
        """Whether a connection that our forward would DNAT could have reached this
        socket: same family (a ``::`` socket also takes IPv4 unless it is IPv6-only),
        not loopback-only."""
        addr = self.addr
        if isinstance(addr, IPv6Address):
            if addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            elif addr.is_unspecified:
                return not self.v6only
            else:
                return False  # IPv6-only socket: our forwards are IPv4
        if addr.is_loopback:
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
                with open(f"{proc}/net/{name}", encoding="ascii") as fh:
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


def read_local_addresses(proc: str = "/proc") -> frozenset[IPv4Address]:
    """Every IPv4 address the kernel routes as local (``/32 host LOCAL`` in fib_trie)."""
    local = set()
    last = None
    with open(f"{proc}/net/fib_trie", encoding="ascii") as fh:
        for line in fh:
            text = line.strip()
            if text.startswith("|--"):
                last = text[3:].strip()
            elif text.startswith("/32 host LOCAL") and last:
                local.add(IPv4Address(last))
    return frozenset(local)


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


class HostFacts:
    """The host's local addresses and listening sockets, read once."""

    __slots__ = ("listeners", "local")

    def __init__(self, local: frozenset[IPv4Address], listeners: tuple[Listener, ...]) -> None:
        self.local = local
        self.listeners = listeners

    @classmethod
    def read(cls, prefix: Sequence[str] = ()) -> HostFacts:
        """This network namespace's facts; with ``prefix`` (``ip netns exec NS``, as a
        backend that runs elsewhere has it) that namespace's, read by a child there."""
        if prefix:
            return cls._read_in(prefix)
        return cls(read_local_addresses(), read_listeners())

    @classmethod
    def _read_in(cls, prefix: Sequence[str]) -> HostFacts:
        import json
        import subprocess
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (f"import sys; sys.path.insert(0, {package!r}); import json; "
                "from kvmufw_hook.host import HostFacts; f = HostFacts.read(); "
                "print(json.dumps([sorted(map(str, f.local)), [[l.proto, str(l.addr), l.port,"
                " l.inode, l.uid, l.v6only] for l in f.listeners]]))")
        out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        local, listeners = json.loads(out)
        return cls(frozenset(IPv4Address(a) for a in local),
                   tuple(Listener(p, ip_address(a), port, inode, uid, v6)
                         for p, a, port, inode, uid, v6 in listeners))

    def check(self, where: str, spec: ForwardSpec, held: bool = False) -> None:
        """InputError with one line if ``spec`` may not be applied on this host.
        ``held``: the owner's rules already take this port: a socket that came later does
        not take it away (it never sees a packet: our DNAT comes first)."""
        host_ip = spec.host_ip
        if host_ip is not None:
            if host_ip.is_loopback:
                raise InputError(f"{where}: host-ip {host_ip} is a loopback address; "
                                 "forwards never take loopback traffic")
            if host_ip not in self.local:
                raise InputError(f"{where}: host-ip {host_ip} is not an address of this "
                                 "host; a forward only takes traffic addressed to the host")
        if spec.proto not in ("tcp", "udp") or spec.allow_host_service or held:
            return
        first, last = spec.host_port.first, spec.host_port.last
        for sock in self.listeners:
            if sock.proto == spec.proto and first <= sock.port <= last \
                    and sock.reaches(host_ip) and sock.is_service():
                verb = "listens" if sock.proto == "tcp" else "is bound"
                raise InputError(
                    f"{where}: host port {sock.port}/{sock.proto} is used by a host service: "
                    f"{shown(process_of(sock.inode))} {verb} on {sock.addr}; forward another "
                    'port, or set allow-host-service="yes" to take it on purpose')


def check_forwards(label: str, specs, facts: HostFacts | None = None,
                   held: Iterable[ForwardSpec] = (), prefix: Sequence[str] = ()) -> None:
    """Every forward of one owner against the host (read once, only when needed);
    ``held``: what the owner's rules in the kernel take now (``Backend.claims``)."""
    specs = tuple(specs)
    if not specs:
        return
    facts = facts or HostFacts.read(prefix)
    taken = {(h.proto, h.host_port, h.host_ip) for h in held}
    for index, spec in enumerate(specs, start=1):
        facts.check(f"{label}: forward #{index} ({spec.label})", spec,
                    (spec.proto, spec.host_port, spec.host_ip) in taken)
