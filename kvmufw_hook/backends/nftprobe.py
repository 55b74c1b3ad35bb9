"""Whether an nftables table or chain is in the kernel, asked without a process and
without importing anything heavy: every change (a guest's stop included) asks, and only
where the answer is yes does a backend read the ruleset with a process (and, for
libvirt's table, ``libvirt_nft`` get imported)."""

from __future__ import annotations

import _socket  # not socket: 2 ms less on every hook call that applies rules
import struct

TABLE = "libvirt_network"
IPV4, IPV6 = 2, 10  # nfgenmsg families: NFPROTO_IPV4, NFPROTO_IPV6 (= AF_INET, AF_INET6)
_SUBSYS = 10 << 8  # NFNL_SUBSYS_NFTABLES
_GETTABLE, _NEWTABLE, _GETCHAIN, _NEWCHAIN = 1, 0, 4, 3


def _attr(kind: int, text: str) -> bytes:
    data = text.encode() + b"\0"
    out = struct.pack("=HH", 4 + len(data), kind) + data
    return out + b"\0" * (-len(out) % 4)


def _exists(request: int, answer: int, family: int, attrs: bytes) -> bool:
    """One request on a netlink socket: True when the kernel answers with the object,
    False on ENOENT, on EPERM (not root) or when nf_tables cannot be asked at all."""
    body = struct.pack("=BBH", family, 0, 0) + attrs
    header = struct.pack("=IHHII", 16 + len(body), _SUBSYS | request, 1, 1, 0)  # REQUEST
    try:
        sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    except OSError:
        return False
    try:
        sock.settimeout(2)
        sock.send(header + body)
        reply = sock.recv(65536)
    except OSError:
        return False
    finally:
        sock.close()
    if len(reply) < 16:
        return False
    _length, rtype = struct.unpack_from("=IH", reply)
    return rtype == _SUBSYS | answer  # NLMSG_ERROR (2) otherwise


def table_in_kernel(family: int = IPV4, name: str = TABLE) -> bool:
    """Whether ``table ip libvirt_network`` (or another) exists in this namespace."""
    return _exists(_GETTABLE, _NEWTABLE, family, _attr(1, name))  # NFTA_TABLE_NAME


def chain_in_kernel(family: int, table: str, chain: str) -> bool:
    """Whether ``chain`` exists in nftables table ``table`` of ``family``."""
    return _exists(_GETCHAIN, _NEWCHAIN, family,
                   _attr(1, table) + _attr(3, chain))  # NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME
