"""Whether an nftables table or chain is in the kernel, asked without a process and
without importing anything heavy: every change (a guest's stop included) asks, and only
where the answer is yes does a backend read the ruleset with a process (and, for
libvirt's table, ``libvirt_nft`` get imported). Also the netlink pieces the other
nf_tables modules share (``nftrules`` reads, ``nftwrite`` writes): an attribute, a
string, the messages of a reply."""

from __future__ import annotations

import _socket  # not socket: 2 ms less on every hook call that applies rules
import struct

TABLE = "libvirt_network"
IPV4, IPV6 = 2, 10  # nfgenmsg families: NFPROTO_IPV4, NFPROTO_IPV6 (= AF_INET, AF_INET6)
SUBSYS = _SUBSYS = 10 << 8  # NFNL_SUBSYS_NFTABLES
_GETTABLE, _NEWTABLE, _GETCHAIN, _NEWCHAIN, _NEWGEN, _GETGEN = 1, 0, 4, 3, 15, 16

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def strz(text: str) -> bytes:
    """A string as nf_tables takes it: NUL-terminated."""
    return text.encode() + b"\0"


def _attr(kind: int, text: str) -> bytes:
    return attr(kind, strz(text))


def messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, sequence number, start of its payload, end) of each netlink message
    in ``data``, up to the first that does not fit."""
    at = 0
    while at + 16 <= len(data):
        length, kind, flags, seq = struct.unpack_from("=IHHI", data, at)
        if length < 16 or at + length > len(data):
            return
        yield kind, flags, seq, at + 16, at + length
        at += (length + 3) & ~3


def _ask(request: int, family: int, attrs: bytes = b"") -> bytes | None:
    """One request on a netlink socket; the first reply, or None when nf_tables cannot
    be asked at all."""
    body = struct.pack("=BBH", family, 0, 0) + attrs
    header = struct.pack("=IHHII", 16 + len(body), _SUBSYS | request, 1, 1, 0)  # REQUEST
    try:
        sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    except OSError:
        return None
    try:
        sock.settimeout(2)
        sock.send(header + body)
        return sock.recv(65536)
    except OSError:
        return None
    finally:
        sock.close()


def _exists(request: int, answer: int, family: int, attrs: bytes) -> bool:
    """True when the kernel answers with the object, False on ENOENT, on EPERM (not
    root) or when nf_tables cannot be asked at all."""
    reply = _ask(request, family, attrs)
    if reply is None or len(reply) < 16:
        return False
    _length, rtype = struct.unpack_from("=IH", reply)
    return bool(rtype == _SUBSYS | answer)  # NLMSG_ERROR (2) otherwise


def table_in_kernel(family: int = IPV4, name: str = TABLE) -> bool:
    """Whether ``table ip libvirt_network`` (or another) exists in this namespace."""
    return _exists(_GETTABLE, _NEWTABLE, family, _attr(1, name))  # NFTA_TABLE_NAME


def chain_in_kernel(family: int, table: str, chain: str) -> bool:
    """Whether ``chain`` exists in nftables table ``table`` of ``family``."""
    return _exists(_GETCHAIN, _NEWCHAIN, family,
                   _attr(1, table) + _attr(3, chain))  # NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME


def generation() -> int | None:
    """nf_tables' ruleset generation in this namespace (every committed change of any
    table, by anyone, adds one; ``iptables-restore`` commits once per table it
    changes): one netlink request. None when it cannot be asked."""
    reply = _ask(_GETGEN, 0)
    if reply is None:
        return None
    if len(reply) < 20 or struct.unpack_from("=H", reply, 4)[0] != _SUBSYS | _NEWGEN:
        return None
    at, end = 20, min(len(reply), struct.unpack_from("=I", reply)[0])
    while at + 8 <= end:
        length, kind = struct.unpack_from("=HH", reply, at)
        if length < 4:
            break
        if kind & 0x3FFF == 1:  # NFTA_GEN_ID, big-endian
            return int(struct.unpack_from("!I", reply, at + 4)[0])
        at += (length + 3) & ~3
    return None
