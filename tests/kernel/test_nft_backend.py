"""The nftables backend (``table inet kvmufw`` with maps) in a network namespace this test
creates: real ``nft``, real iptables with UFW's DROP policy and libvirt's rejects, real
packets through veth pairs. Root only; CI runs them."""

import pathlib

import pytest
from netlab import SEED, TOPOLOGY_LIBVIRT_NFT, TOPOLOGY_NET, Topology

from kvmufw_hook import ops
from kvmufw_hook.backends.nft import GLUE_COMMENT, NftBackend
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata

ROOT = str(pathlib.Path(__file__).resolve().parent.parent)  # what tests put on sys.path
LAB_NET = TOPOLOGY_NET  # bridge virbr1, 10.0.0.0/24, a network forward 8080 -> .5:80
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


def rules(save: str) -> list[str]:
    """The rules and policies of an iptables-save, without counters (an empty IPv6 filter
    table that our glue's removal leaves behind holds nothing)."""
    return [line.rsplit(" [", 1)[0] for line in save.splitlines()
            if line.startswith("-A") or (line.startswith(":") and " - " not in line
                                         and "ACCEPT" not in line)]


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


def test_a_start_twice_writes_nothing_and_flush_leaves_no_trace(topo, state_env):
    backend = NftBackend(prefix=topo.host.prefix)
    seeded = rules(topo.host.save()), rules(topo.host.save(6))
    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)
    first = table(topo)
    assert ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend).payload == ""
    assert table(topo) == first
    ops.flush(backend=backend)
    assert table(topo) == ""
    assert (rules(topo.host.save()), rules(topo.host.save(6))) == seeded


def test_a_stop_after_lost_state_removes_exactly_that_owner_from_the_kernel(topo, state_env):
    """Whose an element is, is its comment in the kernel: no file of ours is needed."""
    import shutil
    backend = NftBackend(prefix=topo.host.prefix)
    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)
    network_only = NftBackend(prefix=topo.host.prefix).read()
    shutil.rmtree(state_env["KVMUFW_STATE_DIR"])
    ops.domain_stopped("g5", backend=backend)
    after = backend.read()
    assert backend.owners(after) == {"n=lab"}
    assert {e for e in after.table.elements} == {
        e for e in network_only.table.elements if e.comment.startswith("kvmufw:n=lab,")}
    assert probes(topo)["network_forward"] == "203.0.113.2"


def test_claims_are_read_back_from_the_maps(topo, state_env):
    backend = NftBackend(prefix=topo.host.prefix)
    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)
    held = backend.claims(backend.read())
    ports = sorted((s.proto, s.host_port.first, s.host_port.last)
                   for s in held["d=g5"])
    assert ("tcp", 2222, 2222) in ports and ("udp", 5100, 5101) in ports
    assert ("udp", 6000, 6002) in ports  # a shifted range is one claim again
    assert [(s.proto, s.host_port.first) for s in held["n=lab"]] == [("tcp", 8080)]


LIBVIRT_NFT = TOPOLOGY_LIBVIRT_NFT  # libvirt 11's table for virbr1, abridged


def test_forwards_pass_libvirt_nftables_rejects_with_one_glue_rule_per_chain(topo, state_env):
    """libvirt's nftables backend: ``guest_input`` rejects what enters the bridge; one
    glue accept at its top (and ``guest_output``'s) lets every forward through."""
    topo.host.run("nft", "-f", "-", input=LIBVIRT_NFT)
    backend = NftBackend(prefix=topo.host.prefix)
    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)
    libvirt = topo.host.run("nft", "list", "table", "ip", "libvirt_network").stdout
    for chain in ("guest_input", "guest_output"):
        body = libvirt.split(f"chain {chain} {{", 1)[1].split("}", 1)[0]
        assert body.strip().splitlines()[0].strip().startswith("meta mark & 0x01000000")
    found = probes(topo)
    assert found["dnat"] == "203.0.113.2" and found["network_forward"] == "203.0.113.2"
    assert found["udp_shifted"] == ["203.0.113.2", "203.0.113.2"]
    ops.flush(backend=backend)
    assert "kvmufw" not in topo.host.run("nft", "list", "table", "ip",
                                         "libvirt_network").stdout


OTHER_NET = b"""<network><name>other</name><forward mode='nat'/><bridge name='virbr2'/>
  <ip address='10.0.1.1' prefix='24'/></network>"""
