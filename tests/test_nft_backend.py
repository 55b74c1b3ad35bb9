"""The nftables backend (``table inet kvmufw`` with maps) in a network namespace this test
creates: real ``nft``, real iptables with UFW's DROP policy and libvirt's rejects, real
packets through veth pairs. Root only; CI runs them."""

import pytest
from netlab import SEED, Topology

from kvmufw_hook import ops
from kvmufw_hook.backends.nft import GLUE_COMMENT, NftBackend
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata

LAB_NET = b"""<network><name>lab</name>
  <metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="8080" guest-port="80" guest-ip="10.0.0.5"/>
  </forwards></metadata>
  <forward mode='nat' dev='eth0'/><bridge name='virbr1'/>
  <ip address='10.0.0.1' prefix='24'><dhcp>
    <host mac='52:54:00:00:00:05' ip='10.0.0.5'/><host mac='52:54:00:00:00:06' ip='10.0.0.6'/>
  </dhcp></ip></network>"""
GUEST = b"""<domain><name>g5</name><metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="2222" guest-port="22"/>
    <forward proto="udp" host-port="6000-6002" guest-port="5000-5002"/>
    <forward proto="udp" host-port="5100-5101"/>
    <forward host-port="8443" guest-port="443" source="198.51.100.0/24"/>
  </forwards></metadata><devices><interface type='network'>
    <source network='lab' bridge='virbr1'/><mac address='52:54:00:00:00:05'/>
  </interface></devices></domain>"""


@pytest.fixture
def topo(netns):
    topology = Topology(netns)
    netns.run("iptables-restore", input=SEED)
    topology.inet.serve("tcp", 9000)
    g5 = topology.guests[5]
    g5.serve("tcp", 22, 80, 443)
    g5.serve("udp", 5000, 5001, 5002, 5100, 5101)
    try:
        yield topology
    finally:
        topology.destroy()


def probes(topo) -> dict:
    g5, g6, inet, host = topo.guests[5], topo.guests[6], topo.inet, topo.host
    return {
        "egress": g5.ask("tcp", "203.0.113.2", 9000),
        "dnat": inet.ask("tcp", "203.0.113.1", 2222),
        "network_forward": inet.ask("tcp", "203.0.113.1", 8080),
        "udp_shifted": [inet.ask("udp", "203.0.113.1", p, 1.0) for p in (6000, 6002)],
        "udp_same_range": [inet.ask("udp", "203.0.113.1", p, 1.0) for p in (5100, 5101)],
        "hairpin": g6.ask("tcp", "203.0.113.1", 2222),
        "host_local": host.ask("tcp", "203.0.113.1", 2222),
        "source_refused": inet.ask("tcp", "203.0.113.1", 8443, 1.0),
    }


def table(topo) -> str:
    return topo.host.run("nft", "list", "table", "inet", "kvmufw", check=False).stdout


def test_forwards_pass_ufw_drop_and_libvirt_rejects_through_maps_and_glue(topo, state_env):
    backend = NftBackend(prefix=topo.host.prefix)
    before = probes(topo)
    assert before["egress"] is None and before["dnat"] is None

    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)
    after = probes(topo)
    assert after == {
        "egress": "203.0.113.1",  # masqueraded behind the uplink address
        "dnat": "203.0.113.2",  # the guest sees the real client
        "network_forward": "203.0.113.2",
        "udp_shifted": ["203.0.113.2", "203.0.113.2"],  # 6000->5000, 6002->5002
        "udp_same_range": ["203.0.113.2", "203.0.113.2"],  # one interval element
        "hairpin": "10.0.0.1",  # another guest via the host address, masqueraded
        "host_local": "203.0.113.1",  # from the host itself, through nat OUTPUT
        "source_refused": None,  # 8443 only for 198.51.100.0/24
    }
    # outside our table: one glue accept at the top of INPUT and FORWARD, nothing else
    saved = topo.host.save()
    assert saved.count(GLUE_COMMENT) == 2
    assert saved.count("kvmufw") == 2

    ops.domain_stopped("g5", backend=backend)
    stopped = probes(topo)
    assert stopped["dnat"] is None and stopped["egress"] == "203.0.113.1"
    assert stopped["network_forward"] == "203.0.113.2"
    assert "d=g5" not in table(topo)
    ops.network_stopped(net, backend=backend)
    assert probes(topo) == before
