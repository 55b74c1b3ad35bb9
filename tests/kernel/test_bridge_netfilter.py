"""Kernel tests for hosts where bridged frames go through iptables (br_netfilter, as
wherever Docker runs): a guest reaching its own forwards through the host's addresses,
and the hairpin mode that needs on its bridge port. Real iptables, real bridges, real
packets in network namespaces these tests create. Root only; CI runs them.

host: eth0 203.0.113.1/24 + 2001:db8:ff::1/64 to ``inet``; virbr1 10.0.0.1/24 +
fd00:10::1/64 (network ``lab``) with guests g5 (.5/::5, port vp10005, forwards of its
own) and g6 (.6/::6, port vp10006, none).
"""


import pytest
from bridged import G5, G5_V4_ONLY, HOST_BRIDGE, LAB
from netlab import SEED, Topology, settle

from kvmufw_hook import backends, ops, state
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata

SEED6 = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:LIBVIRT_FWI - [0:0]
:LIBVIRT_FWO - [0:0]
-A FORWARD -j LIBVIRT_FWI
-A FORWARD -j LIBVIRT_FWO
-A LIBVIRT_FWI -o virbr1 -j REJECT --reject-with icmp6-port-unreachable
-A LIBVIRT_FWO -i virbr1 -j REJECT --reject-with icmp6-port-unreachable
COMMIT
"""
# every address of the host: the uplink's and the bridge's own, in both families
HOST_ADDRESSES = ("203.0.113.1", "10.0.0.1", "2001:db8:ff::1", "fd00:10::1")
SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")


def _dual_stack(topo: Topology) -> None:
    host = topo.host
    for ns, dev, addr in ((host, "eth0", "2001:db8:ff::1/64"), (host, "virbr1", "fd00:10::1/64"),
                          (topo.inet, "eth0", "2001:db8:ff::2/64"),
                          (topo.guests[5], "eth0", "fd00:10::5/64"),
                          (topo.guests[6], "eth0", "fd00:10::6/64")):
        ns.run("ip", "addr", "add", addr, "dev", dev, "nodad")
    for n in (5, 6):
        topo.guests[n].run("ip", "-6", "route", "add", "default", "via", "fd00:10::1")
    host.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    settle((host, topo.inet, *topo.guests.values()))


@pytest.fixture
def topo(netns, state_env):
    topology = Topology(netns)
    try:
        _dual_stack(topology)
        netns.run("iptables-restore", input=SEED)
        netns.run("ip6tables-restore", input=SEED6)
        topology.guests[5].serve("tcp", 22)
        yield topology
    finally:
        topology.destroy()


def br_netfilter(topo, ipv4: bool, ipv6: bool) -> None:
    for name, on in zip(SYSCTLS, (ipv4, ipv6), strict=True):
        topo.host.run("sysctl", "-qw", f"{name}={int(on)}")


def hairpin(topo, port: str) -> bool:
    out = topo.host.run("cat", f"/sys/class/net/{port}/brport/hairpin_mode").stdout
    return out.strip() == "1"


def start(topo, guest: bytes = G5):
    backend = backends.get("iptables", prefix=topo.host.prefix)
    net, _ = parse_hookdata(LAB)
    ops.network_started(net, LAB, backend=backend)
    ops.domain_started(parse_domain_xml(guest), guest, backend=backend)
    return backend


def own_forward(topo) -> dict[str, str | None]:
    """What g5's server saw when g5 connected to its own forward through each host
    address (None: no answer)."""
    return {addr: topo.guests[5].ask("tcp", addr, 2222, 1.5) for addr in HOST_ADDRESSES}


# the hairpin masquerade: g5 seen as the bridge's own address of the family
SEEN = {"203.0.113.1": "10.0.0.1", "10.0.0.1": "10.0.0.1",
        "2001:db8:ff::1": "fd00:10::1", "fd00:10::1": "fd00:10::1"}


@pytest.mark.parametrize("ipv4,ipv6", [(True, True), (False, False), (True, False),
                                       (False, True)])
def test_a_guest_reaches_its_own_forward_through_every_host_address(topo, ipv4, ipv6):
    br_netfilter(topo, ipv4, ipv6)
    start(topo)
    assert own_forward(topo) == SEEN
    # hairpin only where the bridge would otherwise drop it, only on g5's own port
    assert hairpin(topo, "vp10005") is (ipv4 or ipv6)
    assert not hairpin(topo, "vp10006")


def test_without_hairpin_br_netfilter_loses_the_way_back(topo):
    """What the hairpin is for: the same rules, with the port's hairpin taken away."""
    br_netfilter(topo, True, True)
    start(topo)
    topo.host.run("bridge", "link", "set", "dev", "vp10005", "hairpin", "off")
    assert own_forward(topo) == dict.fromkeys(HOST_ADDRESSES)
    assert topo.guests[6].ask("tcp", "203.0.113.1", 2222) == "10.0.0.1"  # another guest


