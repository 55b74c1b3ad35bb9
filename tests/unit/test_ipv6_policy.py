"""IPv6 against the policy, without a kernel: what someone who writes a domain's or a
network's XML can make the parser and the planner do with IPv6 (another guest's
reservation, a name, a SLAAC address, the router's address, a mapped or compatible
address, a zone index, a wider subnet), that families never leak into each other, and
that an IPv6 forward is never lost silently. The same promises with ip6tables are in
tests/kernel/test_ipv6_forwards_kernel.py.
"""

from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address

import pytest
from dualstack import DB_MAC, EVIL_MAC, WEB1_MAC, WIDE, dom_xml, net_xml, wide_with_forward

from kvmufw_hook import ops
from kvmufw_hook.backends.iptables import render_rule
from kvmufw_hook.backends.rules import netfilter_rules
from kvmufw_hook.errors import InputError
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml
from kvmufw_hook.plan import (
    check_conflicts,
    resolve_domain_forwards,
    resolve_network_forwards,
)


def resolve(name, mac, *forwards, **net_kw):
    net = parse_network_xml(net_xml(**net_kw))
    return resolve_domain_forwards(parse_domain_xml(dom_xml(name, mac, *forwards)),
                                   {net.name: net})


def refusal(name, mac, *forwards, **net_kw) -> str:
    with pytest.raises(InputError) as exc:
        resolve(name, mac, *forwards, **net_kw)
    line = str(exc.value)
    assert "\n" not in line and line.startswith("domain "), line
    return line


def targets(name, mac, *forwards, **net_kw) -> set:
    return {str(t.guest_ip) for t in resolve(name, mac, *forwards, **net_kw)}


# --------------------------------------------------------------------------- whose address

@pytest.mark.parametrize("name", ["web1 ", "Web1", "web1\t", "\u00a0web1", "evil"])
def test_a_domain_cannot_forward_to_another_guests_ipv6_reservation(name):
    """fd00:10::20 is reserved (by name, as every IPv6 reservation) for 'web1': a domain
    of any other name, even one differing only by case or whitespace, is refused it."""
    line = refusal(name, EVIL_MAC, 'host-port="2222" guest-port="22" guest-ip="fd00:10::20"')
    assert "reserved for another guest" in line and "'web1'" in line


@pytest.mark.parametrize("name", ["web1 ", "Web1", "web1\t"])
def test_a_name_that_only_looks_like_web1_does_not_resolve_to_its_ipv6(name):
    """Without guest-ip, the IPv6 reservation is the one named exactly as the domain."""
    line = refusal(name, EVIL_MAC, 'host-port="2222" guest-port="22" source="2001:db8::/32"')
    assert "cannot resolve" in line


def test_web1_itself_resolves_its_own_addresses_in_both_families():
    assert targets("web1", WEB1_MAC, 'host-port="2222" guest-port="22"') == {
        "10.0.0.20", "fd00:10::20"}


def test_an_ipv6_reservation_by_duid_only_is_someone_elses():
    """<host id='DUID'> names no domain: nobody may claim it by guest-ip."""
    line = refusal("evil", EVIL_MAC, 'host-port="2222" guest-ip="fd00:10::99"',
                   v6hosts="<host id='0:3:0:1:52:54:0:0:0:99' ip='fd00:10::99'/>")
    assert "reserved for another guest" in line


@pytest.mark.parametrize("guest", ["fd00:10::", "fd00:10::1", "FD00:0010:0000::0001",
                                   "fd00:10:0:0:0:0:0:1"])
def test_subnet_router_anycast_and_the_bridge_address_are_not_guests(guest):
    line = refusal("evil", EVIL_MAC, f'host-port="2222" guest-ip="{guest}"')
    assert "not a guest" in line


@pytest.mark.parametrize("guest", ["fd00:10::", "fd00:10::1"])
def test_a_network_forward_to_its_own_router_address_is_refused(guest):
    net = parse_network_xml(net_xml(f'host-port="2222" guest-ip="{guest}"'))
    with pytest.raises(InputError, match="not a guest"):
        resolve_network_forwards(net)


def eui64(prefix: str, mac: str) -> str:
    b = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([b[0] ^ 2]) + b[1:3] + b"\xff\xfe" + b[3:]
    return str(IPv6Address(int(IPv6Address(prefix)) | int.from_bytes(iid, "big")))


