"""End the conntrack flows of forwards that were removed, through ctnetlink.

A DNAT'd flow outlives the rule that made it: conntrack keeps translating its packets
(a remote UDP flow that keeps sending never expires), so without this a guest's stop
would leave its clients connected to whoever gets its address next. After a write that
removed forwards, one netlink dump per guest address finds the flows each
removed forward made (by original destination port and, with host-ip, address;
translated to that guest) and deletes exactly those: no process spawned, however many
forwards (a backend that runs in another network namespace runs this module there, in
one child). The kernel filters each dump (``CTA_FILTER``, Linux 5.9+: only the flows
whose replies come from that guest), so that a stop costs the same whatever the size of
the host's conntrack table; a kernel without it sends every flow of the family, and the
same exact match below picks the same ones.
"""

from __future__ import annotations

import _socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ID, CTA_ZONE, CTA_FILTER = 1, 2, 12, 18, 25
CTA_FILTER_REPLY_FLAGS = 2
CTA_FILTER_FLAG_IP_SRC = 1 << 0
NLA_F_NESTED = 1 << 15
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_SRC = {4: 1, 6: 3}  # CTA_IP_V4_SRC, CTA_IP_V6_SRC
CTA_IP_DST = {4: 2, 6: 4}
CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 3
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
AF = {4: _socket.AF_INET, 6: _socket.AF_INET6}
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg
_ATTR = struct.Struct("=HH")  # struct nlattr

# (family, protocol number, first host port, last host port, guest address as bytes,
#  host-ip as bytes or None): the flows one forward made
Flow = tuple[int, int, int, int, bytes, "bytes | None"]

TYPE_CHECKING = False
if TYPE_CHECKING:  # a guest's stop ends flows: no typing at run time
    from collections.abc import Iterator
    from typing import Any

    Tuple = tuple[bytes | None, bytes | None, int | None, int | None]  # src, dst, proto, port


def _attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """type -> (start, end) of each attribute's payload (nested flag masked off); the
    whole attribute, header included, is ``start - 4`` to ``end`` padded."""
    out = {}
    while start + 4 <= end:
        length, kind = _ATTR.unpack_from(data, start)
        if length < 4:
            break
        out[kind & 0x3FFF] = (start + 4, start + length)
        start += (length + 3) & ~3
    return out


def _tuple(data: bytes, span: tuple[int, int], family: int) -> Tuple:
    """(source, destination, protocol, destination port) of a CTA_TUPLE_* attribute."""
    inner = _attrs(data, *span)
    ip = _attrs(data, *inner.get(CTA_TUPLE_IP, (0, 0)))
    proto = _attrs(data, *inner.get(CTA_TUPLE_PROTO, (0, 0)))
    src = ip.get(CTA_IP_SRC[family])
    dst = ip.get(CTA_IP_DST[family])
    num = proto.get(CTA_PROTO_NUM)
    port = proto.get(CTA_PROTO_DST_PORT)
    return (data[src[0]:src[1]] if src else None, data[dst[0]:dst[1]] if dst else None,
            data[num[0]] if num else None,
            struct.unpack_from("!H", data, port[0])[0] if port else None)


def _whole(data: bytes, span: tuple[int, int]) -> bytes:
    return data[span[0] - 4:span[1]]


def _matches(orig: Tuple, reply: Tuple, flows: list[Flow]) -> bool:
    _src, dst, proto, port = orig
    guest = reply[0]  # a DNAT'd flow's replies come from the guest
    return any(proto == p and port is not None and first <= port <= last and guest == g
               and (host is None or dst == host) for _f, p, first, last, g, host in flows)


def _attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    return _ATTR.pack(_ATTR.size + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _reply_filter(family: int, guest: bytes) -> bytes:
    """``CTA_FILTER`` attributes asking the kernel for the flows whose replies come
    from ``guest`` (a DNAT'd flow's reply source is its guest)."""
    tuple_ = _attr(CTA_TUPLE_IP | NLA_F_NESTED, _attr(CTA_IP_SRC[family], guest))
    flags = struct.pack("=I", CTA_FILTER_FLAG_IP_SRC)
    return (_attr(CTA_TUPLE_REPLY | NLA_F_NESTED, tuple_)
            + _attr(CTA_FILTER | NLA_F_NESTED, _attr(CTA_FILTER_REPLY_FLAGS, flags)))


def end_flows(flows: list[Flow], sock: Any = None) -> int:
    """Delete every conntrack entry one of ``flows`` describes; the number deleted.
    OSError if the kernel has no ctnetlink (no conntrack at all: no flow to end).
    ``sock``: a NETLINK_NETFILTER socket to ask through, left open (the caller's: the
    nftables backend's batch socket, whose release must not wait, ``nftwrite.release``)."""
    if not _tracking():
        return 0
    deleted = 0
    own = sock is None
    if own:
        sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_DGRAM, NETLINK_NETFILTER)
    try:
        sock.settimeout(5)
        for seq, (family, guest, mine) in enumerate(_dumps(flows), start=1):
            try:
                doomed = _dump(sock, seq, family, mine,
                               _reply_filter(family, guest) if guest else b"")
            except OSError:  # a kernel that refuses the filter: the whole family, matched here
                if not guest:
                    raise
                doomed = _dump(sock, seq, family, mine)
            for number, body in enumerate(doomed, start=1000 * seq):
                payload = _NFGEN.pack(AF[family], 0, 0) + body
                kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
                sock.send(_HEADER.pack(_HEADER.size + len(payload), kind,
                                       NLM_F_REQUEST | NLM_F_ACK, number, 0) + payload)
            deleted += _acks(sock, len(doomed))
    finally:
        if own:
            sock.close()
    return deleted


