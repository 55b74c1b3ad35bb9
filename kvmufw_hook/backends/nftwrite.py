"""Element adds and deletes in our table's existing sets and maps, written by nf_tables
netlink in-process: one batch, no ``nft`` process. A guest's start or stop is exactly
that change; everything else (the skeleton, a range chain, glue, ``prefix``) stays with
``nft -f``.

Promises:
- One transaction: NFNL_MSG_BATCH_BEGIN carrying NFNL_BATCH_GENID (the generation our
  change was computed from), one NFT_MSG_DELSETELEM / NFT_MSG_NEWSETELEM (NLM_F_CREATE,
  as ``nft add element``) per set, NFNL_MSG_BATCH_END. The kernel checks the generation
  under its commit mutex and commits the batch whole or not at all: accepted, nf_tables'
  generation is exactly ours + 1 (what ``Record`` needs, with no request after it);
  refused with ERESTART, someone changed the ruleset since our read (``Stale``: the
  operation reads and computes again, ``apply.retrying``); any other refusal is one
  ApplyError line naming the set and the errno, and nothing of the batch is applied.
- Exactly what nft writes: keys and values encoded from the element texts by the set's
  type (``nft.SETS``), each field of a concatenation padded to 4 bytes, an interval
  concatenation (pipapo) with KEY and KEY_END, the comment as the element's user data
  (nftnl's TLV). A single-field interval set (rbtree: ``masq_anyF``, ``masqp_anyF``) as
  nft 1.0.6 sends it: each interval its start and the address after it flagged
  INTERVAL_END, and an add first an INTERVAL_END at the zero address (nft sends it
  where the set has none; where it has one, the kernel takes ours as the same, without
  NLM_F_EXCL). A kernel test writes the same changes by netlink and by ``nft -f`` into
  two fresh tables and compares ``nft list`` and ``nft --json`` byte for byte.
- Cheap per element (a replay sends 6,000): each distinct field text, key head (all
  fields but the last), value and comment is encoded once per batch (``Memo``), and the
  attribute headers of a set's keys and values, all of fixed size, once per set type.
- What it cannot encode exactly (a single-field interval from the zero address, where
  nft sends no zero end, or to the last one, which nft marks open in its user data; a
  text it does not know) raises ``Unencodable`` before anything is sent, and the whole
  change goes to ``nft -f`` (never half one way, half the other). Not known: a set that
  nft -f gave an interval from the zero address and no zero end, then added to by
  netlink (our masquerade sets hold networks' subnets: none starts there).
- The socket's close does not hold up the hook: after a batch that deleted elements the
  close waits for nf_tables' deferred destroy work (an RCU grace period, ~10 ms here), so
  its last reference goes to a short-lived child that has closed everything else first
  (stdio, the state lock), once the kernel has acknowledged the batch (``release``).
"""

from __future__ import annotations

import _socket
import struct

from ..errors import ApplyError, Stale
from .nftprobe import SUBSYS, attr, messages, strz

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from .nft import Element

    # An encoding's memo, one per batch: field text -> its bytes, per field kind (a
    # key's fields but its last, joined, per tuple of kinds); value -> data; comment ->
    # user data. Thousands of elements share a few hundred bridges, guests, ports, owners.
    Memo = dict[Any, dict[Any, Any]]
    Groups = list[tuple[int, str, list[bytes]]]  # (verb, set, its elements encoded)

NFPROTO_INET = 1
_NEWSETELEM, _DELSETELEM = 12, 14
_BATCH_BEGIN, _BATCH_END, _BATCH_GENID = 16, 17, 1  # NFNL_MSG_BATCH_*, NFNL_BATCH_GENID
_REQUEST, _ACK, _CREATE = 0x1, 0x4, 0x400
_ERROR = 2  # NLMSG_ERROR
_NESTED = 0x8000
# NFTA_SET_ELEM_LIST_TABLE, _SET, _ELEMENTS; NFTA_LIST_ELEM; NFTA_SET_ELEM_KEY, _DATA,
# _USERDATA, _KEY_END; NFTA_DATA_VALUE, _VERDICT; NFTA_VERDICT_CODE, _CHAIN
_LIST_TABLE, _LIST_SET, _LIST_ELEMENTS, _LIST_ELEM = 1, 2, 3, 1
_KEY, _DATA, _USERDATA, _KEY_END = 1, 2, 6, 10
_VALUE, _VERDICT, _CODE, _CHAIN = 1, 2, 1, 2
_JUMP = -3  # NFT_JUMP
_ENDS = struct.pack("=HH", 8, 3) + struct.pack("!I", 1)  # NFTA_SET_ELEM_FLAGS: INTERVAL_END
_COMMENT = 0  # NFTNL_UDATA_SET_ELEM_COMMENT
ERESTART = 85
# an attribute's length is 16 bits: a set's elements go in messages of at most this much
_MESSAGE = 60000
PROTOCOLS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "ipv6-icmp": 58, "icmpv6": 58,
             "dccp": 33, "sctp": 132, "udplite": 136}


