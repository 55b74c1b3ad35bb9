"""The host policy, pure: who may have which forward, from facts given as data."""

import re
import time

import pytest

from kvmufw_hook.errors import InputError
from kvmufw_hook.parse import MAX_RULES, MAX_SOURCES, parse_domain_xml


def domain(forwards: str, name: str = "web1", nics: str = "") -> bytes:
    nics = nics or ("<interface type='network'><mac address='52:54:00:00:00:10'/>"
                    "<source network='lab'/></interface>")
    return (f"<domain type='kvm'><name>{name}</name><devices>{nics}</devices>"
            "<metadata><kvmufw:forwards xmlns:kvmufw='urn:kvmufw:1'>"
            f"{forwards}</kvmufw:forwards></metadata></domain>").encode()


# --------------------------------------------------------------------------- sources

@pytest.mark.parametrize("source,meant", [("198.51.100.7/3", "198.51.100.7/32"),
                                          ("2001:db8::7/32", "2001:db8::7/128")])
def test_a_cidr_with_host_bits_set_is_an_error_not_a_wider_network(source, meant):
    with pytest.raises(InputError, match=f"'{source}' has host bits set: {meant} or"):
        parse_domain_xml(domain(f'<kvmufw:forward host-port="22" source="{source}"/>'))


def test_a_cidr_without_host_bits_and_a_plain_address_are_kept():
    dom = parse_domain_xml(domain('<kvmufw:forward host-port="22" '
                                  'source="198.51.100.0/24,192.0.2.7,2001:db8::/32"/>'))
    assert [str(s) for s in dom.forwards[0].sources] == [
        "198.51.100.0/24", "192.0.2.7/32", "2001:db8::/32"]


def test_more_sources_than_the_cap_are_refused_in_one_line_before_any_parsing():
    many = ",".join(f"10.{i // 256}.{i % 256}.1" for i in range(MAX_SOURCES + 1))
    with pytest.raises(InputError, match=f"more than {MAX_SOURCES} sources") as err:
        parse_domain_xml(domain(f'<kvmufw:forward host-port="22" source="{many}"/>'))
    assert "\n" not in str(err.value)


def test_sources_at_the_cap_are_parsed_in_linear_time():
    """De-duplication was quadratic: a list searched once per source."""
    many = ",".join(f"10.{i // 256}.{i % 256}.1" for i in range(MAX_SOURCES))
    started = time.perf_counter()
    dom = parse_domain_xml(domain(f'<kvmufw:forward host-port="22" source="{many}"/>'))
    assert len(dom.forwards[0].sources) == MAX_SOURCES
    assert time.perf_counter() - started < 0.5


def test_an_owner_whose_forwards_need_too_many_rules_is_refused_in_one_line():
    sources = ",".join(f"10.0.{i // 256}.{i % 256}" for i in range(MAX_SOURCES - 1))
    count = MAX_RULES // (2 * (MAX_SOURCES - 1) + 3) + 1
    forwards = "".join(f'<kvmufw:forward host-port="{1000 + i}" source="{sources}"/>'
                       for i in range(count))
    with pytest.raises(InputError, match=f"more than {MAX_RULES} rules") as err:
        parse_domain_xml(domain(forwards))
    assert "\n" not in str(err.value) and str(err.value).startswith("domain 'web1'")


# --------------------------------------------------------------------------- host services

def _login_defs(tmp_path, text: str) -> str:
    path = tmp_path / "login.defs"
    path.write_text(text)
    return str(path)


def test_uid_range_of_people_is_read_from_login_defs(tmp_path):
    from kvmufw_hook.host import read_user_uids
    path = _login_defs(tmp_path, "# comment\nUID_MIN\t\t 2000\nUID_MAX 29999\nGID_MAX 1\n")
    assert read_user_uids(path) == (2000, 29999)
    assert read_user_uids(str(tmp_path / "missing")) == (1000, 60000)


