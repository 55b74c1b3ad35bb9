"""Whether libvirt's nftables table is in the kernel, asked without a process and without
importing anything heavy: every change (a guest's stop included) asks it, and only where
the table is there does ``libvirt_nft`` (parser of nft text, planner rules) get imported."""

from __future__ import annotations

import _socket  # not socket: 2 ms less on every hook call that applies rules
import struct

TABLE = "libvirt_network"


def table_in_kernel() -> bool:
    """Whether ``table ip libvirt_network`` exists in this network namespace: one
    NFT_MSG_GETTABLE request on a netlink socket, no process (hooks run it on every
    change). False when it cannot be asked (not root, no nf_tables)."""
    name = TABLE.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(name), 1) + name  # NFTA_TABLE_NAME
    attr += b"\0" * (-len(attr) % 4)
    body = struct.pack("=BBH", _socket.AF_INET, 0, 0) + attr  # nfgenmsg: family ip
    msg_type = (10 << 8) | 1  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETTABLE
    header = struct.pack("=IHHII", 16 + len(body), msg_type, 1, 1, 0)  # NLM_F_REQUEST
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
    if rtype == 2:  # NLMSG_ERROR: ENOENT when the table is not there, EPERM when not root
        return False
    return rtype == (10 << 8) | 0  # NFT_MSG_NEWTABLE: here it is