class Unencodable(ValueError):
    """A change this module does not write exactly as nft would: ``nft -f`` writes it."""


def _address(family: int, text: str) -> tuple[bytes, bytes]:
    """(first, last) address of an address, a prefix or a range."""
    size = 4 if family == _socket.AF_INET else 16
    try:
        if "/" in text:
            base, _, length = text.partition("/")
            bits = int(length)
            if not 0 <= bits <= size * 8:
                raise Unencodable(text)
            number = int.from_bytes(_socket.inet_pton(family, base), "big")
            host = (1 << (size * 8 - bits)) - 1
            if number & host:
                raise Unencodable(text)  # nft refuses a prefix with host bits
            return (number.to_bytes(size, "big"), (number | host).to_bytes(size, "big"))
        first, _, last = text.partition("-") if family == _socket.AF_INET else (text, "", "")
        low = _socket.inet_pton(family, first)
        return low, _socket.inet_pton(family, last) if last else low
    except (OSError, ValueError):
        raise Unencodable(text) from None


def _field(kind: str, text: str) -> tuple[bytes, bytes]:
    """(first, last) value of one field of a key or value, in the kernel's bytes
    (unpadded)."""
    if kind == "ipv4_addr":
        return _address(_socket.AF_INET, text)
    if kind == "ipv6_addr":
        return _address(_socket.AF_INET6, text)
    if kind == "inet_service":
        first, _, last = text.partition("-")
        if not (first + last).isascii() or not first.isdigit() or not (last or first).isdigit():
            # (isdigit alone: "²" raised ValueError, "٨٠" was port 80; nft takes neither)
            raise Unencodable(text)
        low, high = int(first), int(last or first)
        if not low <= high <= 0xFFFF:
            raise Unencodable(text)
        return struct.pack("!H", low), struct.pack("!H", high)
    if kind == "inet_proto":
        number = PROTOCOLS.get(text, int(text) if text.isascii() and text.isdigit() else None)
        if number is None or number > 255:
            raise Unencodable(text)
        return bytes((number,)), bytes((number,))
    if kind == "ifname":
        if len(text) < 2 or text[0] != '"' or text[-1] != '"' or "*" in text:
            raise Unencodable(text)
        name = text[1:-1].encode()
        if not name or len(name) >= 16 or b"\\" in name:
            raise Unencodable(text)
        name += b"\0" * (16 - len(name))
        return name, name
    raise Unencodable(kind)


def _padded(kind: str, text: str) -> tuple[bytes, bytes]:
    """(first, last) of one field, padded to 4 bytes as nft registers hold them."""
    if kind == "inet_service" and text.isascii() and text.isdigit() and int(text) <= 0xFFFF:
        port = int(text).to_bytes(2, "big") + b"\0\0"  # the common one: no range
        return port, port
    first, last = _field(kind, text.strip())
    pad = b"\0" * (-len(first) % 4)
    return first + pad, last + pad


def _concat(kinds: tuple[str, ...], text: str, memo: Memo) -> tuple[bytes, bytes]:
    """(first, last) of a concatenation, each field padded to 4 bytes; its fields but
    the last are looked up (and remembered) as one."""
    head, sep, last = text.rpartition(" . ")
    lasts = memo.get(kinds[-1])
    if lasts is None:
        lasts = memo[kinds[-1]] = {}
    tail = lasts.get(last)
    if tail is None:
        tail = lasts[last] = _padded(kinds[-1], last)
    if len(kinds) == 1:
        if sep:
            raise Unencodable(text)  # more fields than the type has
        return tail
    if not sep:
        raise Unencodable(text)
    heads = memo.get(kinds)
    if heads is None:
        heads = memo[kinds] = {}
    first = heads.get(head)
    if first is None:
        first = heads[head] = _concat(kinds[:-1], head, memo)
    return first[0] + tail[0], first[1] + tail[1]