@pytest.mark.parametrize("uid,account", [(64055, "Ubuntu's libvirt-qemu"),
                                         (61184, "a systemd DynamicUser"),
                                         (65534, "nobody"), (999, "a system account")])
def test_a_socket_of_a_system_account_above_uid_max_is_a_host_service(uid, account):
    from ipaddress import IPv4Address

    from kvmufw_hook.host import HostFacts, Listener
    from kvmufw_hook.model import ForwardSpec, PortRange
    vnc = Listener("tcp", IPv4Address("0.0.0.0"), 5900, 1, uid=uid)
    facts = HostFacts(frozenset({IPv4Address("203.0.113.1")}), (vnc,), users=(1000, 60000))
    spec = ForwardSpec(proto="tcp", host_port=PortRange(5900, 5900),
                       guest_port=PortRange(5900, 5900))
    with pytest.raises(InputError, match="host port 5900/tcp is used by a host service"):
        facts.check("domain 'web1': forward #1", spec)
    person = Listener("tcp", IPv4Address("0.0.0.0"), 5900, 1, uid=1001)
    HostFacts(facts.local, (person,), users=(1000, 60000)).check("x", spec)  # a person's


# --------------------------------------------------------------------------- configuration

def test_the_configuration_file_reads_libvirt_conf_syntax(tmp_path):
    from kvmufw_hook import config
    path = tmp_path / "kvmufw_hook.conf"
    path.write_text('# root\'s\nfirewall_backend = "iptables"  # the default\n'
                    'allow_host_service = [\n  "domain:web1:tcp:22",  # sshd\n'
                    '  "network:my:net:udp:5000-5010",\n]\n')
    conf = config.load(str(path))
    assert conf.firewall_backend == "iptables"
    assert conf.consents("d=web1", "tcp", 22) and not conf.consents("d=web1", "udp", 22)
    assert conf.consents("n=my~3anet", "udp", 5005) and not conf.consents("d=web2", "tcp", 22)
    assert not config.load(str(tmp_path / "missing")).allow_host_service


def test_the_configuration_selects_the_nftables_backend(tmp_path):
    from kvmufw_hook import config
    path = tmp_path / "kvmufw_hook.conf"
    path.write_text('firewall_backend = "nftables"\n')
    assert config.load(str(path)).firewall_backend == "nftables"
    assert config.load(str(tmp_path / "missing")).firewall_backend == "iptables"


@pytest.mark.parametrize("text,line,reason", [
    ('colour = "red"\n', 1, "unknown key 'colour'"),
    ('\n\nfirewall_backend = iptables\n', 3, "is not a quoted string"),
    ('firewall_backend = "nftables\\"\n', 1, "is not a quoted string"),
    ('firewall_backend = "nft"ables"\n', 1, "is not a quoted string"),
    ('firewall_backend = "\n', 1, "is not a quoted string"),
    ('2nd_backend = "iptables"\n', 1, 'not key = "value"'),
    ('firewall-backend = "iptables"\n', 1, 'not key = "value"'),
    ('fïrewall_backend = "iptables"\n', 1, 'not key = "value"'),
    ('allow_host_service = [ "domain:web1:tcp:22-23-24" ]\n', 1, "is not a port or range"),
    ('allow_host_service = [ "domain:web1:tcp:\u0662\u0662" ]\n', 1, "is not a port or range"),
    ('allow_host_service = [ "domain:web1:tcp:222222" ]\n', 1, "is not a port or range"),
    ('allow_host_service = [ "domain:web1:tcp:-22" ]\n', 1, "is not a port or range"),
    ('firewall_backend = "pf"\n', 1, "'pf' is not one of"),
    ('allow_host_service = [ "web1:tcp:22" ]\n', 1, "not KIND:NAME:PROTO:PORTS"),
    ('allow_host_service = [ "domain:web1:icmp:22" ]\n', 1, "is not tcp or udp"),
    ('allow_host_service = [ "domain:web1:tcp:22-2" ]\n', 1, "not a range within 1-65535"),
    ('allow_host_service = [ "domain:web1:tcp:22"\n', 1, "must end with ']'"),
    ('firewall_backend\n', 1, 'not key = "value"'),
])
def test_a_wrong_configuration_is_one_line_naming_file_and_line(tmp_path, text, line, reason):
    from kvmufw_hook import config
    path = tmp_path / "kvmufw_hook.conf"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        config.load(str(path))
    assert str(err.value).startswith(f"{path}: line {line}: ") and reason in str(err.value)
    assert "\n" not in str(err.value)


