"""Kernel tests: real iptables-restore in a network namespace this test creates, and
real packets through veth pairs. Root only; CI runs them."""

import pytest
from breaking import BreaksNat
from conftest import FIXTURES, SAMPLES
from netlab import SEED, TOPOLOGY_NET, Topology

from kvmufw_hook.backends.iptables import (
    IptablesBackend,
    Snapshot,
    as_rules,
    compose,
    split_by_family,
)
from kvmufw_hook.cli import main
from kvmufw_hook.errors import ApplyError
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.ops import apply_rules
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml

LAB = parse_network_xml((SAMPLES / "net-lab.xml").read_bytes())
DEFAULT = parse_network_xml((SAMPLES / "02-network.default.port-created.xml").read_bytes())
WEB1 = parse_domain_xml((SAMPLES / "dom-web1.xml").read_bytes())
APP2 = parse_domain_xml((FIXTURES / "dom-all.xml").read_bytes())
NETS = {"lab": LAB, "default": DEFAULT}


def everything():
    return {"n=lab": owner_rules(LAB), "n=default": owner_rules(DEFAULT),
            "d=web1": owner_rules(WEB1, NETS)}


def ours(save: str) -> list[str]:
    return [l for l in save.splitlines() if "KVMUFW" in l]


def foreign(save: str) -> list[str]:
    return [l for l in save.splitlines() if "KVMUFW" not in l]


def test_plan_output_passes_iptables_restore_test(netns, capsys, tmp_path):
    assert main(["plan", str(SAMPLES / "net-lab.xml"), str(SAMPLES / "dom-web1.xml")]) == 0
    v4, v6 = capsys.readouterr().out.split("# ip6tables-restore\n")  # lab is dual-stack
    for tool, payload in (("iptables-restore", v4), ("ip6tables-restore", v6)):
        proc = netns.run(tool, "--test", "--noflush", "-w", input=payload, check=False)
        assert proc.returncode == 0, (tool, proc.stderr)


def test_rendered_rules_read_back_byte_identical(netns):
    backend = IptablesBackend(prefix=netns.prefix)
    rules = everything()
    rules["d=app2"] = owner_rules(APP2, NETS)
    apply_rules(rules, backend=backend)
    ruleset = backend.read()
    for family, owned in split_by_family(as_rules(rules)).items():  # IPv6 too: lab has fd00:10::/64
        assert ruleset[family].ours() == compose(Snapshot.parse(""), owned), family
    snap = ruleset[4]
    wanted = compose(Snapshot.parse(""), split_by_family(as_rules(rules))[4])
    assert sum(len(v) for t in wanted.values() for v in t.values()) == 60
    for table, builtin, chain in (("filter", "INPUT", "KVMUFW-INPUT"),
                                  ("nat", "POSTROUTING", "KVMUFW-POSTROUTING")):
        assert snap.tables[table].rules[builtin] == [f"-A {builtin} -j {chain}"]


def test_apply_twice_changes_nothing_and_foreign_rules_stay(netns):
    netns.run("iptables-restore", input=SEED)
    seeded = netns.save()
    backend = IptablesBackend(prefix=netns.prefix)
    first = apply_rules(everything(), backend=backend)
    after_first = netns.save()
    second = apply_rules(everything(), backend=backend)
    assert first.payload and second.payload == ""
    assert netns.save() == after_first
    # UFW's and libvirt's rules are byte-identical, ours come first
    assert foreign(after_first) == [l for l in foreign(seeded)]
    forward = [l for l in after_first.splitlines() if l.startswith("-A FORWARD ")]
    assert forward[0] == "-A FORWARD -j KVMUFW-FORWARD" and len(forward) == 5
    # removing one owner removes exactly its rules
    apply_rules({"d=web1": ()}, backend=backend)
    left = netns.save()
    assert not [l for l in ours(left) if "d=web1" in l]
    assert [l for l in ours(left) if "d=web1" not in l] == \
        [l for l in ours(after_first) if "d=web1" not in l]
    # removing every owner leaves the firewall exactly as it was
    apply_rules({"n=lab": (), "n=default": ()}, backend=backend)
    assert netns.save() == seeded