def test_hairpin_only_for_families_whose_bridged_frames_meet_iptables(topo):
    br_netfilter(topo, False, True)  # ip6tables only, and g5's forward is IPv4 only
    start(topo, G5_V4_ONLY)
    assert not hairpin(topo, "vp10005")
    assert topo.guests[5].ask("tcp", "203.0.113.1", 2222) == "10.0.0.1"


def test_a_guest_stop_takes_its_hairpin_back(topo):
    br_netfilter(topo, True, True)
    backend = start(topo)
    assert hairpin(topo, "vp10005") and state.hairpin_ports("d=g5")
    ops.domain_stopped("g5", backend=backend)
    assert not hairpin(topo, "vp10005")
    assert state.hairpin_ports("d=g5") == {}


def test_a_hairpin_someone_else_set_is_never_taken_back(topo):
    br_netfilter(topo, True, True)
    topo.host.run("bridge", "link", "set", "dev", "vp10005", "hairpin", "on")
    backend = start(topo)
    ops.domain_stopped("g5", backend=backend)
    assert hairpin(topo, "vp10005")


def test_a_reused_port_name_is_not_taken_back(topo):
    """The tap of a guest that stopped unseen becomes another interface's name: the
    record's ifindex no longer matches, and that port stays as it is."""
    br_netfilter(topo, True, True)
    backend = start(topo)
    host = topo.host
    host.run("ip", "link", "del", "vp10005")
    host.sh("""
        ip link add vp10005 type veth peer name vpother
        ip link set vp10005 master virbr1
        ip link set vp10005 up
    """)
    host.run("bridge", "link", "set", "dev", "vp10005", "hairpin", "on")
    ops.domain_stopped("g5", backend=backend)
    assert hairpin(topo, "vp10005")


def test_restore_and_reconnect_put_hairpin_back_and_flush_takes_it(topo):
    br_netfilter(topo, True, True)
    backend = start(topo)
    topo.host.run("bridge", "link", "set", "dev", "vp10005", "hairpin", "off")
    ops.restore(backend=backend)  # UFW's after.init: from our state alone
    assert hairpin(topo, "vp10005")
    topo.host.run("bridge", "link", "set", "dev", "vp10005", "hairpin", "off")
    ops.domain_started(parse_domain_xml(G5), G5, backend=backend)  # qemu reconnect
    assert hairpin(topo, "vp10005")
    assert own_forward(topo) == SEEN
    ops.flush(backend=backend)
    assert not hairpin(topo, "vp10005")
    assert state.hairpin_owners() == []


def test_replay_follows_br_netfilter_and_takes_back_what_is_no_longer_wanted(topo):
    br_netfilter(topo, False, False)
    backend = start(topo)
    assert not hairpin(topo, "vp10005")
    br_netfilter(topo, True, True)  # Docker installed later
    ops.replay([LAB], [G5], backend=backend)
    assert hairpin(topo, "vp10005")
    ops.replay([LAB], [], backend=backend)  # the guest is gone from libvirt's view
    assert not hairpin(topo, "vp10005")


def test_a_bridge_network_passes_what_crosses_the_bridge_and_nothing_routed(topo):
    """A guest on libvirt's ``<forward mode='bridge'>`` network and a machine of the LAN
    on the same host bridge: with br_netfilter on, FORWARD's DROP policy (UFW's) drops
    their frames until the network's rule accepts what merely crosses the bridge; what
    the host routes, into or out of the bridge, stays refused."""
    host = topo.host
    topo.add_bridge("br0", "10.9.0.1/24")
    guest = topo.add_guest("10.9.0.8", "br0", "10.9.0.1", 24)
    lan = topo.add_guest("10.9.0.2", "br0", "10.9.0.1", 24)
    for ns, addr in ((guest, "fd00:99::8/64"), (lan, "fd00:99::2/64")):
        ns.run("ip", "addr", "add", addr, "dev", "eth0", "nodad")
    lan.serve("tcp", 9000)
    guest.serve("tcp", 22)
    topo.inet.serve("tcp", 9000)
    br_netfilter(topo, True, True)

    def probes():
        return {"guest_to_lan": guest.ask("tcp", "10.9.0.2", 9000, 1.0),
                "lan_to_guest_v6": lan.ask("tcp", "fd00:99::8", 22, 1.0),
                "routed_out": guest.ask("tcp", "203.0.113.2", 9000, 1.0),
                "routed_in": topo.inet.ask("tcp", "10.9.0.8", 22, 1.0)}

    refused = dict.fromkeys(["guest_to_lan", "lan_to_guest_v6", "routed_out", "routed_in"])
    topo.inet.run("ip", "route", "add", "10.9.0.0/24", "via", "203.0.113.1")
    assert probes() == refused
    backend = backends.get("iptables", prefix=host.prefix)
    net, _ = parse_hookdata(HOST_BRIDGE)
    ops.network_started(net, HOST_BRIDGE, backend=backend)
    assert probes() == {**refused, "guest_to_lan": "10.9.0.8", "lan_to_guest_v6": "fd00:99::2"}
    ops.network_stopped(net, backend=backend)
    assert probes() == refused
    br_netfilter(topo, False, False)  # without it bridged frames never meet iptables
    assert probes() == {**refused, "guest_to_lan": "10.9.0.8", "lan_to_guest_v6": "fd00:99::2"}