def _service_facts(port: int, proto: str = "tcp"):
    from ipaddress import IPv4Address

    from kvmufw_hook.host import HostFacts, Listener
    return HostFacts(frozenset({IPv4Address("203.0.113.1")}),
                     (Listener(proto, IPv4Address("0.0.0.0"), port, 1, uid=0),))


def test_allow_host_service_in_xml_alone_takes_no_host_service_port():
    from kvmufw_hook import config, policy
    dom = parse_domain_xml(domain('<kvmufw:forward host-port="22" guest-port="22" '
                                  'allow-host-service="yes"/>'))
    facts = _service_facts(22)
    with pytest.raises(InputError, match='allow_host_service = \\[ "domain:web1:tcp:22" \\]'):
        policy.check_host("domain 'web1'", "d=web1", dom.forwards, facts, {})
    facts.config = config.parse('allow_host_service = [ "domain:web2:tcp:22" ]')
    with pytest.raises(InputError, match="used by a host service"):  # another owner's
        policy.check_host("domain 'web1'", "d=web1", dom.forwards, facts, {})
    facts.config = config.parse('allow_host_service = [ "domain:web1:tcp:20-30" ]')
    policy.check_host("domain 'web1'", "d=web1", dom.forwards, facts, {})


@pytest.mark.parametrize("forward", [
    '<kvmufw:forward proto="udp" host-port="53"/>',
    '<kvmufw:forward proto="tcp" host-port="50-60"/>',
    '<kvmufw:forward proto="udp" host-port="67"/>',
    '<kvmufw:forward proto="udp" host-port="547" host-ip="fd00:10::1"/>',
    '<kvmufw:forward proto="udp" host-port="53" host-ip="10.0.0.1"/>',
])
def test_no_forward_takes_libvirts_own_dns_or_dhcp_on_a_bridge_address(forward):
    from kvmufw_hook import config, policy
    from kvmufw_hook.parse import parse_network_xml
    lab = parse_network_xml(LAB)
    dom = parse_domain_xml(domain(forward))
    facts = _service_facts(1)
    facts.config = config.parse('allow_host_service = [ "domain:web1:udp:1-65535", '
                                '"domain:web1:tcp:1-65535" ]')  # not even root grants it
    with pytest.raises(InputError, match="is libvirt's own DNS/DHCP on"):
        policy.check_host("domain 'web1'", "d=web1", dom.forwards, facts, {"lab": lab})


def test_dns_on_a_host_address_that_is_no_bridges_is_a_port_like_any_other():
    from kvmufw_hook import policy
    from kvmufw_hook.parse import parse_network_xml
    dom = parse_domain_xml(domain('<kvmufw:forward proto="udp" host-port="53" '
                                  'host-ip="203.0.113.1"/>'))
    policy.check_host("domain 'web1'", "d=web1", dom.forwards, _service_facts(1),
                      {"lab": parse_network_xml(LAB)})


LAB = b"""<network><name>lab</name><forward mode='nat'/><bridge name='virbr9'/>
<ip address='10.0.0.1' prefix='24'><dhcp><range start='10.0.0.100' end='10.0.0.200'/>
<host mac='52:54:00:00:00:10' ip='10.0.0.10'/></dhcp></ip>
<ip family='ipv6' address='fd00:10::1' prefix='64'/></network>"""


