"""``forward list`` and the messages of ``forward add/remove`` in both families:
addresses as typed, IPv6 in brackets so that the port stays readable."""

from __future__ import annotations

import pytest

from kvmufw_hook.commands import forward as edit

pytestmark = pytest.mark.unit


def row(**attrs) -> dict:
    return {"owner": "domain web1", "active": True, **attrs}


@pytest.mark.parametrize("addresses, port, shown", [
    (["10.0.0.5"], "22", "10.0.0.5:22"),
    (["2001:db8::5"], "22", "[2001:db8::5]:22"),
    (["10.0.0.5", "2001:db8::5"], "22", "10.0.0.5,[2001:db8::5]:22"),
    (["fd00::5"], "6000-6002", "[fd00::5]:6000-6002"),
])
def test_endpoint_brackets_ipv6(addresses, port, shown):
    assert edit.endpoint(addresses, port) == shown


def test_list_row_shows_both_guest_addresses_joined():
    cells = edit.list_row(row(**{"host-port": "2222", "guest-port": "22",
                                 "guest-ip": "10.0.0.5, 2001:db8:ca2:2::10"}))
    assert cells == ("domain web1", "tcp", "*:2222", "10.0.0.5,[2001:db8:ca2:2::10]:22",
                     "any", "")


def test_list_row_shows_an_ipv6_host_ip_and_sources_as_given():
    cells = edit.list_row(row(**{"host-port": "8080", "host-ip": "2001:DB8::1",
                                 "proto": "udp", "source": "2001:db8:1::/48, 198.51.100.0/24",
                                 "comment": "web"}))
    assert cells[1:] == ("udp", "[2001:DB8::1]:8080", "(reservation):8080",
                         "2001:db8:1::/48,198.51.100.0/24", "web")


def test_list_row_of_ipv4_is_as_before():
    cells = edit.list_row({"owner": "network lab", "active": False, "host-port": "80",
                           "host-ip": "192.0.2.1", "guest-mac": "52:54:00:00:00:20"})
    assert cells == ("network lab (inactive)", "tcp", "192.0.2.1:80",
                     "52:54:00:00:00:20:80", "any", "")


def test_a_broken_entry_is_listed_not_a_traceback():
    """forward list shows what is written, even a forward without a host-port."""
    assert edit.list_row(row(**{"guest-ip": "fd00::5"}))[2:4] == ("*:?", "[fd00::5]:?")


def test_format_list_aligns_and_escapes():
    text = edit.format_list([row(**{"host-port": "22", "guest-ip": "10.0.0.5,fd00::5",
                                    "comment": "evil\x1b[2J"})])
    header, line = text.splitlines()
    assert header.split() == list(edit.LIST_HEADER)
    assert line.index("10.0.0.5,[fd00::5]:22") == header.index("GUEST")
    assert "\x1b" not in text and line.endswith("evil\\x1b[2J")


def test_done_names_an_ipv6_host_ip():
    spec = {"host-port": "80", "host-ip": "2001:db8::1", "proto": "tcp"}
    assert edit._done("domain 'web1'", "remove", spec, True, "the guest starts") == \
        "domain 'web1': remove tcp [2001:db8::1]:80: applied"
    assert edit._done("domain 'web1'", "add", {"host-port": "80"}, False,
                      "the guest starts") == \
        "domain 'web1': add tcp 80: saved; applied when the guest starts"
