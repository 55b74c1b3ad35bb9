"""The host's neighbour table as the kernel sends it: one netlink RTM_GETNEIGH dump of
both families, parsed without a kernel. The bytes below are a real dump (Linux 6.1) of
a bridge br0 whose table had 10.0.0.6 REACHABLE and fd00:10::6 PERMANENT at
52:54:00:00:00:06, 10.0.0.7 STALE at 52:54:00:00:00:07, 10.0.0.9 INCOMPLETE and
10.0.0.8 FAILED (no MAC), and the kernel's own multicast entries (NOARP)."""

import struct
from ipaddress import ip_address

import pytest

from kvmufw_hook import neighbours

DUMP = bytes.fromhex(
    "400000001c00020001000000cf550000020000000200000001000001080001000a000009080004000000"
    "000014000300721700000200000002000000000000004c0000001c00020001000000cf55000002000000"
    "0200000004000001080001000a0000070a00020052540000000700000800040000000000140003007317"
    "0000030000000300000000000000400000001c00020001000000cf550000020000000200000020000001"
    "080001000a000008080004000000000014000300721700000200000002000000000000004c0000001c00"
    "020001000000cf550000020000000200000002000001080001000a0000060a0002005254000000060000"
    "080004000000000014000300030000000300000003000000010000004c0000001c00020001000000cf55"
    "000002000000020000004000000508000100e00000160a00020001005e00001600000800040000000000"
    "1400030072170000020000000200000000000000580000001c00020001000000cf5500000a0000000200"
    "00008000000114000100fd0000100000000000000000000000060a000200525400000006000008000400"
    "000000001400030003000000030000000300000000000000580000001c00020001000000cf5500000a00"
    "0000020000004000000514000100ff0200000000000000000000000000160a0002003333000000160000"
    "08000400000000001400030072170000020000000200000000000000140000000300020001000000cf55"
    "000000000000")
MAC6, MAC7 = "52:54:00:00:00:06", "52:54:00:00:00:07"


@pytest.mark.unit
def test_a_dump_gives_each_entry_with_a_mac_of_both_families_and_ends():
    entries, done = neighbours.parse(DUMP)
    assert done
    assert [(i, str(a), m) for i, a, m in entries] == [
        (2, "10.0.0.7", MAC7), (2, "10.0.0.6", MAC6), (2, "224.0.0.22", "01:00:5e:00:00:16"),
        (2, "fd00:10::6", MAC6), (2, "ff02::16", "33:33:00:00:00:16")]


@pytest.mark.unit
def test_an_entry_whose_resolution_failed_or_is_pending_names_no_mac():
    """10.0.0.7's entry (STALE, a MAC) as FAILED and as INCOMPLETE: left out, though a
    MAC is still attached."""
    entries, _ = neighbours.parse(DUMP)
    at = DUMP.index(bytes.fromhex("0a000007")) - 8  # its ndmsg's state is 8 bytes before
    for state in (neighbours.NUD_FAILED, neighbours.NUD_INCOMPLETE, 0):
        changed = DUMP[:at] + struct.pack("=H", state) + DUMP[at + 2:]
        found, done = neighbours.parse(changed)
        assert done and [e[1] for e in found] == [e[1] for e in entries][1:]


@pytest.mark.unit
def test_a_dump_in_several_datagrams_goes_on_until_done_and_a_refusal_is_an_error():
    first, last = DUMP[:0x40 + 0x4c], DUMP[0x40 + 0x4c:]
    entries, done = neighbours.parse(first)
    assert not done and [str(e[1]) for e in entries] == ["10.0.0.7"]
    assert neighbours.parse(last)[1]
    assert neighbours.parse(first[:-3]) == ([], False)  # a message cut short: nothing
    error = struct.pack("=IHHIIi", 36, neighbours.NLMSG_ERROR, 0, 1, 0, -1) + bytes(16)
    with pytest.raises(OSError, match="refused"):
        neighbours.parse(error)


@pytest.mark.unit
def test_the_request_asks_for_every_entry_of_both_families():
    req = neighbours.request()
    length, kind, flags = struct.unpack_from("=IHH", req)
    assert (length, kind, flags) == (len(req), neighbours.RTM_GETNEIGH, 0x301)
    assert req[16] == 0  # AF_UNSPEC


@pytest.mark.unit
def test_entries_are_kept_by_device_and_a_reader_reads_the_table_once(monkeypatch):
    """An operation's reader: the entries on a network's bridge, the table read at the
    first question and not before (a device gone meanwhile names nothing)."""
    from kvmufw_hook.parse import parse_network_xml
    entries, _ = neighbours.parse(DUMP)
    names = {2: "br0"}
    table = neighbours.by_device([*entries, (9, ip_address("10.0.0.1"), MAC6)],
                                 lambda i: names[i] if i in names else _gone(i))
    assert list(table) == ["br0"] and (ip_address("10.0.0.6"), MAC6) in table["br0"]
    reads: list[tuple[str, ...]] = []
    monkeypatch.setattr(neighbours, "read_table",
                        lambda prefix: reads.append(tuple(prefix)) or table)
    on = neighbours.reader(["ip", "netns", "exec", "h"])
    assert reads == []
    net = parse_network_xml(b"<network><name>lab</name><bridge name='br0'/></network>")
    other = parse_network_xml(b"<network><name>o</name><bridge name='br1'/></network>")
    assert on(net) == table["br0"] and on(other) == () and on(net) == table["br0"]
    assert reads == [("ip", "netns", "exec", "h")]


def _gone(index: int) -> str:
    raise OSError(f"no device {index}")