# --------------------------------------------------------------------------- own addresses

DEFAULT = b"""<network><name>default</name><forward mode='nat'/><bridge name='virbr8'/>
<ip address='192.168.122.1' prefix='24'><dhcp><range start='192.168.122.2'
end='192.168.122.254'/></dhcp></ip></network>"""
VICTIM_MAC = "52:54:00:00:00:10"
NIC = "<interface type='{kind}'><mac address='{mac}'/><source {kind}='{where}'/></interface>"


def _networks():
    from kvmufw_hook.parse import parse_network_xml
    return {"lab": parse_network_xml(LAB), "default": parse_network_xml(DEFAULT)}


def _attacker(second: str, forward: str = 'host-port="2222" guest-port="22" '
                                          'guest-ip="10.0.0.10"'):
    nics = NIC.format(kind="network", mac="52:54:00:00:00:66", where="lab") + second
    return parse_domain_xml(domain(f"<kvmufw:forward {forward}/>", "evil", nics))


@pytest.mark.parametrize("second", [
    NIC.format(kind="network", mac=VICTIM_MAC, where="default"),
    NIC.format(kind="bridge", mac=VICTIM_MAC, where="br-unmanaged"),
])
def test_a_second_nic_with_anothers_mac_elsewhere_does_not_make_its_reservation_own(second):
    from kvmufw_hook import policy
    with pytest.raises(InputError, match="10.0.0.10 is reserved for another guest"):
        policy.resolve_domain(_attacker(second), _networks(), lambda _n: [])


def test_a_reservation_through_a_nic_on_that_network_is_own():
    from kvmufw_hook import policy
    web1 = parse_domain_xml(domain('<kvmufw:forward host-port="2222" guest-port="22" '
                                   'guest-ip="10.0.0.10"/>'))
    (target,) = policy.resolve_domain(web1, _networks(), lambda _n: [])
    assert str(target.guest_ip) == "10.0.0.10"


def test_an_address_dnsmasq_leased_to_another_guest_is_not_a_forwards_target():
    from ipaddress import ip_address

    from kvmufw_hook import policy
    evil = parse_domain_xml(domain('<kvmufw:forward host-port="2222" guest-port="22" '
                                   'guest-ip="192.168.122.57"/>', "evil", NIC.format(
                                       kind="network", mac="52:54:00:00:00:66",
                                       where="default")))
    leases = {"default": [(ip_address("192.168.122.57"), VICTIM_MAC),
                          (ip_address("192.168.122.66"), "52:54:00:00:00:66")]}
    with pytest.raises(InputError, match="192.168.122.57 on network 'default' is another "
                                         "guest's \\(leased by dnsmasq to MAC 52:54"):
        policy.resolve_domain(evil, _networks(), lambda _n: [],
                              lambda net: leases.get(net.name, ()))
    own = parse_domain_xml(domain('<kvmufw:forward host-port="2222" guest-port="22" '
                                  'guest-ip="192.168.122.66"/>', "evil", NIC.format(
                                      kind="network", mac="52:54:00:00:00:66",
                                      where="default")))
    policy.resolve_domain(own, _networks(), lambda _n: [], lambda net: leases.get(net.name, ()))


def test_the_slaac_address_of_another_guests_port_is_not_a_forwards_target():
    from kvmufw_hook import policy
    from kvmufw_hook.parse import parse_network_xml
    from kvmufw_hook.plan import eui64_address
    victim_mac = "52:54:00:00:00:77"  # no reservation anywhere: only its port says it
    slaac = eui64_address(parse_network_xml(LAB).subnets[1], victim_mac)
    evil = _attacker("", f'host-port="2222" guest-port="22" guest-ip="{slaac}"')
    ports = {"lab": [(victim_mac, "victim"), ("52:54:00:00:00:66", "evil")]}
    with pytest.raises(InputError, match="the SLAAC address of domain 'victim'"):
        policy.resolve_domain(evil, _networks(), lambda n: ports.get(n, []))


