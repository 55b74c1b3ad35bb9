"""iptables-nft's chains and rules read in-process over netlink, as far as our glue needs
them: one chain dump and one rule dump per family (``ip``, ``ip6``) instead of an
``iptables-save`` process. The parsing is pure (``parse_chains``, ``parse_rules`` on the
kernel's reply bytes); ``read`` asks the kernel. Whatever it cannot decide for sure it
leaves undecided (None): the caller falls back to ``iptables-save``."""

from __future__ import annotations

import _socket
import struct

from .nftprobe import SUBSYS as _SUBSYS
from .nftprobe import attr, messages, strz

_GETCHAIN, _NEWCHAIN, _GETRULE, _NEWRULE = 4, 3, 7, 6
_DONE, _ERROR = 3, 2  # NLMSG_DONE, NLMSG_ERROR
_DUMP = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_NESTED = 0x8000  # NLA_F_NESTED
# NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME; NFTA_RULE_TABLE, _CHAIN, _HANDLE, _EXPRESSIONS,
# _USERDATA; NFTA_LIST_ELEM; NFTA_EXPR_NAME
_CHAIN_TABLE, _CHAIN_NAME = 1, 3
_RULE_TABLE, _RULE_CHAIN, _RULE_HANDLE, _RULE_EXPRS, _RULE_USERDATA = 1, 2, 3, 4, 7
_LIST_ELEM, _EXPR_NAME = 1, 1
_UDATA_COMMENT = 0  # NFTNL_UDATA_RULE_COMMENT
_EXPR_DATA, _MATCH_NAME, _MATCH_INFO = 2, 1, 3  # NFTA_EXPR_DATA; NFTA_MATCH_NAME, _INFO
# our glue's expressions, ``meta mark & 0x01000000 == 0x01000000 accept``, as the kernel
# dumps them whether nft or iptables-nft (``-m mark --mark ... -j ACCEPT``) wrote them
# (registers and values in this host's byte order, as captured from Linux 6.1 on x86;
# any other form is a doubt where the comment is ours: iptables-save decides then)
GLUE_EXPRS = tuple(bytes.fromhex(h) for h in (
    "24000100090001006d657461000000001400020008000200000000030800010000000001",
    "4c0001000c00010062697477697365003c0002000800010000000001080002000000000108000300"
    "0000000408000600000000000c00040008000100000000010c0005000800010000000000",
    "2c00010008000100636d700020000200080001000000000108000200000000000c00030008000100"
    "00000001",
    "300001000e000100696d6d6564696174650000001c0002000800010000000000100002000c000200"
    "0800010000000001"))


class Doubt(ValueError):
    """A reply this module does not read for sure."""


def _attrs(data: bytes, at: int, end: int) -> dict[int, bytes]:
    """The netlink attributes in ``data[at:end]`` by type (nested flag cleared); a type
    given twice or an attribute past the end is a doubt."""
    out: dict[int, bytes] = {}
    while at + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, at)
        if length < 4 or at + length > end:
            raise Doubt("attribute past its message")
        kind &= 0x3FFF
        if kind in out:
            raise Doubt(f"attribute {kind} given twice")
        out[kind] = data[at + 4:at + length]
        at += (length + 3) & ~3
    return out


def _messages(reply: bytes, answer: int) -> list[dict[int, bytes]]:
    """The attributes of each ``answer`` message of a whole dump (up to NLMSG_DONE; a
    message past the reply ends it too soon: a doubt)."""
    out: list[dict[int, bytes]] = []
    for kind, flags, _seq, start, end in messages(reply):
        if flags & 0x10:  # NLM_F_DUMP_INTR: the ruleset changed while dumped
            raise Doubt("dump interrupted")
        if kind == _DONE:
            return out
        if kind != _SUBSYS | answer:
            raise Doubt(f"message type {kind:#x}")  # an error (EPERM, ...) included
        out.append(_attrs(reply, start + 4, end))  # nfgenmsg 4
    raise Doubt("dump without its end")


def _text(value: bytes) -> str:
    if not value.endswith(b"\0"):
        raise Doubt("string without its end")
    return value[:-1].decode("utf-8", "strict")


def comment(userdata: bytes) -> str | None:
    """The rule's comment in its user data (nftnl TLVs: type, length, value)."""
    at, found = 0, None
    while at < len(userdata):
        if at + 2 > len(userdata):
            raise Doubt("user data cut")
        kind, length = userdata[at], userdata[at + 1]
        if at + 2 + length > len(userdata):
            raise Doubt("user data past its end")
        if kind == _UDATA_COMMENT:
            if found is not None:
                raise Doubt("two comments")
            found = _text(userdata[at + 2:at + 2 + length])
        at += 2 + length
    return found


def expressions(value: bytes) -> list[tuple[str, bytes]]:
    """(name, the whole element as the kernel gave it) of each expression of a rule."""
    out = []
    at = 0
    while at + 4 <= len(value):
        length, kind = struct.unpack_from("=HH", value, at)
        if length < 4 or at + length > len(value) or kind & 0x3FFF != _LIST_ELEM:
            raise Doubt("expression list")
        element = value[at:at + length]
        out.append((_text(_attrs(value, at + 4, at + length)[_EXPR_NAME]), element))
        at += (length + 3) & ~3
    return out


