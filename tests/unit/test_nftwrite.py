"""The netlink batch of element changes (``backends/nftwrite.py``), as bytes: what each
field of a key becomes, what is left to ``nft -f``, how the batch is framed. That the
kernel takes these bytes as nft's own is tests/kernel/test_nft_write.py's to prove."""

import struct

import pytest

from kvmufw_hook.backends import nftwrite
from kvmufw_hook.backends.nft import EXACT, SETS, Element
from kvmufw_hook.backends.nftprobe import messages

TYPES = nftwrite.set_types(SETS, EXACT)
TAG = "kvmufw:d=web1,b=virbr1,s=10.0.0.0/24"


def test_each_field_is_the_kernels_bytes_first_and_last():
    assert nftwrite._field("ipv4_addr", "10.0.0.0/24") == (bytes([10, 0, 0, 0]),
                                                          bytes([10, 0, 0, 255]))
    assert nftwrite._field("ipv4_addr", "0.0.0.0/0") == (b"\0" * 4, b"\xff" * 4)
    assert nftwrite._field("ipv6_addr", "fd00::5") == (bytes.fromhex("fd00" + "0" * 26 + "05"),) * 2
    assert nftwrite._field("inet_service", "5000-5002") == (b"\x13\x88", b"\x13\x8a")
    assert nftwrite._field("inet_proto", "sctp") == (b"\x84", b"\x84")
    assert nftwrite._field("ifname", '"virbr1"') == (b"virbr1" + b"\0" * 10,) * 2


@pytest.mark.parametrize("kind,text", [
    ("ipv4_addr", "10.0.0.1/24"),  # host bits: nft refuses it
    ("ipv4_addr", "10.0.0.256"), ("ipv6_addr", "fd00::/129"),
    ("inet_service", "70000"), ("inet_service", "9-3"), ("inet_service", "http"),
    ("inet_proto", "gre?"), ("ifname", "virbr1"), ('ifname', '"virbr*"'),
    ("ifname", '"' + "x" * 16 + '"'), ("ether_addr", "52:54:00:00:00:05"),
    # digits Python's int() reads and nft does not: Unencodable, never ValueError or a port
    ("inet_service", "\u00b2"), ("inet_service", "\u0668\u0660"), ("inet_service", "1-\u00b3"),
    ("inet_proto", "\u0666"), ("inet_proto", "\u00b9")])
def test_what_it_does_not_know_is_left_to_nft(kind, text):
    with pytest.raises(nftwrite.Unencodable):
        nftwrite._field(kind, text)


def test_every_set_is_written():
    assert set(TYPES) == set(SETS)


def test_a_single_field_interval_is_its_start_and_the_address_after_it_flagged_end():
    """As nft 1.0.6 sends it (``nft --debug=netlink``): the start with the value and the
    comment, the end flagged NFTA_SET_ELEM_FLAGS INTERVAL_END, and on the set's adds an
    end at the zero address first."""
    e = Element("masqp_any4", "10.0.0.0/24", "jump masq_1024_65535", TAG)
    start, end = (_attrs(_attrs(x)[1]) for x in TYPES["masqp_any4"].elements([e], True, {}))
    assert _attrs(start[1])[1] == bytes([10, 0, 0, 0]) and 3 not in start
    assert _attrs(_attrs(start[2])[2])[2] == b"masq_1024_65535\0" and 6 in start
    assert _attrs(end[1])[1] == bytes([10, 0, 1, 0]) and end[3] == struct.pack("!I", 1)
    assert set(end) == {1, 3}  # no value, no comment on an end
    six = Element("masq_any6", "fd00:10::/64", None, TAG)
    _start, end = (_attrs(_attrs(x)[1]) for x in TYPES["masq_any6"].elements([six], False, {}))
    assert _attrs(end[1])[1] == bytes.fromhex("fd000010000000010000000000000000")
    zero = _attrs(_attrs(TYPES["masq_any6"].zero)[1])
    assert _attrs(zero[1])[1] == b"\0" * 16 and zero[3] == struct.pack("!I", 1)
    groups, rest = nftwrite.separate(TYPES, [six])
    assert rest == [] and groups[0][2][0] == TYPES["masq_any6"].zero  # adds only
    assert nftwrite._groups(TYPES, 14, [six], {})[0][2][0] != TYPES["masq_any6"].zero


