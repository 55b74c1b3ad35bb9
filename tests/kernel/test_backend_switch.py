"""Switching ``firewall_backend`` with guests running: ``restore`` (from our state) or
``replay`` (from libvirt's XML) with the newly selected backend puts every forward in it
and leaves nothing of the other one; packets keep reaching the guest through UFW's DROP
and libvirt's rejects all along. In a network namespace this test creates, with real
iptables and nft. Root only; CI runs them."""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from netlab import SEED, TOPOLOGY_LIBVIRT_NFT, TOPOLOGY_NET, Topology

from kvmufw_hook import backends, ops
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata

pytestmark = pytest.mark.kernel

NET = TOPOLOGY_NET
GUEST = b"""<domain><name>g5</name><metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="2222" guest-port="22"/>
    <forward proto="udp" host-port="6000-6001" guest-port="5000-5001"/>
  </forwards></metadata><devices><interface type='network'>
    <source network='lab' bridge='virbr1'/><mac address='52:54:00:00:00:05'/>
  </interface></devices></domain>"""
WORKING = {"egress": "203.0.113.1", "dnat": "203.0.113.2", "network_forward": "203.0.113.2",
           "udp_shifted": "203.0.113.2", "hairpin": "10.0.0.1"}


@pytest.fixture
def topo(netns, state_env):
    topology = Topology(netns)
    netns.run("iptables-restore", input=SEED)
    topology.inet.serve("tcp", 9000)
    topology.guests[5].serve("tcp", 22, 80)
    topology.guests[5].serve("udp", 5000, 5001)
    # libvirt's status file of the running network: restore asks it, never libvirt
    Path(state_env["KVMUFW_LIBVIRT_NETWORK_DIR"], "lab.xml").write_bytes(
        b"<networkstatus>" + NET + b"</networkstatus>")
    try:
        yield topology
    finally:
        topology.destroy()


def probes(topo) -> dict:
    g5, g6, inet = topo.guests[5], topo.guests[6], topo.inet
    return {"egress": g5.ask("tcp", "203.0.113.2", 9000),
            "dnat": inet.ask("tcp", "203.0.113.1", 2222),
            "network_forward": inet.ask("tcp", "203.0.113.1", 8080),
            "udp_shifted": inet.ask("udp", "203.0.113.1", 6001, 1.0),
            "hairpin": g6.ask("tcp", "203.0.113.1", 2222)}


def ours(topo) -> dict[str, bool]:
    """Which backend holds anything of ours in the namespace."""
    saved = topo.host.save() + topo.host.save(6)
    table = topo.host.run("nft", "list", "table", "inet", "kvmufw", check=False)
    return {"iptables": "KVMUFW" in saved, "nftables": table.returncode == 0}


def start(backend) -> None:
    net, _ = parse_hookdata(b"<hookData>" + NET + b"</hookData>")
    ops.network_started(net, NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)


@pytest.mark.parametrize("old,new", [("iptables", "nftables"), ("nftables", "iptables")])
def test_a_restore_after_a_switch_moves_every_forward_and_leaves_nothing_behind(
        topo, old, new):
    start(backends.get(old, topo.host.prefix))
    assert probes(topo) == WORKING
    assert ours(topo) == {old: True, new: False}

    done = ops.restore(backend=backends.get(new, topo.host.prefix))
    assert not done.problems
    assert ours(topo) == {old: False, new: True}
    assert probes(topo) == WORKING
    # and the new backend carries on as usual: the guest's stop takes its forwards out
    ops.domain_stopped("g5", backend=backends.get(new, topo.host.prefix))
    assert probes(topo)["dnat"] is None and probes(topo)["network_forward"] == "203.0.113.2"


@pytest.mark.parametrize("old,new", [("iptables", "nftables"), ("nftables", "iptables")])
def test_a_replay_after_a_switch_moves_every_forward_and_flush_clears_both(topo, old, new):
    start(backends.get(old, topo.host.prefix))
    done = ops.replay([NET], [GUEST], backend=backends.get(new, topo.host.prefix))
    assert not done.problems
    assert ours(topo) == {old: False, new: True}
    assert probes(topo) == WORKING
    start(backends.get(old, topo.host.prefix))  # both hold forwards: a switch half done
    ops.flush(backends.get(new, topo.host.prefix))
    assert ours(topo) == {old: False, new: False}


GUEST6 = b"""<domain><name>g6</name><metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="2223" guest-port="22"/>
  </forwards></metadata><devices><interface type='network'>
    <source network='lab' bridge='virbr1'/><mac address='52:54:00:00:00:06'/>
    <target dev='vnet6'/></interface></devices></domain>"""


def hook(topo, kind: str, *argv: str, stdin: bytes = b"") -> None:
    """The installed-style hook as libvirt calls it, in the namespace (one process)."""
    proc = subprocess.run([*topo.host.prefix, str(ROOT / "hooks" / kind), *argv], input=stdin,
                          capture_output=True, env=dict(os.environ), check=False)
    assert proc.returncode == 0 and not proc.stdout, proc.stderr.decode()


@pytest.mark.parametrize("old,new", [("iptables", "nftables"), ("nftables", "iptables")])
def test_the_next_hook_after_a_switch_moves_every_forward_first(topo, state_env, old, new):
    """No replay: the first hook call after the switch (another guest starting) finds our
    rules in the other backend, restores every owner into the selected one and clears
    the other, then does its own work."""
    start(backends.get(old, topo.host.prefix))
    Path(state_env["KVMUFW_CONFIG"]).write_text(f'firewall_backend = "{new}"\n')
    topo.guests[6].serve("tcp", 22)
    hook(topo, "qemu", "g6", "start", "begin", "-", stdin=GUEST6)
    assert ours(topo) == {old: False, new: True}
    assert probes(topo) == WORKING
    assert topo.inet.ask("tcp", "203.0.113.1", 2223) == "203.0.113.2"
    hook(topo, "qemu", "g5", "stopped", "end", "-")  # and the stop works in the new one
    assert probes(topo)["dnat"] is None
    assert topo.inet.ask("tcp", "203.0.113.1", 2223) == "203.0.113.2"


@pytest.mark.parametrize("old,new", [("iptables", "nftables"), ("nftables", "iptables")])
def test_a_switch_where_libvirt_uses_nftables_keeps_libvirts_table_passable(topo, old, new):
    """libvirt's nftables rejects: the iptables backend passes them with an accept per
    forward in libvirt's chains, the nftables backend with its glue there. After the
    switch only the new backend's rules are in libvirt's chains, and every forward passes."""
    topo.host.run("nft", "-f", "-", input=TOPOLOGY_LIBVIRT_NFT)
    start(backends.get(old, topo.host.prefix))
    assert probes(topo) == WORKING
    ops.replay([NET], [GUEST], backend=backends.get(new, topo.host.prefix))
    libvirt = topo.host.run("nft", "list", "table", "ip", "libvirt_network").stdout
    tagged = [line for line in libvirt.splitlines() if "kvmufw:" in line]
    if new == "nftables":  # one glue rule per chain, no accept per forward
        assert len(tagged) == 2 and all("g=glue" in line for line in tagged), libvirt
    else:
        assert tagged and not [line for line in tagged if "g=glue" in line], libvirt
    assert ours(topo) == {old: False, new: True}
    assert probes(topo) == WORKING