ANYWHERE_NET = LAB_NET.replace(b"<forward mode='nat' dev='eth0'/>", b"<forward mode='nat'/>")


def test_no_network_reaches_another_that_libvirt_would_refuse(topo, state_env):
    """A nat network without ``dev`` is accepted out to anywhere, but what it sends
    to another network's bridge leaves our table unmarked (a fence): UFW's and
    libvirt's rules refuse it, as they would without us; DNAT'd traffic still passes."""
    topo.add_bridge("virbr2", "10.0.1.1/24")
    g7 = topo.add_guest("10.0.1.7", "virbr2", "10.0.1.1", 24)
    g7.serve("tcp", 7777)
    backend = NftBackend(prefix=topo.host.prefix)
    other, _ = parse_hookdata(OTHER_NET)
    lab, _ = parse_hookdata(ANYWHERE_NET)
    ops.network_started(other, OTHER_NET, backend=backend)
    ops.network_started(lab, ANYWHERE_NET, backend=backend)
    g5 = topo.guests[5]
    assert g5.ask("tcp", "203.0.113.2", 9000) == "203.0.113.1"
    assert g5.ask("tcp", "10.0.1.7", 7777, 1.0) is None
    # the forward passes; the other network masquerades it out to anywhere, as libvirt
    assert g7.ask("tcp", "203.0.113.1", 8080) == "10.0.0.1"


V6_NET = LAB_NET.replace(b"</dhcp></ip>", b"</dhcp></ip><ip family='ipv6' address='fd00::1' "
                                          b"prefix='64'/>")
V6_GUEST = GUEST.replace(b'<forward host-port="2222" guest-port="22"/>',
                         b'<forward host-port="2222" guest-port="22"/><forward '
                         b'host-port="2223" guest-port="22" guest-ip="10.0.0.5,fd00::5"/>')


def test_ipv6_forwards_pass_ip6tables_drop_through_the_same_table(topo, state_env):
    host, inet, g5 = topo.host, topo.inet, topo.guests[5]
    for ns, addr in ((host, "2001:db8:1::1/64"), (inet, "2001:db8:1::2/64")):
        ns.run("ip", "-6", "addr", "add", addr, "dev", "eth0", "nodad")
    host.run("ip", "-6", "addr", "add", "fd00::1/64", "dev", "virbr1", "nodad")
    g5.run("ip", "-6", "addr", "add", "fd00::5/64", "dev", "eth0", "nodad")
    g5.run("ip", "-6", "route", "add", "default", "via", "fd00::1")
    inet.run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
    host.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    host.run("ip6tables", "-P", "FORWARD", "DROP")
    backend = NftBackend(prefix=host.prefix)
    assert inet.ask("tcp", "2001:db8:1::1", 2223, 1.0) is None
    net, _ = parse_hookdata(V6_NET)
    ops.network_started(net, V6_NET, backend=backend)
    ops.domain_started(parse_domain_xml(V6_GUEST), V6_GUEST, backend=backend)
    # neighbour discovery on a loaded machine can cost the first SYN: a longer wait
    assert inet.ask("tcp", "2001:db8:1::1", 2223, 6.0) == "2001:db8:1::2"
    assert inet.ask("tcp", "203.0.113.1", 2223) == "203.0.113.2"
    assert GLUE_COMMENT in host.save(6)
    ops.domain_stopped("g5", backend=backend)
    assert inet.ask("tcp", "2001:db8:1::1", 2223, 1.0) is None


RECORDED = r"""
import sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook.backends import nft
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata
from kvmufw_hook.apply import apply_rules
net, _ = parse_hookdata(open(sys.argv[2], "rb").read())
dom = parse_domain_xml(open(sys.argv[3], "rb").read())
backend = nft.NftBackend()
apply_rules({"n=lab": owner_rules(net)}, backend=backend)
apply_rules({"d=g5": owner_rules(dom, {"lab": net})}, backend=backend)
calls = []
real = nft.run
nft.run = lambda argv, **kw: calls.append(argv[-1]) or real(argv, **kw)
apply_rules({"d=g5": ()}, backend=backend)  # a stop: recorded table, one batch
apply_rules({"d=g5": owner_rules(dom, {"lab": net})}, backend=backend)  # a start
print(calls)
before = backend.read()
import subprocess
subprocess.run(["nft", "add", "element", "inet", "kvmufw", "b2b4", '{ "x" . "y" }'], check=True)
grew = len(backend.read().table.elements) - len(before.table.elements)
print(calls, grew)
"""