STATIC_MAC = "52:54:00:00:00:77"  # a guest with static addresses: no reservation, no lease


def _neighbours(*entries: tuple[str, str]):
    """``policy.Neighbours`` of a host whose table on lab's bridge has ``entries``, and
    the networks it was asked for."""
    from ipaddress import ip_address
    asked: list[str] = []

    def on(net):
        asked.append(net.name)
        return [(ip_address(a), m) for a, m in entries] if net.bridge == "virbr9" else []
    return on, asked


@pytest.mark.parametrize("address", ["10.0.0.77", "fd00:10::a8b1:c2ff:fe00:77"])
def test_an_address_the_neighbour_table_has_at_another_guests_port_is_not_a_target(address):
    """A static IPv4 address, or a stable-privacy IPv6 one (not the EUI-64 of the MAC):
    only the host's neighbour table ties it to the MAC, and libvirt's port to a guest."""
    from kvmufw_hook import policy
    evil = _attacker("", f'host-port="2222" guest-port="22" guest-ip="{address}"')
    ports = {"lab": [(STATIC_MAC, "victim"), ("52:54:00:00:00:66", "evil")]}
    neighbours, _ = _neighbours((address, STATIC_MAC))
    with pytest.raises(InputError, match=re.escape(
            f"domain 'evil': forward tcp 2222->22: guest {address} on network 'lab' is "
            "another guest's (the host's neighbour table has it at MAC "
            f"{STATIC_MAC}, the MAC of domain 'victim''s port)")) as err:
        policy.resolve_domain(evil, _networks(), lambda n: ports.get(n, []),
                              policy.no_leases, neighbours)
    assert "\n" not in str(err.value)


def test_an_address_the_neighbour_table_has_at_the_guests_own_mac_is_its_own():
    from kvmufw_hook import policy
    own = _attacker("", 'host-port="2222" guest-port="22" guest-ip="10.0.0.66"')
    ports = {"lab": [(STATIC_MAC, "victim"), ("52:54:00:00:00:66", "evil")]}
    neighbours, _ = _neighbours(("10.0.0.66", "52:54:00:00:00:66"),
                                ("10.0.0.77", STATIC_MAC))
    (target,) = policy.resolve_domain(own, _networks(), lambda n: ports.get(n, []),
                                      policy.no_leases, neighbours)
    assert str(target.guest_ip) == "10.0.0.66"


def test_a_neighbour_entry_decides_by_the_current_owner_of_its_mac():
    """A stale entry: 10.0.0.77 was last seen at a MAC whose port is now ``evil``'s own
    (its MAC moved), or at a MAC no port has (that guest is gone): nobody else's, as
    without the table; a MAC whose port is another's now makes the address that one's."""
    from kvmufw_hook import policy
    evil = _attacker("", 'host-port="2222" guest-port="22" guest-ip="10.0.0.77"')
    neighbours, _ = _neighbours(("10.0.0.77", STATIC_MAC))
    for ports in ([(STATIC_MAC, "evil")], [("52:54:00:00:00:99", "victim")]):
        policy.resolve_domain(evil, _networks(), lambda n, p=ports: p if n == "lab" else [],
                              policy.no_leases, neighbours)
    with pytest.raises(InputError, match="the MAC of domain 'web2''s port"):
        policy.resolve_domain(evil, _networks(),
                              lambda n: [(STATIC_MAC, "web2")] if n == "lab" else [],
                              policy.no_leases, neighbours)