@pytest.mark.parametrize("key", ["0.0.0.0/8", "255.255.255.0/24", "0.0.0.0/0"])
def test_an_interval_from_zero_or_to_the_last_address_is_nfts(key):
    """nft marks one open (its user data) or needs no zero end: left to nft -f."""
    with pytest.raises(nftwrite.Unencodable):
        TYPES["masq_any4"].element(Element("masq_any4", key, None, TAG), add=True)


def _attrs(data: bytes) -> dict[int, bytes]:
    out, at = {}, 0
    while at + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, at)
        out[kind & 0x3FFF] = data[at + 4:at + length]
        at += (length + 3) & ~3
    return out


def test_an_exact_element_is_its_padded_key_value_and_comment():
    e = Element("dnat4_any", "tcp . 2222", "10.0.0.5 . 22", TAG)
    elem = _attrs(_attrs(TYPES["dnat4_any"].element(e, add=True))[1])
    assert _attrs(elem[1])[1] == b"\x06\0\0\0" + b"\x08\xae\0\0"  # KEY: tcp . 2222
    assert 10 not in elem  # no KEY_END in a hash
    assert _attrs(elem[2])[1] == bytes([10, 0, 0, 5]) + b"\0\x16\0\0"  # DATA: 10.0.0.5 . 22
    text = TAG.encode() + b"\0"
    assert elem[6] == bytes([0, len(text)]) + text  # USERDATA: nftnl's comment TLV
    deleted = _attrs(_attrs(TYPES["dnat4_any"].element(e, add=False))[1])
    assert set(deleted) == {1}  # a delete names the key only


def test_an_interval_element_has_its_key_end():
    e = Element("guest4", '"virbr1" . 10.0.0.5 . udp . 5000-5002', None, TAG)
    elem = _attrs(_attrs(TYPES["guest4"].element(e, add=True))[1])
    name = b"virbr1" + b"\0" * 10
    assert _attrs(elem[1])[1] == name + bytes([10, 0, 0, 5]) + b"\x11\0\0\0" + b"\x13\x88\0\0"
    assert _attrs(elem[10])[1] == name + bytes([10, 0, 0, 5]) + b"\x11\0\0\0" + b"\x13\x8a\0\0"


def test_a_verdict_map_element_jumps_to_its_chain():
    e = Element("masqp4", '10.0.0.0/24 . "eth0"', "jump masq_1024_65535", TAG)
    data = _attrs(_attrs(_attrs(TYPES["masqp4"].element(e, add=True))[1])[2])[2]
    verdict = _attrs(data)
    assert struct.unpack("!i", verdict[1])[0] == -3  # NFT_JUMP
    assert verdict[2] == b"masq_1024_65535\0"
    with pytest.raises(nftwrite.Unencodable):
        TYPES["masqp4"].element(Element(e.set, e.key, "accept", TAG), add=True)


@pytest.mark.parametrize("e", [
    Element("guestx4", '"virbr1" . 10.0.0.5 . tcp . 80-81', None, TAG),  # a range in a hash
    Element("dnat4_any", "tcp . 2222", None, TAG),  # a map element without its value
    Element("b2b4", '"virbr1" . "virbr1"', "10.0.0.5", TAG),  # a set element with one
])
def test_an_element_its_set_cannot_hold_is_left_to_nft(e):
    with pytest.raises(nftwrite.Unencodable):
        TYPES[e.set].element(e, add=True)


def test_the_batch_is_begin_with_the_generation_each_sets_messages_and_end():
    adds = [Element("guestx4", f'"virbr1" . 10.0.{i // 250}.{i % 250 + 1} . tcp . 22', None,
                    TAG) for i in range(1000)]
    deletes = [Element("dnat4_any", "tcp . 2222", None, TAG)]
    payload, sets = nftwrite.batch("kvmufw", TYPES, 77, deletes, adds)
    parts = list(messages(payload))
    kinds = [kind for kind, *_ in parts]
    assert kinds[0] == 16 and kinds[-1] == 17  # NFNL_MSG_BATCH_BEGIN, _END
    begin = parts[0]
    assert payload[begin[3]:begin[3] + 4] == b"\0\0\x00\x0a"  # AF_UNSPEC, res_id nftables
    assert _attrs(payload[begin[3] + 4:begin[4]])[1] == struct.pack("!I", 77)  # GENID
    assert kinds[1] == (10 << 8) | 14 and all(k == (10 << 8) | 12 for k in kinds[2:-1])
    assert len(kinds) > 4  # a thousand elements take more than one message
    assert all(end - start < 65536 for _k, _f, _s, start, end in parts)
    assert sets == {seq: "dnat4_any" if seq == 2 else "guestx4"
                    for _k, _f, seq, _st, _e in parts[1:-1]}
    assert [seq for _k, _f, seq, *_ in parts] == list(range(1, len(parts) + 1))
    flags = [f for _k, f, *_ in parts]
    assert flags[1] == 0x5 and set(flags[2:-1]) == {0x405}  # ACK; adds with NLM_F_CREATE
    with pytest.raises(nftwrite.Unencodable):
        nftwrite.batch("kvmufw", TYPES, 77, [], [Element("masq_any4", "0.0.0.0/8", None, TAG)])


