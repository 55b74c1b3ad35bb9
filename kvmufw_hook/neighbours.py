"""The host's neighbour table (ARP and IPv6 neighbour discovery): the MAC each address on
a bridge was last seen at, the kernel's own record of whose a guest's static or
stable-privacy (RFC 7217) address is, where no dnsmasq lease or ``<dhcp><host>``
reservation names it. ``policy`` asks it (through a reader made here) only for a guest's
forwards on a network where another guest has a port; read with one netlink
``RTM_GETNEIGH`` dump of both families, without a process; the reply is parsed here, pure.
"""

from __future__ import annotations

import _socket  # not socket: the guest-start hook may read the table
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

from .model import IPAddress, Network
from .process import read_elsewhere

RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NDA_DST, NDA_LLADDR = 1, 2
NUD_INCOMPLETE, NUD_FAILED = 0x01, 0x20  # resolution pending or failed: no MAC to trust
AF_INET, AF_INET6 = 2, 10
NETLINK_ROUTE = 0
_NDMSG = "=BBHiHBB"  # family, pad, pad, ifindex, state (NUD_*), flags, type

Entry = tuple[int, IPAddress, str]  # (interface index, address, MAC)
Table = Mapping[str, Sequence[tuple[IPAddress, str]]]  # device -> (address, MAC)
Reader = Callable[[Network], Sequence[tuple[IPAddress, str]]]  # ``policy.Neighbours``


def request(seq: int = 1) -> bytes:
    """A dump request of every neighbour entry of both families (``AF_UNSPEC``)."""
    body = struct.pack(_NDMSG, 0, 0, 0, 0, 0, 0, 0)
    return struct.pack("=IHHII", 16 + len(body), RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP,
                       seq, 0) + body


def parse(data: bytes) -> tuple[list[Entry], bool]:
    """The entries with a MAC in one datagram of the kernel's dump, and whether it was the
    dump's last. Entries whose resolution is pending or failed (INCOMPLETE, FAILED, or no
    state), without an Ethernet link-layer address or with an address of no family we
    know are left out. OSError when the kernel refused the dump."""
    out: list[Entry] = []
    at = 0
    while at + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, at)
        if length < 16 or at + length > len(data):
            break
        if kind == NLMSG_DONE:
            return out, True
        if kind == NLMSG_ERROR and length >= 20:
            error = -struct.unpack_from("=i", data, at + 16)[0]
            if error:
                raise OSError(error, f"neighbour table dump refused: {os.strerror(error)}")
        elif kind == RTM_NEWNEIGH and length >= 28:
            entry = _entry(data, at, length)
            if entry is not None:
                out.append(entry)
        at += (length + 3) & ~3
    return out, False


def _entry(data: bytes, at: int, length: int) -> Entry | None:
    family, _p1, _p2, ifindex, nud, _flags, _type = struct.unpack_from(_NDMSG, data, at + 16)
    if nud == 0 or nud & (NUD_INCOMPLETE | NUD_FAILED):
        return None
    dst: bytes | None = None
    mac: bytes | None = None
    pos, end = at + 28, at + length
    while pos + 4 <= end:
        size, kind = struct.unpack_from("=HH", data, pos)
        if size < 4 or pos + size > end:
            break
        value = data[pos + 4:pos + size]
        if kind == NDA_DST:
            dst = value
        elif kind == NDA_LLADDR:
            mac = value
        pos += (size + 3) & ~3
    if mac is None or len(mac) != 6 or dst is None:
        return None
    if family == AF_INET and len(dst) == 4:
        address: IPAddress = IPv4Address(dst)
    elif family == AF_INET6 and len(dst) == 16:
        address = IPv6Address(dst)
    else:
        return None
    return ifindex, address, ":".join(f"{b:02x}" for b in mac)


def dump() -> list[Entry]:
    """Every usable entry of this network namespace's neighbour table (OSError if the
    kernel cannot be asked)."""
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.settimeout(2)
        sock.send(request())
        out: list[Entry] = []
        while True:
            entries, done = parse(sock.recv(1 << 17))
            out += entries
            if done:
                return out
    finally:
        sock.close()


def by_device(entries: Iterable[Entry],
              name: Callable[[int], str] = _socket.if_indextoname) -> dict[str, list[tuple[
                  IPAddress, str]]]:
    """The entries by the name of their device (a bridge, for guests' addresses)."""
    names: dict[int, str | None] = {}
    out: dict[str, list[tuple[IPAddress, str]]] = {}
    for ifindex, address, mac in entries:
        if ifindex not in names:
            try:
                names[ifindex] = name(ifindex)
            except OSError:  # the device went meanwhile
                names[ifindex] = None
        device = names[ifindex]
        if device is not None:
            out.setdefault(device, []).append((address, mac))
    return out


def read_table(prefix: Sequence[str] = ()) -> Table:
    """This namespace's neighbour table by device; with ``prefix`` (``ip netns exec NS``,
    as a backend that runs elsewhere has it) that namespace's, read by a child there
    (OSError if that child fails). Empty when the kernel cannot be asked: an unreadable
    record names no one, as an unreadable lease file."""
    if prefix:
        return _read_in(prefix)
    try:
        return by_device(dump())
    except OSError:
        return {}


def _read_in(prefix: Sequence[str]) -> Table:
    table = read_elsewhere(prefix, "from kvmufw_hook.neighbours import read_table; "
                           "print(json.dumps({d: [[str(a), m] for a, m in e] "
                           "for d, e in read_table().items()}))", "the neighbour table")
    return {device: [(ip_address(a), m) for a, m in entries]
            for device, entries in table.items()}


def reader(prefix: Sequence[str] = ()) -> Reader:
    """``policy.Neighbours`` for one operation: a network's entries (on its bridge), the
    table read at the first call and kept for the operation's others."""
    table: list[Table] = []

    def on(net: Network) -> Sequence[tuple[IPAddress, str]]:
        if not net.bridge:
            return ()
        if not table:
            table.append(read_table(prefix))
        return table[0].get(net.bridge, ())
    return on