def test_a_guest_answering_for_anothers_reserved_or_leased_address_takes_nothing_from_it():
    """``squatter`` answers ARP for web1's reservation (10.0.0.10) and its lease
    (10.0.0.150), and neighbour solicitations for the SLAAC address of web1's MAC: root's
    reservation, dnsmasq's lease and web1's port still say they are web1's, and its
    forwards stay (else any guest could withdraw its neighbours' forwards)."""
    from ipaddress import ip_address

    from kvmufw_hook import policy
    from kvmufw_hook.plan import eui64_address
    slaac = str(eui64_address(_networks()["lab"].subnets[1], VICTIM_MAC))
    web1 = parse_domain_xml(domain('<kvmufw:forward host-port="2222" guest-port="22"/>'
                                   '<kvmufw:forward host-port="2223" guest-port="22" '
                                   'guest-ip="10.0.0.150"/><kvmufw:forward '
                                   f'host-port="2224" guest-port="22" guest-ip="{slaac}"/>'))
    ports = {"lab": [(STATIC_MAC, "squatter"), (VICTIM_MAC, "web1")]}
    neighbours, asked = _neighbours(("10.0.0.10", STATIC_MAC), ("10.0.0.150", STATIC_MAC),
                                    (slaac, STATIC_MAC))
    leases = {"lab": [(ip_address("10.0.0.150"), VICTIM_MAC)]}
    targets = policy.resolve_domain(web1, _networks(), lambda n: ports.get(n, []),
                                    lambda net: leases.get(net.name, ()), neighbours)
    assert [str(t.guest_ip) for t in targets] == ["10.0.0.10", "10.0.0.150", slaac]
    assert asked == ["lab"]


def test_the_neighbour_table_is_not_read_where_no_other_guest_has_a_port():
    """A guest alone on its network (or with no forwards) costs no read of the table."""
    from kvmufw_hook import policy
    evil = _attacker("", 'host-port="2222" guest-port="22" guest-ip="10.0.0.77"')
    neighbours, asked = _neighbours(("10.0.0.77", STATIC_MAC))
    policy.resolve_domain(evil, _networks(),
                          lambda n: [("52:54:00:00:00:66", "evil")] if n == "lab" else [],
                          policy.no_leases, neighbours)
    policy.resolve_domain(parse_domain_xml(domain("", "quiet")), _networks(),
                          lambda n: [(STATIC_MAC, "victim")], policy.no_leases, neighbours)
    assert asked == []


def test_a_recheck_withdraws_a_forward_to_an_address_the_neighbour_table_gives_another():
    """replay/restore (``plan_host``): the forward of ``evil`` it holds in the kernel to
    10.0.0.77 goes once the table has that address at ``victim``'s port's MAC."""
    from kvmufw_hook.hostplan import plan_host
    evil = _attacker("", 'host-port="2222" guest-port="22" guest-ip="10.0.0.77"')
    ports = {"lab": [(STATIC_MAC, "victim"), ("52:54:00:00:00:66", "evil")]}
    neighbours, _ = _neighbours(("10.0.0.77", STATIC_MAC))
    planned = plan_host(_networks(), {"evil": evil}, ports=lambda n: ports.get(n, []))
    assert planned.rules["d=evil"] and not planned.problems
    planned = plan_host(_networks(), {"evil": evil}, ports=lambda n: ports.get(n, []),
                        neighbours=neighbours)
    assert planned.rules["d=evil"] == ()
    assert planned.problems == ["domain 'evil': forward tcp 2222->22: guest 10.0.0.77 on "
                                "network 'lab' is another guest's (the host's neighbour "
                                f"table has it at MAC {STATIC_MAC}, the MAC of domain "
                                "'victim''s port); a domain forwards only to its own "
                                "addresses"]


def test_the_leases_file_of_libvirts_dnsmasq_is_read(tmp_path):
    from ipaddress import ip_address

    from kvmufw_hook.host import read_leases
    (tmp_path / "virbr8.status").write_text(
        '[{"ip-address": "192.168.122.57", "mac-address": "52:54:00:AA:00:10", '
        '"hostname": "v", "expiry-time": 1}, {"ip-address": "fd00::5", "iaid": "1", '
        '"client-id": "00", "expiry-time": 1}, {"bad": 1}]')
    assert read_leases("virbr8", str(tmp_path)) == (
        (ip_address("192.168.122.57"), "52:54:00:aa:00:10"), (ip_address("fd00::5"), None))
    assert read_leases("virbr9", str(tmp_path)) == ()


