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
