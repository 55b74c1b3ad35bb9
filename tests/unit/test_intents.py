"""The planner speaks intents, in no firewall's words; the registry gives a backend by
name; the kernel's claims are a type of their own (no rebuilt forward)."""

import dataclasses
from ipaddress import ip_address, ip_network

import pytest
from conftest import FIXTURES, SAMPLES

from kvmufw_hook import backends
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.intents import BridgeLocal, Claim, Egress, Fence, Forward, HostServices
from kvmufw_hook.model import PortRange
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml

FIREWALL_WORDS = ("ACCEPT", "DNAT", "MASQUERADE", "RETURN", "ctstate", "conntrack", "KVMUFW-",
                  "PREROUTING", "POSTROUTING", "-j ", "verdict", "stage")


def owners():
    lab = parse_network_xml((SAMPLES / "net-lab.xml").read_bytes())
    dual = parse_network_xml((FIXTURES / "net-dual.xml").read_bytes())
    nets = {lab.name: lab}
    return {"lab": owner_rules(lab), "dual": owner_rules(dual),
            "all": owner_rules(parse_domain_xml((FIXTURES / "dom-all.xml").read_bytes()),
                                     nets)}


def test_the_plan_holds_typed_frozen_intents_without_firewall_vocabulary():
    for owned in owners().values():
        assert owned
        for intent in owned:
            assert isinstance(intent, (Forward, Fence, Egress, BridgeLocal, HostServices))
            with pytest.raises(dataclasses.FrozenInstanceError):
                intent.owner = "n=other"  # type: ignore[misc]
            assert not any(word in repr(intent) for word in FIREWALL_WORDS), intent


def test_a_nat_network_is_masqueraded_egress_dhcp_dns_and_its_bridge():
    lab = owners()["lab"]
    kinds = [type(i).__name__ for i in lab if not isinstance(i, Forward) and i.family == 4]
    assert kinds == ["Egress", "BridgeLocal", "HostServices"]
    egress = next(i for i in lab if isinstance(i, Egress) and i.family == 4)
    assert egress.masquerade and egress.dev == "eth0" and egress.nat_ports == PortRange(1024, 65535)


def test_a_forward_carries_host_and_guest_ports_sources_and_its_tag():
    forwards = [i for i in owners()["all"] if isinstance(i, Forward)]
    assert forwards and all(f.owner.startswith("d=") for f in forwards)
    limited = [f for f in forwards if f.sources]
    assert limited and all(s.version == f.family for f in limited for s in f.sources)
    assert all(f.tag.subnet == str(f.subnet) for f in forwards)


def test_a_claim_is_its_own_type_with_the_family_of_its_guest():
    claim = Claim("tcp", PortRange(2222, 2222), ip_address("fd00::5"))
    assert claim.families == (6,) and claim.guest_ips == (ip_address("fd00::5"),)
    assert not hasattr(claim, "guest_port")
    assert Claim("udp", PortRange(53, 53), host_ip=ip_address("192.0.2.1")).families == (4,)
    assert Claim("udp", PortRange(53, 53)).families == (4, 6)
    assert Claim("tcp", PortRange(80, 81), None, ip_address("2001:db8::1")).label == \
        "forward tcp [2001:db8::1]:80-81"


def test_the_registry_gives_each_backend_by_its_name():
    assert "iptables" in backends.names()
    backend = backends.get("iptables", prefix=["ip", "netns", "exec", "x"])
    assert backend.name == "iptables" and list(backend.prefix) == ["ip", "netns", "exec", "x"]
    assert backends.default_backend().name == backends.DEFAULT
    with pytest.raises(KeyError):
        backends.get("no-such-backend")


def test_a_fence_names_the_other_bridges_not_rules():
    fence = Fence("n=lab", 4, "virbr1", ip_network("10.0.0.0/24"), others=("virbr2",))
    assert fence.tag.owner == "n=lab" and fence.tag.subnet == "10.0.0.0/24"
    assert BridgeLocal("n=br", 6, "br0", None, bridged=True).tag.subnet == "-"