@pytest.mark.parametrize("client_id", ["00:01:00:01:2c:8f:11:22:52:54:00:00:00:66",
                                       "00:03:00:01:52:54:00:00:00:66"])
def test_a_dhcpv6_lease_whose_duid_holds_the_guests_mac_is_its_own(client_id):
    """DUID-LLT and DUID-LL of the guest's own NIC: it may forward to its lease."""
    evil = _attacker("", 'host-port="2222" guest-port="22" guest-ip="fd00:10::77"')
    from ipaddress import ip_address

    from kvmufw_hook import policy
    from kvmufw_hook.host import duid_mac
    leases = [(ip_address("fd00:10::77"), duid_mac(client_id))]
    assert policy.resolve_domain(evil, _networks(), lambda _n: [], lambda _n: leases)


def test_a_dhcpv6_lease_whose_duid_names_no_mac_is_not_the_guests():
    """A DUID-EN (or a DUID-UUID): nothing ties the lease to this guest's NIC, so it
    counts as another guest's."""
    from ipaddress import ip_address

    from kvmufw_hook import policy
    from kvmufw_hook.host import duid_mac
    evil = _attacker("", 'host-port="2222" guest-port="22" guest-ip="fd00:10::77"')
    leases = [(ip_address("fd00:10::77"), duid_mac("00:02:00:00:ab:11:01:02:03:04"))]
    with pytest.raises(InputError, match="names no MAC of this guest"):
        policy.resolve_domain(evil, _networks(), lambda _n: [], lambda _n: leases)


# --------------------------------------------------------------------------- fail closed

def test_a_recheck_withdraws_a_forward_to_an_address_now_reserved_for_another_guest():
    """replay/restore: the tenant's DNAT to 10.0.0.50 goes once 10.0.0.50 is reserved
    for a new guest; a forward whose port another owner holds keeps the rules it has
    (none: ``late``'s 8080 was never applied), and nothing of a forward its XML no
    longer declares (``late``'s 9090) stays."""
    from kvmufw_hook.hostplan import plan_host
    from kvmufw_hook.parse import parse_network_xml
    lab = parse_network_xml(LAB.replace(b"</dhcp>", b"<host mac='52:54:00:00:00:50' "
                                                    b"ip='10.0.0.50'/></dhcp>"))
    tenant = parse_domain_xml(domain('<kvmufw:forward host-port="2222" guest-port="22" '
                                     'guest-ip="10.0.0.50"/>', "tenant"))
    holder = parse_domain_xml(domain('<kvmufw:forward host-port="8080"/>', "holder"))
    late = parse_domain_xml(domain('<kvmufw:forward host-port="8080"/>', "late"))
    held = {"d=tenant": list(tenant.forwards), "d=holder": list(holder.forwards),
            "d=late": list(parse_domain_xml(domain('<kvmufw:forward host-port="9090"/>',
                                                   "late")).forwards)}
    planned = plan_host({"lab": lab}, {"tenant": tenant, "holder": holder, "late": late},
                        holders=held, ports=lambda _n: [])
    assert planned.rules["d=tenant"] == ()  # withdrawn
    assert "d=tenant" not in planned.failed
    assert any("10.0.0.50 is reserved for another guest" in p and "(forwards withdrawn)" in p
               for p in planned.problems)
    assert "d=late" not in planned.failed and planned.rules["d=late"] == ()
    assert any("domain 'late'" in p and "8080" in p for p in planned.problems)


# --------------------------------------------------------------------------- events (in memory)