def _xt_comment(element: bytes) -> str | None:
    """The comment of an iptables-nft ``-m comment`` (an xtables ``match`` expression:
    iptables 1.8.9 writes a comment so), None for any other expression."""
    outer = _attrs(element, 4, len(element))
    if outer.get(_EXPR_NAME) != b"match\0":
        return None
    data = outer.get(_EXPR_DATA, b"")
    inner = _attrs(data, 0, len(data))
    if inner.get(_MATCH_NAME) != b"comment\0":
        return None
    info = inner.get(_MATCH_INFO, b"")
    if len(info) != 256 or b"\0" not in info:  # struct xt_comment_info
        raise Doubt("comment match")
    return info.split(b"\0", 1)[0].decode("utf-8", "strict")


class Rule:
    """A rule as dumped: where, its handle (order is the dump's), its comment (in its
    user data as nft writes it, or an xtables comment match as iptables-nft does) and
    its other expressions without counters (iptables-nft adds one to every rule)."""

    def __init__(self, table: str, chain: str, handle: int, comment: str | None,
                 exprs: tuple[bytes, ...]) -> None:
        self.table, self.chain, self.handle = table, chain, handle
        self.comment, self.exprs = comment, exprs

    def __repr__(self) -> str:
        return f"Rule({self.table} {self.chain} #{self.handle} {self.comment!r})"


def is_glue(rule: Rule, glue_comment: str) -> bool:
    """Whether ``rule`` is our glue rule; a rule with its comment and other expressions
    is a doubt (iptables-save would print it otherwise: let it)."""
    if rule.comment != glue_comment:
        return False
    if rule.exprs != GLUE_EXPRS:
        raise Doubt(f"{rule.chain} rule {rule.handle}: our glue's comment on another rule")
    return True


def parse_chains(reply: bytes) -> set[tuple[str, str]]:
    """(table, chain) of every chain of a GETCHAIN dump."""
    try:
        return {(_text(m[_CHAIN_TABLE]), _text(m[_CHAIN_NAME]))
                for m in _messages(reply, _NEWCHAIN)}
    except (KeyError, UnicodeDecodeError) as exc:
        raise Doubt(f"chain: {exc!r}") from None


def parse_rules(reply: bytes) -> list[Rule]:
    """Every rule of a GETRULE dump, in the dump's order (each chain's rules in their
    order)."""
    out = []
    try:
        for m in _messages(reply, _NEWRULE):
            userdata = m.get(_RULE_USERDATA)
            comments = [comment(userdata)] if userdata is not None else []
            exprs = []
            for name, element in expressions(m.get(_RULE_EXPRS, b"")):
                xt = _xt_comment(element) if name == "match" else None
                if xt is not None:
                    comments.append(xt)
                elif name != "counter":
                    exprs.append(element)
            said = [c for c in comments if c is not None]
            if len(said) > 1:
                raise Doubt("two comments")
            out.append(Rule(_text(m[_RULE_TABLE]), _text(m[_RULE_CHAIN]),
                            int(struct.unpack("!Q", m[_RULE_HANDLE])[0]),
                            said[0] if said else None, tuple(exprs)))
    except (KeyError, UnicodeDecodeError, struct.error) as exc:
        raise Doubt(f"rule: {exc!r}") from None
    return out


def dump(request: int, family: int, table: str | None = None) -> bytes:
    """One whole netlink dump of ``family`` (of one table, else of every table): the
    replies joined. Raises Doubt where nf_tables cannot be asked."""
    body = struct.pack("=BBH", family, 0, 0)
    if table is not None:  # NFTA_RULE_TABLE (= NFTA_CHAIN_TABLE)
        body += attr(_RULE_TABLE, strz(table))
    header = struct.pack("=IHHII", 16 + len(body), _SUBSYS | request, _DUMP, 1, 0)
    try:
        sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    except OSError as exc:
        raise Doubt(f"netlink: {exc}") from None
    parts = []
    try:
        sock.settimeout(2)
        sock.send(header + body)
        while True:
            part = sock.recv(1 << 20)
            parts.append(part)
            if not part or _ends(part):
                break
    except OSError as exc:
        raise Doubt(f"netlink: {exc}") from None
    finally:
        sock.close()
    return b"".join(parts)


def _ends(part: bytes) -> bool:
    """Whether this piece of a dump holds its last message (NLMSG_DONE or an error)."""
    return any(kind in (_DONE, _ERROR) for kind, *_ in messages(part))


def read(family: int) -> tuple[set[tuple[str, str]], list[Rule]]:
    """The chains of every table of ``family`` (NFPROTO_IPV4 2, NFPROTO_IPV6 10) and
    the rules of its ``filter`` table: two dumps, between two reads of nf_tables'
    generation that must agree (nothing changed between the dumps). Raises Doubt."""
    from .nftprobe import generation
    before = generation()
    rules = parse_rules(dump(_GETRULE, family, "filter"))
    chains = parse_chains(dump(_GETCHAIN, family))
    if before is None or generation() != before:
        raise Doubt("the ruleset changed while read")
    if any(r.table != "filter" for r in rules):
        raise Doubt("a rule of another table")
    return chains, rules
