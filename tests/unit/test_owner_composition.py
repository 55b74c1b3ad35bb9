"""An owner's rules are composed one way (``hostplan.compose``) for every operation: a
hook's event, ``replay``, ``restore``, ``plan`` and the tests all go through it, so no
check can be skipped by one path and kept by another."""

import pytest

from kvmufw_hook.errors import InputError
from kvmufw_hook.hostplan import compose, owner_rules, plan_host
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml

LAB = b"""<network><name>lab</name><forward mode='nat'/><bridge name='virbr9'/>
<ip address='10.0.0.1' prefix='24'><dhcp><range start='10.0.0.100' end='10.0.0.200'/>
<host mac='52:54:00:00:00:10' ip='10.0.0.10'/></dhcp></ip></network>"""
WEB1_MAC = "52:54:00:00:00:10"


def _domain(name: str, mac: str, forwards: str) -> bytes:
    return (f"<domain type='kvm'><name>{name}</name><devices><interface type='network'>"
            f"<mac address='{mac}'/><source network='lab'/></interface></devices>"
            "<metadata><kvmufw:forwards xmlns:kvmufw='urn:kvmufw:1'>"
            f"{forwards}</kvmufw:forwards></metadata></domain>").encode()


def _copy_of_web1():
    """A guest started with web1's MAC: its reservation, 10.0.0.10, is web1's."""
    return parse_domain_xml(_domain("copy", WEB1_MAC,
                                    '<kvmufw:forward host-port="2222" guest-port="22"/>'))


def _ports(network: str) -> list[tuple[str, str]]:
    return [(WEB1_MAC, "web1")] if network == "lab" else []


def test_a_whole_host_plan_gives_each_owner_exactly_its_composed_rules():
    lab = parse_network_xml(LAB)
    web1 = parse_domain_xml(_domain("web1", WEB1_MAC,
                                    '<kvmufw:forward host-port="2222" guest-port="22"/>'))
    planned = plan_host({"lab": lab}, {"web1": web1}, ports=lambda _n: [])
    assert planned.problems == []
    assert planned.rules == {"n=lab": owner_rules(lab, {"lab": lab}),
                             "d=web1": owner_rules(web1, {"lab": lab})}
    composed = compose(web1, {"lab": lab})
    assert composed.owner == "d=web1" and composed.label == "domain 'web1'"
    assert [str(t.guest_ip) for t in composed.targets] == ["10.0.0.10"]


def test_a_guest_with_a_copy_of_another_guests_mac_gets_no_rules_from_composing():
    networks = {"lab": parse_network_xml(LAB)}
    with pytest.raises(InputError, match="has the MAC of the port of domain 'web1'"):
        owner_rules(_copy_of_web1(), networks, _ports)


def test_a_whole_host_plan_withdraws_a_copy_of_another_guests_mac_as_events_do():
    lab = parse_network_xml(LAB)
    copy = _copy_of_web1()
    planned = plan_host({"lab": lab}, {"copy": copy}, holders={"d=copy": list(copy.forwards)},
                        ports=_ports)
    assert planned.rules["d=copy"] == ()
    assert any("has the MAC of the port of domain 'web1'" in p
               and p.endswith("(forwards withdrawn)") for p in planned.problems)