def test_a_domain_cannot_forward_to_the_slaac_address_of_another_guests_mac():
    """In IPv6 a guest's address is often not a reservation at all: SLAAC (libvirt's
    dnsmasq advertises the /64; ifupdown, Windows with privacy off, many appliances use
    EUI-64) derives it from the NIC's MAC. web1's MAC is in the network's own XML (its
    IPv4 reservation), so its EUI-64 address is as much web1's as 10.0.0.20 is."""
    victim = eui64("fd00:10::", WEB1_MAC)  # fd00:10::5054:ff:fe00:20
    line = refusal("evil", EVIL_MAC, f'host-port="2222" guest-port="22" guest-ip="{victim}"')
    assert "reserved for another guest" in line or "another guest" in line
    # evil's own SLAAC address stays its own
    assert targets("evil", EVIL_MAC, 'host-port="2222" guest-ip="'
                   + eui64("fd00:10::", EVIL_MAC) + '"') == {eui64("fd00:10::", EVIL_MAC)}


# --------------------------------------------------------------------------- families

def test_a_v6_source_list_never_opens_ipv4():
    rules = owner_rules(parse_domain_xml(dom_xml(
        "web1", WEB1_MAC, 'host-port="2222" guest-port="22" source="2001:db8::/32"')),
        {"lab": parse_network_xml(net_xml())})
    assert rules and {r.family for r in rules} == {6}


def test_dual_guest_ip_with_a_v4_host_ip_only_forwards_ipv4():
    rules = owner_rules(parse_domain_xml(dom_xml(
        "web1", WEB1_MAC, 'host-port="2222" guest-ip="10.0.0.20,fd00:10::20" '
        'host-ip="203.0.113.1"')), {"lab": parse_network_xml(net_xml())})
    assert rules and {r.family for r in rules} == {4}


@pytest.mark.parametrize("attrs", [
    'host-ip="2001:db8::1" guest-ip="10.0.0.20"',
    'host-ip="203.0.113.1" guest-ip="fd00:10::20"',
    'host-ip="203.0.113.1" source="2001:db8::/32"',
    'source="198.51.100.0/24" guest-ip="fd00:10::20"',
])
def test_host_ip_source_and_guest_ip_of_different_families_is_one_clear_refusal(attrs):
    line = refusal("web1", WEB1_MAC, f'host-port="2222" {attrs}')
    assert "no any family" not in line, line  # says which attributes disagree
    assert "family" in line and ("host-ip" in line or "source" in line), line


def test_ipv4_mapped_source_means_that_ipv4_source():
    """``ss`` shows an IPv4 peer of a dual-stack socket as ::ffff:198.51.100.7; an admin
    who copies that into source means that IPv4 host. Read as IPv6 it matched nothing
    (ip6tables never sees IPv4 packets) and closed the IPv4 side: the forward was dead,
    silently."""
    spec = parse_domain_xml(dom_xml("web1", WEB1_MAC, 'host-port="443" '
                                    'source="::ffff:198.51.100.0/120,::ffff:192.0.2.7"')
                            ).forwards[0]
    assert spec.sources == (IPv4Network("198.51.100.0/24"), IPv4Network("192.0.2.7/32"))
    assert spec.families == (4,)


def test_ipv4_mapped_host_ip_and_guest_ip_are_those_ipv4_addresses():
    spec = parse_domain_xml(dom_xml("web1", WEB1_MAC, 'host-port="443" '
                                    'host-ip="::ffff:203.0.113.1" guest-ip="::ffff:10.0.0.20"')
                            ).forwards[0]
    assert spec.host_ip == IPv4Address("203.0.113.1")
    assert spec.guest_ips == (IPv4Address("10.0.0.20"),)
    # and an IPv4-mapped loopback is loopback
    loop = parse_domain_xml(dom_xml("web1", WEB1_MAC, 'host-port="443" '
                                    'host-ip="::ffff:127.0.0.1"')).forwards[0]
    assert loop.host_ip.is_loopback


def test_one_ipv4_and_one_mapped_guest_ip_are_two_ipv4_addresses():
    with pytest.raises(InputError, match="two IPv4 addresses"):
        parse_domain_xml(dom_xml("web1", WEB1_MAC,
                                 'host-port="443" guest-ip="10.0.0.20,::ffff:10.0.0.21"'))


def specs(xml: bytes):
    return parse_domain_xml(xml).forwards