def test_a_start_and_a_stop_after_our_own_write_run_no_process_and_read_nothing(
        topo, state_env, tmp_path):
    """nf_tables' generation proves nobody changed anything since our last write: our
    record of the table stands for a read, and the start's and the stop's element
    changes are one netlink batch each (``nftwrite``), no ``nft`` process; anyone's
    change (here a hand-added element) makes the next read go to the kernel again."""
    import pathlib
    import sys
    (tmp_path / "net.xml").write_bytes(LAB_NET)
    (tmp_path / "dom.xml").write_bytes(GUEST)
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    out = topo.host.run(sys.executable, "-c", RECORDED, root, str(tmp_path / "net.xml"),
                        str(tmp_path / "dom.xml"),
                        env={**__import__("os").environ, **state_env}).stdout.splitlines()
    assert out[0] == "[]"  # no nft -f, no list, no probe by process
    assert out[1] == "['kvmufw'] 1"  # someone else's change is seen: nft list read it


def test_switching_from_iptables_keeps_every_forward_and_leaves_none_of_its_rules(
        topo, state_env):
    """Guests running under the iptables backend; ``replay`` under this one (every owner
    applied again): the forwards work throughout and no ``KVMUFW-`` chain or jump stays.
    Back the other way: this backend's ``clear``, then the iptables backend's apply."""
    from kvmufw_hook.backends import backend_only
    from kvmufw_hook.hostplan import owner_rules
    net, _ = parse_hookdata(LAB_NET)
    dom = parse_domain_xml(GUEST)
    owners = {"n=lab": owner_rules(net), "d=g5": owner_rules(dom, {"lab": net})}
    iptables = backend_only("iptables", topo.host.prefix)
    nft = backend_only("nftables", topo.host.prefix)
    ops.apply_rules(owners, backend=iptables)
    assert probes(topo)["dnat"] == "203.0.113.2"
    ops.apply_rules(owners, backend=nft)
    assert "KVMUFW" not in topo.host.save() + topo.host.save(6)
    assert probes(topo) == {
        "egress": "203.0.113.1", "dnat": "203.0.113.2", "network_forward": "203.0.113.2",
        "udp_shifted": ["203.0.113.2"] * 2, "udp_same_range": ["203.0.113.2"] * 2,
        "hairpin": "10.0.0.1", "host_local": "203.0.113.1", "source_refused": None}
    nft.write(nft.clear(nft.read()))
    ops.apply_rules(owners, backend=iptables)
    assert table(topo) == "" and GLUE_COMMENT not in topo.host.save()
    assert probes(topo)["dnat"] == "203.0.113.2"


REPLAYED = r"""
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import ops
started = []
real_spawn, real_init = os.posix_spawn, subprocess.Popen.__init__
os.posix_spawn = lambda path, argv, *a, **k: started.append(argv[0]) or real_spawn(path, argv, *a, **k)
def popen(self, argv, *a, **k):
    started.append(argv[0])
    real_init(self, argv, *a, **k)
subprocess.Popen.__init__ = popen
net, dom = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
for _ in range(2):
    started.clear()
    assert not ops.replay([net], [dom]).problems
    print(" ".join(os.path.basename(p) for p in started))
"""


def test_replay_is_one_nft_process(topo, state_env, tmp_path):
    """Where iptables is iptables-nft, a replay writes our table and the glue in
    iptables' filter INPUT and FORWARD (both families) in one ``nft -f`` transaction,
    the glue read in-process by netlink dumps (no iptables-save), and iptables-save
    prints the glue as iptables writes it, without a warning; nothing is read of the
    iptables backend that a netlink request proves empty. Once the glue is there, a
    replay starts no process at all."""
    import os
    import pathlib
    import sys

    from kvmufw_hook import state
    (tmp_path / "net.xml").write_bytes(state.network_element(LAB_NET))
    (tmp_path / "dom.xml").write_bytes(GUEST)
    pathlib.Path(state_env["KVMUFW_CONFIG"]).write_text('firewall_backend = "nftables"\n')
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    out = topo.host.run(sys.executable, "-c", REPLAYED, root, str(tmp_path / "net.xml"),
                        str(tmp_path / "dom.xml"), env={**os.environ, **state_env})
    assert out.stdout.splitlines() == ["nft", ""]
    glue = ('-m mark --mark 0x1000000/0x1000000 -m comment --comment "kvmufw:g=glue,b=-,s=-" '
            "-j ACCEPT")
    for tool in ("iptables-save", "ip6tables-save"):
        saved = topo.host.run(tool)
        assert saved.stderr == "" and "Warning" not in saved.stdout
        for chain in ("INPUT", "FORWARD"):
            lines = [l for l in saved.stdout.splitlines() if l.startswith(f"-A {chain} ")]
            assert lines[0] == f"-A {chain} {glue}" and lines.count(lines[0]) == 1
    assert probes(topo)["dnat"] == "203.0.113.2"
    backend = NftBackend(prefix=topo.host.prefix)
    assert backend.entry_problems(backend.read()) == []