def test_jumps_are_repaired_to_position_one(netns):
    backend = IptablesBackend(prefix=netns.prefix)
    apply_rules(everything(), backend=backend)
    # libvirt restarting re-inserts its jumps at the top; someone duplicated ours
    netns.run("iptables", "-N", "LIBVIRT_FWX")
    netns.run("iptables", "-I", "FORWARD", "1", "-j", "LIBVIRT_FWX")
    netns.run("iptables", "-A", "FORWARD", "-j", "KVMUFW-FORWARD")
    netns.run("iptables", "-t", "nat", "-D", "PREROUTING", "-j", "KVMUFW-PREROUTING")
    result = apply_rules(everything(), backend=backend)
    assert result.payload
    save = netns.save()
    forward = [l for l in save.splitlines() if l.startswith("-A FORWARD ")]
    assert forward == ["-A FORWARD -j KVMUFW-FORWARD", "-A FORWARD -j LIBVIRT_FWX"]
    assert [l for l in save.splitlines() if l.startswith("-A PREROUTING ")] == [
        "-A PREROUTING -j KVMUFW-PREROUTING"]


def test_refused_change_leaves_nothing_behind(netns):
    netns.run("iptables-restore", input=SEED)
    backend = IptablesBackend(prefix=netns.prefix)
    apply_rules({"n=default": owner_rules(DEFAULT)}, backend=backend)
    before = netns.save()
    with pytest.raises(ApplyError) as exc:
        apply_rules(everything(), backend=BreaksNat(prefix=netns.prefix))
    assert "\n" not in str(exc.value) and "iptables-restore failed" in str(exc.value)
    assert netns.save() == before


def test_flush_removes_everything_of_ours(netns):
    netns.run("iptables-restore", input=SEED)
    seeded = netns.save()
    backend = IptablesBackend(prefix=netns.prefix)
    apply_rules(everything(), backend=backend)
    assert "KVMUFW" in netns.run("ip6tables-save").stdout
    backend.write(backend.clear(backend.read((4, 6))))
    assert netns.save() == seeded
    assert "KVMUFW" not in netns.run("ip6tables-save").stdout


# --------------------------------------------------------------------------- packets

LAB_NET = TOPOLOGY_NET  # bridge virbr1, 10.0.0.0/24, a network forward 8080 -> .5:80
GUEST = b"""<domain><name>g5</name><metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="2222" guest-port="22"/>
    <forward proto="udp" host-port="6000-6002" guest-port="5000-5002"/>
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
    g5.serve("udp", 5000, 5001, 5002)
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
        "hairpin": g6.ask("tcp", "203.0.113.1", 2222),
        "host_local": host.ask("tcp", "203.0.113.1", 2222),
        "source_refused": inet.ask("tcp", "203.0.113.1", 8443, 1.0),
    }


def test_packets_before_and_after(topo, state_env):
    from kvmufw_hook import ops
    from kvmufw_hook.parse import parse_hookdata
    backend = IptablesBackend(prefix=topo.host.prefix)
    # Without our rules the seed problems are real: DROP policy and libvirt's REJECTs.
    before = probes(topo)
    assert before["egress"] is None and before["dnat"] is None
    assert before["udp_shifted"] == [None, None]

    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)
    after = probes(topo)
    assert after == {
        "egress": "203.0.113.1",  # masqueraded behind the uplink address
        "dnat": "203.0.113.2",  # the guest sees the real client
        "network_forward": "203.0.113.2",
        "udp_shifted": ["203.0.113.2", "203.0.113.2"],  # 6000->5000, 6002->5002
        "hairpin": "10.0.0.1",  # another guest via the host address, masqueraded
        "host_local": "203.0.113.1",  # from the host itself, through nat OUTPUT
        "source_refused": None,  # 8443 only for 198.51.100.0/24
    }

    ops.domain_stopped("g5", backend=backend)
    stopped = probes(topo)
    assert stopped["dnat"] is None and stopped["egress"] == "203.0.113.1"
    assert stopped["network_forward"] == "203.0.113.2"
    ops.network_stopped(net, backend=backend)
    assert probes(topo) == before


def test_a_guest_start_only_appends_and_a_stop_only_deletes(netns):
    """Flushing a chain costs the kernel an RCU grace period (tens of ms on these
    machines); appending does not. A guest start must not flush anything."""
    backend = IptablesBackend(prefix=netns.prefix)
    apply_rules({"n=lab": owner_rules(LAB)}, backend=backend)
    start = apply_rules({"d=web1": owner_rules(WEB1, NETS)}, backend=backend).payload
    body = [l for l in start.splitlines() if l not in ("*filter", "*nat", "COMMIT")]
    assert body and all(l.startswith("-A KVMUFW-") for l in body), start
    stop = apply_rules({"d=web1": ()}, backend=backend).payload
    body = [l for l in stop.splitlines() if l not in ("*filter", "*nat", "COMMIT")]
    assert body and all(l.startswith("-D KVMUFW-") and "d=web1" in l for l in body), stop