def test_a_v4_only_and_a_v6_only_forward_of_two_owners_share_a_port():
    v4 = specs(dom_xml("a", WEB1_MAC, 'host-port="8080" guest-ip="10.0.0.20"'))
    v6 = specs(dom_xml("b", DB_MAC, 'host-port="8080" guest-ip="fd00:10::30"'))
    check_conflicts("domain 'b'", v6, [("domain 'a'", v4)])
    check_conflicts("domain 'a'", v4, [("domain 'b'", v6)])
    both = specs(dom_xml("c", EVIL_MAC, 'host-port="8080"'))
    for one in (v4, v6):
        with pytest.raises(InputError, match="already forwarded"):
            check_conflicts("domain 'c'", both, [("x", one)])


def test_ipv6_rules_render_the_family_they_claim():
    """Every IPv6 rule renders IPv6 addresses only (ip6tables-restore would refuse the
    whole payload for one IPv4 address)."""
    rules = owner_rules(parse_domain_xml(dom_xml(
        "web1", WEB1_MAC, 'host-port="2222" guest-port="22" '
        'source="2001:db8::/32,198.51.100.0/24"')), {"lab": parse_network_xml(net_xml())})
    for rule in netfilter_rules(rules):
        line = render_rule(rule)[1].split(' -m comment')[0]
        for word in line.split():
            addr = word.strip("[]").split("]:")[0].split("/")[0]
            try:
                assert ip_address(addr).version == rule.family, (rule.family, line)
            except ValueError:
                pass


# --------------------------------------------------------------------------- lost silently

def test_an_ipv6_only_forward_where_ipv6_cannot_be_written_is_not_lost_silently(state_env):
    """The fake stands in for a host booted with ipv6.disable=1 (no ip6tables to write
    to): the issue wants such a host to keep working for IPv4 and to say what it left
    out. An IPv6-only forward is not applied, and the operation says so in one line."""
    from fakebackend import FakeBackend
    backend = FakeBackend(ipv6=False)
    raw = net_xml()
    ops.network_started(parse_network_xml(raw), raw, backend)
    dom = dom_xml("web1", WEB1_MAC, 'host-port="47123" guest-port="22" '
                  'guest-ip="fd00:10::20"')
    said: list[str] = []
    ops.domain_started(parse_domain_xml(dom), dom, backend, log=said.append)
    assert [line for line in said if "left out" in line] == [
        "IPv6 rules left out: IPv6 is disabled in the kernel",
        "domain 'web1': 1 forward(s), already in place (IPv6 left out)"]
    assert "47123" not in backend.save(4)


def test_a_guest_ip_inside_another_networks_subnet_is_refused():
    """libvirt refuses a network whose route already exists, not one whose subnet holds
    another's: 'wide' (fd00::/8) holds lab's fd00:10::/64. A guest on wide names web1's
    address: the kernel routes it to lab's bridge (the longer prefix), where lab's own
    rules accept it (IPv6 of a nat network is routed: everything to the subnet passes),
    and wide's reservations know nothing of web1."""
    lab, wide = parse_network_xml(net_xml()), parse_network_xml(WIDE)
    dom = parse_domain_xml(dom_xml("evil", EVIL_MAC, 'host-port="2222" guest-port="22" '
                                   'guest-ip="fd00:10::20"', network="wide"))
    with pytest.raises(InputError, match="lab"):
        resolve_domain_forwards(dom, {"lab": lab, "wide": wide})


def test_a_network_forward_into_another_networks_subnet_is_refused():
    lab, wide = parse_network_xml(net_xml()), parse_network_xml(wide_with_forward())
    with pytest.raises(InputError, match="network 'lab'"):
        resolve_network_forwards(wide, {"lab": lab})


# --------------------------------------------------------------------------- zone indexes

@pytest.mark.parametrize("attr", ['guest-ip="fd00:10::20%evil"', 'guest-ip="fd00:10::%x"',
                                  'guest-ip="fd00:10::1%virbr1"', 'host-ip="fd00:10::1%lo"',
                                  'source="2001:db8::%eth0/32"'])
def test_a_zone_index_is_refused_where_the_address_is_read(attr):
    """Python reads fd00:10::20%evil as an address unequal to fd00:10::20: the checks for
    another guest's reservation, the subnet-router anycast and the bridge's own address
    all passed, and ip6tables-restore refused the result ("Bad IP address")."""
    with pytest.raises(InputError, match="zone") as exc:
        parse_domain_xml(dom_xml("evil", EVIL_MAC, f'host-port="2222" {attr}'))
    assert "\n" not in str(exc.value)