EMPTY = r"""
import sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook.backends import proved_empty
print(proved_empty("iptables"), proved_empty("nftables"))
"""


def test_a_backend_is_proved_empty_only_when_nothing_it_may_hold_is_there(netns):
    """``replay`` reads the backend not selected only where netlink requests cannot
    prove it empty: any chain of the iptables backend in either family, libvirt's
    nftables table (its accepts), our table for this one."""
    import pathlib
    import sys
    root = str(pathlib.Path(__file__).resolve().parent.parent)

    def empty() -> str:
        return netns.run(sys.executable, "-c", EMPTY, root).stdout.strip()
    assert empty() == "True True"
    netns.run("ip6tables", "-t", "nat", "-N", "KVMUFW-OUTPUT")
    assert empty() == "False True"
    netns.run("ip6tables", "-t", "nat", "-X", "KVMUFW-OUTPUT")
    netns.run("nft", "add", "table", "ip6", "libvirt_network")
    assert empty() == "False True"
    netns.run("nft", "delete", "table", "ip6", "libvirt_network")
    netns.run("nft", "add", "table", "inet", "kvmufw")
    assert empty() == "True False"


def test_restore_puts_the_glue_back_after_ufw_flushes_the_builtin_chains(topo, state_env):
    """``ufw reload`` with MANAGE_BUILTINS=yes flushes INPUT and FORWARD, our glue with
    them: ``restore --jumps-only`` (UFW's after.init) puts it back, and the forwards pass
    again without any element written."""
    backend = NftBackend(prefix=topo.host.prefix)
    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)
    elements = table(topo)
    for family in ("iptables", "ip6tables"):
        for chain in ("INPUT", "FORWARD"):
            topo.host.run(family, "-F", chain)
    topo.host.run("iptables", "-A", "FORWARD", "-j", "ufw-before-forward")
    assert probes(topo)["dnat"] is None
    assert backend.entry_problems(backend.read()) != []
    ops.restore(jumps_only=True, backend=backend)
    assert backend.entry_problems(backend.read()) == []
    assert probes(topo)["dnat"] == "203.0.113.2" and table(topo) == elements


FLOWS = """
import socket, sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import conntrack
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 12)
flow = (4, 17, 6000, 6000, socket.inet_pton(socket.AF_INET, "10.0.0.5"), None)
print(len(conntrack._dump(sock, 9, 4, [flow])))
"""


def _with_a_flow(topo):
    """The guest started (by ``nft -f`` elsewhere) and one UDP flow DNAT'd to it; how
    many flows to it conntrack holds, as a function."""
    import sys
    backend = NftBackend(prefix=topo.host.prefix)
    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)
    assert topo.inet.ask("udp", "203.0.113.1", 6000) == "203.0.113.2"
    flows = lambda: topo.host.run(sys.executable, "-c", FLOWS, ROOT).stdout.strip()  # noqa: E731
    assert flows() == "1"
    return backend, flows


def test_a_stop_ends_the_conntrack_flows_its_dnat_elements_made(topo, state_env):
    """A UDP client that keeps sending would keep its translation forever: the elements
    a stop deletes name the flows to end (host port, guest)."""
    backend, flows = _with_a_flow(topo)
    ops.domain_stopped("g5", backend=backend)
    assert flows() == "0"


