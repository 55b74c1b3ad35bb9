"""The host policy, pure: who may have which forward, from facts given as data."""

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


@pytest.mark.parametrize("text,line,reason", [
    ('colour = "red"\n', 1, "unknown key 'colour'"),
    ('\n\nfirewall_backend = iptables\n', 3, "is not a quoted string"),
    ('firewall_backend = "nftables"\n', 1, 'firewall_backend "nftables" is not supported yet'),
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