def _nest(kind: int, payload: bytes) -> bytes:
    return attr(kind | _NESTED, payload)


class SetType:
    """One of our sets or maps: its key's fields, its value's (``verdict`` for a verdict
    map, none for a set) and whether it holds intervals."""

    def __init__(self, kind: str, interval: bool) -> None:
        key, _, value = kind.partition(" : ")
        self.key = tuple(key.split(" . "))
        self.value = tuple(value.split(" . ")) if value else ()
        self.interval = interval
        if not set(self.key) <= set(_SIZE):
            raise Unencodable(key)
        size = sum(_SIZE[k] for k in self.key)  # the key's bytes, every field padded
        self._key = struct.pack("=HHHH", 8 + size, _KEY | _NESTED, 4 + size, _VALUE)
        self._end = struct.pack("=HHHH", 8 + size, _KEY_END | _NESTED, 4 + size, _VALUE)
        # a single-field interval set (rbtree): nft 1.0.6 writes an interval as two
        # elements, its start and the address after it flagged INTERVAL_END, and the
        # set's first add also an INTERVAL_END element at the zero address (``zero``)
        self.ends = interval and len(self.key) == 1
        if self.ends and self.key[0] not in ("ipv4_addr", "ipv6_addr"):
            raise Unencodable(key)
        self.size = size
        self.zero = _list_elem(_ENDS + self._key + b"\0" * size)
        self._value = b""  # a value's DATA headers, where it is one (not a verdict)
        if self.value and self.value != ("verdict",):
            if not set(self.value) <= set(_SIZE):
                raise Unencodable(value)
            size = sum(_SIZE[k] for k in self.value)
            self._value = struct.pack("=HHHH", 8 + size, _DATA | _NESTED, 4 + size, _VALUE)

    def element(self, e: Element, add: bool) -> bytes:
        """One NFTA_LIST_ELEM (``elements``)."""
        return self.elements([e], add, {})[0]

    def elements(self, items: Iterable[Element], add: bool, memo: Memo) -> list[bytes]:
        """One NFTA_LIST_ELEM each: KEY (and KEY_END in an interval set), on an add the
        value and the comment, in libnftnl's order. Every field has a fixed size: the
        attribute headers are the same for every element of the set."""
        if self.ends:
            return self._ends(items, add, memo)
        kinds, interval, nested = self.key, self.interval, _LIST_ELEM | _NESTED
        key_head, end_head = self._key, self._end
        values: dict[str | None, bytes] = memo.setdefault(("value", self.value), {})
        comments: dict[str, bytes] = memo.setdefault("comment", {})
        lasts = memo.setdefault(kinds[-1], {})
        heads = memo.setdefault(kinds, {}) if len(kinds) > 1 else {"": (b"", b"")}
        pack = struct.pack
        out = []
        for e in items:
            _set, key, value, comment = e
            # _concat inline: thousands of keys, each once
            head, sep, last = key.rpartition(" . ")
            tail = lasts.get(last)
            if tail is None:
                tail = lasts[last] = _padded(kinds[-1], last)
            first = heads.get(head)
            if first is None:
                if not sep or len(kinds) == 1:
                    raise Unencodable(key)  # fewer or more fields than the type has
                first = heads[head] = _concat(kinds[:-1], head, memo)
            if interval:
                body = key_head + first[0] + tail[0] + end_head + first[1] + tail[1]
            elif first[0] != first[1] or tail[0] != tail[1]:
                raise Unencodable(key)  # a range in a hash
            else:
                body = key_head + first[0] + tail[0]
            if add:
                data = values.get(value)
                if data is None:
                    data = values[value] = self._data(e, memo)
                note = comments.get(comment)
                if note is None:
                    note = comments[comment] = _userdata(comment)
                body += data + note
            out.append(pack("=HH", 4 + len(body), nested) + body)
        return out

    def _ends(self, items: Iterable[Element], add: bool, memo: Memo) -> list[bytes]:
        """A single-field interval set's elements: the start (on an add with the value
        and the comment) and the end (the address after the interval, flagged
        INTERVAL_END) of each. An interval that starts at the zero address or reaches
        the last one (nft marks it open in its user data) is nft's."""
        out = []
        for e in items:
            low, high = _concat(self.key, e.key, memo)
            after = int.from_bytes(high, "big") + 1
            if not any(low) or after >> (8 * self.size):
                raise Unencodable(e.key)
            start = self._key + low
            if add:
                start += self._data(e, memo) + _userdata(e.comment)
            out += [_list_elem(start),
                    _list_elem(_ENDS + self._key + after.to_bytes(self.size, "big"))]
        return out

    def _data(self, e: Element, memo: Memo) -> bytes:
        """The element's NFTA_SET_ELEM_DATA: a verdict, a value, or nothing (a set)."""
        if self.value == ("verdict",):
            verb, _, chain = (e.value or "").partition(" ")
            if verb != "jump" or not chain:
                raise Unencodable(str(e.value))
            return _nest(_DATA, _nest(_VERDICT, attr(_CODE, struct.pack("!i", _JUMP))
                                      + attr(_CHAIN, strz(chain))))
        if self.value:
            if e.value is None:
                raise Unencodable(e.key)
            data, last = _concat(self.value, e.value, memo)
            if data != last:
                raise Unencodable(e.value)
            return self._value + data
        if e.value is not None:
            raise Unencodable(e.value)
        return b""