STOPPED_HERE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import apply
from kvmufw_hook.backends import nft, nftwrite
apply.domain_stopped("g5", backend=nft.NftBackend())
print(len(nftwrite._CLOSERS))
"""


def test_a_stop_by_netlink_ends_the_flows_through_its_batch_socket(topo, state_env):
    """The stop in the namespace itself (as the hook runs it): its elements go in one
    netlink batch, and the flows they made end through the same socket, which a child
    then releases (``nftwrite.release``)."""
    import os
    import sys
    _backend, flows = _with_a_flow(topo)
    out = topo.host.run(sys.executable, "-c", STOPPED_HERE, ROOT,
                        env={**os.environ, **state_env})
    assert out.stdout == "1\n" and out.stderr == ""
    assert flows() == "0"
    assert "d=g5" not in table(topo)


STARTED_HERE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import ops
from kvmufw_hook.backends import nft, nftwrite
from kvmufw_hook.parse import parse_domain_xml
sent = []
real = nftwrite.send
nftwrite.send = lambda *a: sent.append(a[1]) or real(*a)
xml = open(sys.argv[2], "rb").read()
ops.domain_started(parse_domain_xml(xml), xml, backend=nft.NftBackend())
print(sorted(set(sent[0].values())))
"""


def test_forwards_written_by_netlink_pass_packets(topo, state_env, tmp_path):
    """The guest's start in the namespace itself (as the hook runs it): its elements go
    in one netlink batch, and packets take them as they take ``nft -f``'s: DNAT, port
    ranges kept and shifted, the hairpin, the host's own connections, the source refused."""
    import os
    import sys
    backend = NftBackend(prefix=topo.host.prefix)
    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    (tmp_path / "dom.xml").write_bytes(GUEST)
    out = topo.host.run(sys.executable, "-c", STARTED_HERE, ROOT, str(tmp_path / "dom.xml"),
                        env={**os.environ, **state_env})
    assert out.stdout == ("['dnat4_addr', 'dnat4_any', 'dnat4_port', 'guest4', 'guestx4', "
                          "'hairpin4', 'hairpinx4']\n"), out.stderr
    assert probes(topo) == {
        "egress": "203.0.113.1", "dnat": "203.0.113.2", "network_forward": "203.0.113.2",
        "udp_shifted": ["203.0.113.2"] * 2, "udp_same_range": ["203.0.113.2"] * 2,
        "hairpin": "10.0.0.1", "host_local": "203.0.113.1", "source_refused": None}


def test_the_plan_text_is_accepted_by_nft_check(netns):
    """What ``plan`` prints for this backend is a script ``nft -c -f`` accepts."""
    from conftest import SAMPLES

    from kvmufw_hook import backends
    from kvmufw_hook.hostplan import owner_rules
    from kvmufw_hook.parse import parse_network_xml
    lab = parse_network_xml((SAMPLES / "net-lab.xml").read_bytes())
    web1 = parse_domain_xml((SAMPLES / "dom-web1.xml").read_bytes())
    text = backends.backend_only("nftables").render(
        {"n=lab": owner_rules(lab), "d=web1": owner_rules(web1, {"lab": lab})})
    assert "add element inet kvmufw dnat4" in text and "dnat6" in text
    netns.run("nft", "-c", "-f", "-", input=text)


def test_masquerade_uses_the_networks_own_source_port_range(topo, state_env):
    """A network's ``<nat><port start end>`` is honoured: its guests' connections leave
    from source ports in that range (the peer outside reports the port it saw), and the
    network's stop leaves no chain of that range behind."""
    for proto in ("tcp", "udp"):
        topo.inet.serve(proto, 9100, with_port=True)
    backend = NftBackend(prefix=topo.host.prefix)
    xml = LAB_NET.replace(b"<forward mode='nat' dev='eth0'/>",
                          b"<forward mode='nat' dev='eth0'><nat>"
                          b"<port start='2000' end='2009'/></nat></forward>")
    net, _ = parse_hookdata(xml)
    ops.network_started(net, xml, backend=backend)
    seen = [topo.guests[5].ask(proto, "203.0.113.2", 9100) for proto in ("tcp", "udp")
            for _ in range(3)]
    assert all(s is not None and s.startswith("203.0.113.1:") for s in seen), seen
    ports = [int(s.rsplit(":", 1)[1]) for s in seen if s is not None]
    assert all(2000 <= port <= 2009 for port in ports), seen
    assert "chain masq_2000_2009 {" in table(topo)
    ops.network_stopped(net, backend=backend)
    assert "chain masq_" not in table(topo)
