"""Listening TCP sockets from the kernel's sock_diag netlink interface.

``host.py`` checks on every guest start that no host service listens on a forwarded
port. /proc/net/tcp and tcp6 list sockets by walking the whole established-connection
hash table: 5 to 10 ms each even on an idle host. Asked for LISTEN sockets only,
sock_diag walks the listening table alone. It uses ``_socket``, the C module behind
``socket``: importing ``socket`` builds its enums, a few milliseconds more.
"""

from __future__ import annotations

import _socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_REQUEST = struct.Struct("=BBBBI48x")  # struct inet_diag_req_v2, the socket id zeroed
_UID, _INODE, _ATTRS = 64, 68, 72  # offsets in struct inet_diag_msg; attributes follow
INET_DIAG_SKV6ONLY = 11  # sent for every listening IPv6 socket


Listening = tuple[bytes, int, int, int, bool]  # address, port, inode, uid, IPv6 only


def tcp_listeners() -> list[Listening]:
    """(address: 4 or 16 bytes, port, inode, uid, IPV6_V6ONLY) of every listening TCP
    socket, IPv4 then IPv6, as /proc/net/tcp and tcp6 list them (which cannot say whether
    a ``::`` socket takes IPv4 too). OSError if the kernel does not answer."""
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    try:
        sock.settimeout(5)
        found: list[Listening] = []
        for seq, family in enumerate((_socket.AF_INET, _socket.AF_INET6), start=1):
            request = _REQUEST.pack(family, _socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
            sock.send(_HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                                   NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request)
            found += _dump(sock, seq, 4 if family == _socket.AF_INET else 16)
        return found
    finally:
        sock.close()


def _v6only(data: bytes, start: int, end: int) -> bool:
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            break
        if kind == INET_DIAG_SKV6ONLY and length >= 5:
            return data[start + 4] != 0
        start += (length + 3) & ~3
    return False


def _dump(sock: _socket.socket, seq: int, size: int) -> list[Listening]:
    found: list[Listening] = []
    while True:
        data, (sender, _groups) = sock.recvfrom(1 << 17)
        if sender != 0:
            continue  # only the kernel answers a dump
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _flags, number, _port = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size or offset + length > len(data):
                raise OSError("sock_diag: malformed netlink message")
            body = offset + _HEADER.size
            if number == seq:
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, body)[0]
                    raise OSError(code, "sock_diag refused the dump")
                if kind == SOCK_DIAG_BY_FAMILY and length >= _HEADER.size + _ATTRS:
                    port = int.from_bytes(data[body + 4:body + 6], "big")
                    address = bytes(data[body + 8:body + 8 + size])
                    uid, inode = struct.unpack_from("=II", data, body + _UID)
                    found.append((address, port, inode, uid,
                                  _v6only(data, body + _ATTRS, offset + length)))
            offset += (length + 3) & ~3