def test_elements_that_share_fields_encode_each_as_it_would_alone():
    """The batch's memo (fields, key heads, values, comments shared by thousands of
    elements) changes no byte: each element is what it is encoded alone, in every set
    kind (hash, interval, map, verdict map, both families)."""
    items = [Element("dnat4_any", f"tcp . {2000 + i}", f"10.0.0.{i % 3 + 5} . {22 + i % 2}",
                     f"kvmufw:d=g{i % 3},b=virbr1,s=10.0.0.0/24") for i in range(9)]
    items += [Element("guestx4", f'"virbr{i % 2}" . 10.0.0.{i % 3 + 5} . tcp . {22 + i}',
                      None, TAG) for i in range(6)]
    items += [Element("guest6", f'"virbr1" . fd00::{i % 2 + 5} . udp . {i}-{i + 2}', None,
                      TAG) for i in range(4)]
    items += [Element("dnat6_port", f"::/0 . 2001:db8::/32 . tcp . {i}", f"fd00::5 . {i}",
                      "") for i in range(3)]
    items += [Element("masqp4", f'10.0.{i}.0/24 . "eth0"', "jump masq_1024_65535", TAG)
              for i in range(3)]
    items += [Element("hairpinx4", '10.0.0.5 . "virbr1" . tcp . 22', None, TAG)]
    for add in (True, False):
        memo: dict = {}
        by_set: dict[str, list[Element]] = {}
        for e in items:
            by_set.setdefault(e.set, []).append(e)
        for name, elements in by_set.items():
            assert TYPES[name].elements(elements, add, memo) == [
                TYPES[name].element(e, add) for e in elements], name


@pytest.mark.parametrize("e", [
    Element("guestx4", '"virbr1" . 10.0.0.5 . tcp . 80-81', None, TAG),  # its head is known
    Element("guestx4", '"virbr1" . 10.0.0.5 . tcp', None, TAG),  # a field short
    Element("guestx4", '"virbr1" . 10.0.0.5 . tcp . 80 . 81', None, TAG),  # one too many
    Element("dnat4_any", "tcp . 2222", "10.0.0.5 . 22-23", TAG),  # a range as a value
])
def test_a_remembered_field_lets_no_wrong_element_through(e):
    known = [Element("guestx4", '"virbr1" . 10.0.0.5 . tcp . 80', None, TAG),
             Element("dnat4_any", "tcp . 2222", "10.0.0.5 . 22", TAG)]
    nftwrite.batch("kvmufw", TYPES, 1, [], known)
    with pytest.raises(nftwrite.Unencodable):
        nftwrite.batch("kvmufw", TYPES, 1, [], [*known, e])


def test_separate_leaves_what_it_cannot_encode_to_nft():
    """A created table's adds: those of sets it writes encoded per set (one by one only
    where a set holds a text it does not know), the others left for T1's nft -f."""
    odd = Element("host_in4", '"virbr1" . tcp . http', None, TAG)  # a service name
    adds = [Element("masq_any4", "255.255.255.0/24", None, TAG),  # open: nft's
            Element("host_in4", '"virbr1" . udp . 67', None, TAG), odd,
            Element("dnat4_any", "tcp . 2222", "10.0.0.5 . 22", TAG),
            Element("host_in4", '"virbr1" . udp . 53', None, TAG),
            Element("nosuchset", "10.0.0.0/24", None, TAG)]
    groups, rest = nftwrite.separate(TYPES, adds)
    assert rest == [adds[5], adds[0], odd]
    assert [(verb, name) for verb, name, _ in groups] == [(12, "host_in4"), (12, "dnat4_any")]
    assert groups[0][2] == [TYPES["host_in4"].element(e, True) for e in (adds[1], adds[4])]
    payload, sets = nftwrite.framed("kvmufw", 9, groups)
    assert (payload, sets) == nftwrite.batch("kvmufw", TYPES, 9, [],
                                             [adds[1], adds[4], adds[3]])