# each field kind's size in a key, padded to 4 bytes
_SIZE = {"ipv4_addr": 4, "ipv6_addr": 16, "inet_service": 4, "inet_proto": 4, "ifname": 16}


def _list_elem(payload: bytes) -> bytes:
    return _nest(_LIST_ELEM, payload)


def _userdata(comment: str) -> bytes:
    """The comment as nftnl's user data TLV (none without a comment)."""
    if not comment:
        return b""
    text = strz(comment)
    if len(text) > 255:
        raise Unencodable("comment")
    return attr(_USERDATA, bytes((_COMMENT, len(text))) + text)


def set_types(sets: dict[str, str], exact: Iterable[str]) -> dict[str, SetType]:
    """name -> SetType of each set or map (by its nft type; interval unless ``exact``)
    that this module writes."""
    hashed = set(exact)
    out = {}
    for name, kind in sets.items():
        try:
            out[name] = SetType(kind, name not in hashed)
        except Unencodable:
            continue
    return out


def _message(kind: int, flags: int, seq: int, family: int, res_id: int,
             attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, res_id) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def batch(table: str, types: dict[str, SetType], genid: int,
          deletes: Iterable[Element], adds: Iterable[Element]) -> tuple[bytes, dict[int, str]]:
    """The whole batch (deletes, then adds, each set's elements in the order given,
    as ``nft -f`` sends ``delete element`` then ``add element`` lines) and the set each
    element message's sequence number writes. Unencodable before anything is sent."""
    memo: Memo = {}
    return framed(table, genid, _groups(types, _DELSETELEM, deletes, memo)
                  + _groups(types, _NEWSETELEM, adds, memo))


def separate(types: dict[str, SetType], adds: Iterable[Element]
             ) -> tuple[Groups, list[Element]]:
    """The adds this module encodes, as ``framed`` takes them (each set's in the order
    given), and the others (``nft -f`` writes those): of sets it does not write, then
    texts it does not know."""
    rest: list[Element] = []
    return _groups(types, _NEWSETELEM, adds, {}, rest), rest


def _groups(types: dict[str, SetType], verb: int, items: Iterable[Element], memo: Memo,
            rest: list[Element] | None = None) -> Groups:
    """(verb, set, its elements encoded) per set; an element it cannot encode raises
    Unencodable, or goes to ``rest`` where given."""
    add = verb == _NEWSETELEM
    by_set: dict[str, list[Element]] = {}
    for e in items:
        found = by_set.get(e[0])  # its set
        if found is None:
            if e[0] not in types:
                if rest is None:
                    raise Unencodable(e[0])
                rest.append(e)
                continue
            found = by_set[e[0]] = []
        found.append(e)
    out: Groups = []
    for name, elements in by_set.items():
        kind = types[name]
        try:
            encoded = kind.elements(elements, add, memo)
        except Unencodable:
            if rest is None:
                raise
            encoded = []
            for e in elements:  # rare: one by one, to find those it cannot
                try:
                    encoded += kind.elements([e], add, memo)
                except Unencodable:
                    rest.append(e)
        if encoded:
            out.append((verb, name, [kind.zero, *encoded] if add and kind.ends else encoded))
    return out