@pytest.fixture
def fake(monkeypatch, state_env):
    """iptables in memory (tests/support/fakebackend.py) and a host with no services."""
    from ipaddress import IPv4Address

    from fakebackend import FakeBackend

    from kvmufw_hook import host
    facts = host.HostFacts(frozenset({IPv4Address("203.0.113.1")}), ())
    monkeypatch.setattr(host.HostFacts, "read", classmethod(lambda cls, prefix=(): facts))
    return FakeBackend()


def _owners(backend) -> set[str]:
    return {l.split("kvmufw:")[1].split(",")[0] for l in backend.save().splitlines()
            if "kvmufw:" in l}


def _net_hook(raw: bytes, backend, port=None, deleted=False, log=None):
    """port-created (port), port-deleted (port, deleted) or updated (no port)."""
    from kvmufw_hook import ops
    from kvmufw_hook.parse import parse_network_xml
    return ops.network_port(parse_network_xml(raw), raw, port, deleted, backend=backend,
                            log=log or (lambda _m: None))


def test_updated_withdraws_a_forward_to_an_address_newly_reserved_for_another_guest(fake):
    from kvmufw_hook import ops
    from kvmufw_hook.parse import parse_network_xml
    ops.network_started(parse_network_xml(LAB), LAB, backend=fake)
    tenant = domain('<kvmufw:forward host-port="2222" guest-port="22" guest-ip="10.0.0.50"/>',
                    "tenant")
    ops.domain_started(parse_domain_xml(tenant), tenant, backend=fake)
    assert "d=tenant" in _owners(fake)
    reserved = LAB.replace(b"</dhcp>", b"<host mac='52:54:00:00:00:50' ip='10.0.0.50'/></dhcp>")
    logs: list[str] = []
    _net_hook(reserved, fake, log=logs.append)
    assert "d=tenant" not in _owners(fake)
    assert any(l.startswith("forwards withdrawn: domain 'tenant'") and "10.0.0.50" in l
               for l in logs), logs


def test_a_copy_of_a_mac_strips_the_incumbent_only_while_the_copy_runs(fake):
    from kvmufw_hook import ops
    from kvmufw_hook.model import NetworkPort
    from kvmufw_hook.parse import parse_network_xml
    ops.network_started(parse_network_xml(LAB), LAB, backend=fake)
    _net_hook(LAB, fake, NetworkPort("web1", None, VICTIM_MAC, "virbr9"))
    web1 = domain('<kvmufw:forward host-port="2222" guest-port="22"/>')
    ops.domain_started(parse_domain_xml(web1), web1, backend=fake)
    assert "d=web1" in _owners(fake)
    copy = NetworkPort("copy", None, VICTIM_MAC, "virbr9")
    _net_hook(LAB, fake, copy)  # a guest with no metadata and the victim's MAC starts
    assert "d=web1" not in _owners(fake)  # ambiguous: its reservation may be the copy's
    _net_hook(LAB, fake, copy, deleted=True)  # the copy stops
    assert "d=web1" in _owners(fake)  # the incumbent's forwards are back


def test_a_wrong_configuration_refuses_in_one_line_and_takes_no_rules_away(fake, state_env):
    from kvmufw_hook import ops
    from kvmufw_hook.errors import ConfigError
    from kvmufw_hook.parse import parse_network_xml
    ops.network_started(parse_network_xml(LAB), LAB, backend=fake)
    web1 = domain('<kvmufw:forward host-port="2222" guest-port="22"/>')
    ops.domain_started(parse_domain_xml(web1), web1, backend=fake)
    before = fake.save()
    with open(state_env["KVMUFW_CONFIG"], "w") as fh:
        fh.write('allow_host_service = "web1"\n')
    with pytest.raises(ConfigError, match=r"kvmufw_hook.conf: line 1: allow_host_service"):
        ops.domain_started(parse_domain_xml(web1), web1, backend=fake)  # reconnect
    assert fake.save() == before
    assert ops.restore(backend=fake).problems  # restore still puts rules back, and says