def test_doctor_finds_a_guest_port_that_lost_its_hairpin(topo):
    from kvmufw_hook.commands.doctor_bridges import check_bridge_netfilter
    br_netfilter(topo, True, False)
    backend = start(topo)
    uri = "test:///nowhere"  # libvirt is not asked here: the hairpin check needs our state

    def levels():
        return [(f.level, f.check) for f in check_bridge_netfilter(uri, backend)]

    assert levels() == [("OK", "br_netfilter")]
    topo.host.run("bridge", "link", "set", "dev", "vp10005", "hairpin", "off")
    assert levels() == [("OK", "br_netfilter"), ("WARN", "hairpin mode")]


# Docker >= 29 with --firewall-backend=nftables: its table for the default bridge, as
# moby's own generated documentation prints it for a new daemon
# (integration/network/bridge/nftablesdoc/generated/new-daemon.md, counters left out;
# the nat priorities by number: dstnat -100, srcnat 100, which nft 1.0.6 takes in every hook)
DOCKER_NFT = """table ip docker-bridges {
  map filter-forward-in-jumps {
    type ifname : verdict
    elements = { "docker0" : jump filter-forward-in__docker0 }
  }
  map filter-forward-out-jumps {
    type ifname : verdict
    elements = { "docker0" : jump filter-forward-out__docker0 }
  }
  map nat-postrouting-in-jumps {
    type ifname : verdict
    elements = { "docker0" : jump nat-postrouting-in__docker0 }
  }
  map nat-postrouting-out-jumps {
    type ifname : verdict
    elements = { "docker0" : jump nat-postrouting-out__docker0 }
  }
  chain filter-forward-in__docker0 {
    ct state established,related accept
    iifname "docker0" accept comment "ICC"
    drop comment "UNPUBLISHED PORT DROP"
  }
  chain filter-forward-out__docker0 {
    ct state established,related accept
    accept comment "OUTGOING"
  }
  chain nat-postrouting-in__docker0 {
  }
  chain nat-postrouting-out__docker0 {
    oifname != "docker0" ip saddr 172.17.0.0/16 masquerade comment "MASQUERADE"
  }
  chain nat-prerouting-and-output {
  }
  chain filter-FORWARD {
    type filter hook forward priority filter; policy accept;
    oifname vmap @filter-forward-in-jumps
    iifname vmap @filter-forward-out-jumps
  }
  chain nat-OUTPUT {
    type nat hook output priority -100; policy accept;
    ip daddr != 127.0.0.0/8 fib daddr type local jump nat-prerouting-and-output
  }
  chain nat-POSTROUTING {
    type nat hook postrouting priority 100; policy accept;
    iifname vmap @nat-postrouting-out-jumps
    oifname vmap @nat-postrouting-in-jumps
  }
  chain nat-PREROUTING {
    type nat hook prerouting priority -100; policy accept;
    fib daddr type local jump nat-prerouting-and-output
  }
  chain raw-PREROUTING {
    type filter hook prerouting priority raw; policy accept;
  }
}
"""


def test_dockers_nftables_rules_leave_our_guests_alone_unless_their_policy_drops(topo):
    from kvmufw_hook.commands.doctor_bridges import docker_nft_finding, docker_nft_policies
    host = topo.host
    topo.add_bridge("docker0", "172.17.0.1/16")
    topo.inet.serve("tcp", 9000)
    host.run("nft", "-f", "-", input=DOCKER_NFT)
    docker_table = host.run("nft", "list", "table", "ip", "docker-bridges").stdout
    backend = start(topo)

    def probes():
        return {"egress": topo.guests[5].ask("tcp", "203.0.113.2", 9000, 1.0),
                "dnat": topo.inet.ask("tcp", "203.0.113.1", 2222, 1.0),
                "own_forward": topo.guests[5].ask("tcp", "203.0.113.1", 2222, 1.0)}

    # (a container's own traffic is Docker's business with the iptables FORWARD DROP)
    assert probes() == {"egress": "203.0.113.1", "dnat": "203.0.113.2",
                        "own_forward": "10.0.0.1"}
    assert host.run("nft", "list", "table", "ip", "docker-bridges").stdout == docker_table
    assert [f.level for f in docker_nft_finding(docker_nft_policies(backend))] == ["OK"]
    # dockerd that turned IP forwarding on itself sets its forward chain's policy to drop:
    # no iptables accept can pass that, and doctor says so with the way out
    host.run("nft", "chain", "ip", "docker-bridges", "filter-FORWARD", "{ policy drop; }")
    assert probes() == {"egress": None, "dnat": None, "own_forward": None}
    finding, = docker_nft_finding(docker_nft_policies(backend))
    assert finding.level == "FAIL" and "--ip-forward-no-drop" in finding.fix