def framed(table: str, genid: int, groups: Groups) -> tuple[bytes, dict[int, str]]:
    """The batch of these encoded elements (``batch``): BEGIN with ``genid``, each set's
    messages (at most ``_MESSAGE`` bytes of elements each), END; and the set each
    element message's sequence number writes."""
    head = attr(_LIST_TABLE, strz(table))
    out = [_message(_BATCH_BEGIN, _REQUEST, 1, 0, _socket.htons(SUBSYS >> 8),
                    attr(_BATCH_GENID, struct.pack("!I", genid)))]
    sets: dict[int, str] = {}
    for verb, name, encoded in groups:
        flags = _REQUEST | _ACK | (_CREATE if verb == _NEWSETELEM else 0)
        cuts, size = [0], 0  # where each message's elements begin
        for at, item in enumerate(encoded):
            if size + len(item) > _MESSAGE and at > cuts[-1]:
                cuts.append(at)
                size = 0
            size += len(item)
        for begin, end in zip(cuts, [*cuts[1:], len(encoded)], strict=True):
            seq = len(out) + 1
            sets[seq] = name
            out.append(_message(SUBSYS | verb, flags, seq, NFPROTO_INET, 0,
                                head + attr(_LIST_SET, strz(name))
                                + _nest(_LIST_ELEMENTS, b"".join(encoded[begin:end]))))
    out.append(_message(_BATCH_END, _REQUEST, len(out) + 1, 0,
                        _socket.htons(SUBSYS >> 8), b""))
    return b"".join(out), sets


def send(payload: bytes, sets: dict[int, str], table: str) -> _socket.socket:
    """Send the batch and read the kernel's answer to each message. The socket back,
    open (its release is the caller's). Stale on ERESTART, ApplyError (one line: the set
    and the errno) on any other refusal; nothing applied then."""
    try:
        sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    except OSError as exc:
        raise ApplyError(f"nf_tables netlink: {exc}") from None
    try:
        _exchange(sock, payload, sets, table)
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(sock: _socket.socket, payload: bytes, sets: dict[int, str],
              table: str) -> None:
    """The kernel handles a batch while ``send`` runs; every answer is queued then: an
    acknowledgement per element message, or an error (ERESTART and a refused commit
    answer the batch's first message)."""
    try:
        sock.settimeout(2)
        if len(payload) > 200000:  # past the default send buffer
            sock.setsockopt(_socket.SOL_SOCKET, 32, 2 * len(payload))  # SO_SNDBUFFORCE
        sock.send(payload)
        waiting = set(sets)
        while waiting:
            data = sock.recv(1 << 16)
            for kind, _flags, seq, start, _end in messages(data):
                if kind != _ERROR:
                    continue
                (error,) = struct.unpack_from("=i", data, start)
                if error == -ERESTART:
                    raise Stale(f"table inet {table}: the ruleset changed since it was read")
                if error:
                    import os
                    where = f"set {sets[seq]}" if seq in sets else "batch"
                    raise ApplyError(f"nf_tables refused the change of table inet {table} "
                                     f"({where}): {os.strerror(-error)} (errno {-error})")
                waiting.discard(seq)
    except OSError as exc:
        raise ApplyError(f"nf_tables netlink: {exc}") from None


# Children that close a batch's socket for us (``release``), reaped as they end.
_CLOSERS: list[int] = []


def release(sock: _socket.socket, deleted: bool) -> None:
    """Close the batch's socket. After a batch that deleted elements, nf_tables frees
    them after an RCU grace period, in deferred work; the close of a netlink socket that
    used nf_tables (NETLINK_URELEASE) waits for that work to end: ~10 ms measured here
    (Linux 6.18), on every guest stop. So the last reference goes to a child that closes
    everything else first (stdin, stdout and stderr included: nobody waits for it, and
    the state lock is never held by it) and then the socket; this process's close of its
    own reference does not wait. Only after the kernel acknowledged the batch (it is
    committed); where the fork fails, the close is ours."""
    import os
    for pid in list(_CLOSERS):  # those ended meanwhile (a long-lived process writes often)
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                _CLOSERS.remove(pid)
        except ChildProcessError:
            _CLOSERS.remove(pid)
    if not deleted:
        sock.close()
        return
    try:
        pid = os.fork()
    except OSError:
        sock.close()
        return
    if pid == 0:  # pragma: no cover - the child: no return, no exception, no output
        try:
            fd = sock.fileno()
            os.closerange(0, fd)
            os.closerange(fd + 1, 1 << 20)
            sock.close()
        finally:
            os._exit(0)
    _CLOSERS.append(pid)
    sock.close()