# Every dump walks the whole conntrack hash table in the kernel (262,144 buckets by
# default: about 10 ms, even empty); a filtered one sends only one guest's flows. Up to
# this many guest addresses get one filtered dump each, more share one unfiltered dump
# per family (a flush or a replay ending hundreds of forwards walks the table once).
# IPv4 only: the kernel's IPv6 address filter is inverted (measured on Linux 6.18: it
# sends every flow but the guest's), so IPv6 flows are matched here from a whole dump.
FILTERED_DUMPS = 4


def _dumps(flows: list[Flow]) -> list[tuple[int, bytes | None, list[Flow]]]:
    """(family, guest address or None for every flow of the family, the flows to match)
    of each dump ``flows`` need."""
    guests = sorted({(f[0], f[4]) for f in flows if f[0] == 4})
    if len(guests) > FILTERED_DUMPS:
        guests = []
    whole = sorted({f[0] for f in flows} - {family for family, _guest in guests})
    return ([(family, guest, [f for f in flows if (f[0], f[4]) == (family, guest)])
             for family, guest in guests]
            + [(family, None, [f for f in flows if f[0] == family]) for family in whole])


def _tracking() -> bool:
    """False when this network namespace tracks no connection at all (nothing to end:
    no dump); True when it does, or when it cannot tell."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count", "rb") as fh:
            return fh.read().strip() != b"0"
    except OSError:
        return True


def _messages(sock: Any) -> Iterator[tuple[int, int, bytes, int, int]]:
    """(type, sequence, data, start, end) of each netlink message received, for ever:
    the caller stops when it has what it waits for."""
    while True:
        data = sock.recv(1 << 16)
        at = 0
        while at + _HEADER.size <= len(data):
            length, kind, _flags, seq, _pid = _HEADER.unpack_from(data, at)
            if length < _HEADER.size:
                break
            yield kind, seq, data, at + _HEADER.size, at + length
            at += (length + 3) & ~3


def _dump(sock: Any, seq: int, family: int, flows: list[Flow], filter_: bytes = b"") -> list[bytes]:
    """The identifying attributes (original tuple, zone, id) of each entry to delete;
    ``filter_``: attributes the kernel narrows the dump with."""
    request = _NFGEN.pack(AF[family], 0, 0) + filter_
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    sock.send(_HEADER.pack(_HEADER.size + len(request), kind, NLM_F_REQUEST | NLM_F_DUMP,
                           seq, 0) + request)
    out: list[bytes] = []
    for kind, got, data, start, end in _messages(sock):
        if kind == NLMSG_DONE and got == seq:
            return out
        if kind == NLMSG_ERROR:
            (errno,) = struct.unpack_from("=i", data, start)
            if errno:
                raise OSError(-errno, "ctnetlink dump refused")
            return out
        if kind & 0xFF == IPCTNL_MSG_CT_NEW:
            attrs = _attrs(data, start + _NFGEN.size, end)
            if CTA_TUPLE_ORIG in attrs and CTA_TUPLE_REPLY in attrs:
                orig = _tuple(data, attrs[CTA_TUPLE_ORIG], family)
                reply = _tuple(data, attrs[CTA_TUPLE_REPLY], family)
                if _matches(orig, reply, flows):
                    out.append(b"".join(_whole(data, attrs[k]) for k in
                                        (CTA_TUPLE_ORIG, CTA_ZONE, CTA_ID) if k in attrs))
    return out


def _acks(sock: Any, count: int) -> int:
    """Read ``count`` acknowledgements; the number of entries really deleted (one that
    ended meanwhile answers ENOENT)."""
    done = deleted = 0
    if not count:
        return 0
    for kind, _seq, data, start, _end in _messages(sock):
        if kind == NLMSG_ERROR:
            done += 1
            deleted += struct.unpack_from("=i", data, start)[0] == 0
            if done == count:
                break
    return deleted


def main() -> None:
    """``python3 -c``: the flows as JSON on stdin, in this network namespace (a backend
    with a prefix); prints the number deleted."""
    import json
    import sys
    flows = [(f, p, a, b, bytes.fromhex(g), bytes.fromhex(h) if h else None)
             for f, p, a, b, g, h in json.load(sys.stdin)]
    print(end_flows(flows))
