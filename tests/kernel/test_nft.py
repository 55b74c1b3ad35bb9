"""libvirt's nftables backend: which firewall libvirt uses, and our owner-tagged accepts in
libvirt's ``table ip libvirt_network`` (kvmufw_hook/backends/libvirt_nft.py).

Unit tests (no root): the nft text we generate (golden), parsing ``nft -a list``, what a
change deletes and inserts, the detection order. Kernel tests (root): real ``nft`` and
``iptables-restore`` in a network namespace this test creates, holding a copy of the table
libvirt 11's nftables backend builds for a NAT network (same commands, same order), and
real packets: the forward is rejected by libvirt's ``oif virbr1 reject`` without our
accepts and reaches the guest with them.

Regenerate the golden file after an intended change with
``KVMUFW_UPDATE_GOLDEN=1 python3 -m pytest tests/kernel/test_nft.py`` and read the diff.
"""

import os
import sys
import textwrap
from ipaddress import ip_address

import pytest
from conftest import ROOT, SAMPLES, need_root_tools
from netlab import TOPOLOGY_NET

from kvmufw_hook import backends
from kvmufw_hook.backends import libvirt_nft as nftmod
from kvmufw_hook.backends.libvirt_nft import (
    INPUT,
    OUTPUT,
    LibvirtNft,
    NftRule,
    NftSnapshot,
    build_order,
    compose,
    configured,
    libvirt_firewall,
    render_accepts,
    transition,
)
from kvmufw_hook.backends.tags import parse_comment
from kvmufw_hook.errors import ApplyError
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.names import Tag
from kvmufw_hook.ops import apply_rules
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata, parse_network_xml

GOLDEN = ROOT / "tests" / "golden" / "nft-accepts.nft"

LAB_NET = TOPOLOGY_NET  # bridge virbr1, 10.0.0.0/24, a network forward 8080 -> .5:80
GUEST = b"""<domain><name>g5</name><metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="2222" guest-port="22"/>
    <forward proto="udp" host-port="6000-6002" guest-port="5000-5002"/>
    <forward host-port="8443" guest-port="443" source="198.51.100.0/24"/>
    <forward proto="sctp" host-port="3868" guest-port="3868" host-ip="203.0.113.1"/>
  </forwards></metadata><devices><interface type='network'>
    <source network='lab' bridge='virbr1'/><mac address='52:54:00:00:00:05'/>
  </interface></devices></domain>"""
ISOLATED = (SAMPLES / "net-iso.xml").read_bytes().replace(
    b"<bridge", b"<metadata><forwards xmlns='urn:kvmufw:1'><forward host-port='8093' "
    b"guest-port='80' guest-ip='10.30.0.5'/></forwards></metadata><bridge")

LAB = parse_network_xml(LAB_NET)
NETS = {"lab": LAB}
TAG = "kvmufw:d=g5,b=virbr1,s=10.0.0.0/24"


def owners_rules():
    return {"n=lab": owner_rules(LAB),
            "d=g5": owner_rules(parse_domain_xml(GUEST), NETS)}


def empty_table() -> NftSnapshot:
    return NftSnapshot(table=True, chains={INPUT: [], OUTPUT: []})


# --------------------------------------------------------------------------- unit: render

def test_golden_nft_text_for_forwards():
    rules = owners_rules()
    rules["n=isolated"] = owner_rules(parse_network_xml(ISOLATED))
    script = LibvirtNft.change(empty_table(), rules)
    if os.environ.get("KVMUFW_UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text()


def test_exactly_the_forwarded_guest_port_with_ct_status_dnat():
    accepts = [a for f in owner_rules(parse_domain_xml(GUEST), NETS)
               for a in render_accepts(f)]
    assert accepts[:2] == [
        (INPUT, (f'oif "virbr1" ip daddr 10.0.0.5 tcp dport 22 ct status dnat accept '
                f'comment "{TAG}"')),
        (OUTPUT, (f'iif "virbr1" ip saddr 10.0.0.5 tcp sport 22 ct status dnat accept '
                 f'comment "{TAG}"'))]
    # the guest range, not the host range; source and host-ip live in the DNAT only
    assert (INPUT, (f'oif "virbr1" ip daddr 10.0.0.5 udp dport 5000-5002 ct status dnat '
                   f'accept comment "{TAG}"')) in accepts
    assert len(accepts) == 8  # in and out for each of the four forwards
    # the network's own rules (masquerade, egress, DHCP/DNS) need nothing in libvirt's table
    from kvmufw_hook.plan import plan_network
    assert LibvirtNft.change(empty_table(), {"n=lab": plan_network(LAB)}) == ""


# --------------------------------------------------------------------------- unit: parse

LISTED = textwrap.dedent(f"""\
    table ip libvirt_network {{ # handle 7
    \tcomment "Managed by libvirt for virtual networks: https://libvirt.org/firewall.html"
    \tchain forward {{ # handle 1
    \t\ttype filter hook forward priority filter; policy accept;
    \t\tcounter packets 0 bytes 0 jump guest_cross # handle 5
    \t\tcounter packets 0 bytes 0 jump guest_input # handle 6
    \t}}

    \tchain guest_input {{ # handle 3
    \t\toif "virbr1" ip daddr 10.0.0.5 tcp dport 22 ct status dnat accept comment "{TAG}" # handle 21
    \t\toif "virbr1" ip daddr 10.0.0.0/24 ct state established,related counter packets 9 bytes 600 accept # handle 12
    \t\toif "virbr1" counter packets 1 bytes 60 reject # handle 11
    \t\toif "virbr1" ip daddr 10.0.0.5 udp dport 5000-5002 ct status dnat accept comment "{TAG}" # handle 30
    \t}}

    \tchain guest_output {{ # handle 2
    \t\tiif "virbr1" ip saddr 10.0.0.5 tcp sport 22 ct status dnat accept comment "{TAG}" # handle 41
    \t}}
    }}
    """)


def test_parse_finds_ours_by_tag_and_which_sit_behind_libvirts_rules():
    snap = NftSnapshot.parse(LISTED)
    assert snap.table and set(snap.chains) == {"forward", INPUT, OUTPUT}
    ours = snap.ours(INPUT)
    assert [(r.handle, ahead) for r, ahead in ours] == [(21, True), (30, False)]
    assert ours[0][0].tag == Tag("d=g5", "virbr1", "10.0.0.0/24")
    assert [r.tag for r in snap.chains[INPUT][1:3]] == [None, None]  # libvirt's
    assert snap.chains[INPUT][2].text == 'oif "virbr1" counter packets 1 bytes 60 reject'
    assert NftSnapshot.parse("") == NftSnapshot()


# --------------------------------------------------------------------------- unit: change

def test_a_change_moves_ours_ahead_of_libvirts_and_touches_nothing_else():
    snap = NftSnapshot.parse(LISTED)
    tcp22 = [f for f in owners_rules()["d=g5"] if f.proto == "tcp"
             and f.guest_ports.first == 22]
    script = LibvirtNft.change(snap, {"d=g5": tcp22})
    # 22 is in place (kept), 5000-5002 is behind libvirt's reject and not wanted: deleted
    assert script == f"delete rule ip libvirt_network {INPUT} handle 30\n"
    # wanting it back re-inserts it at the top, never below the reject
    udp = [f for f in owners_rules()["d=g5"] if f.proto == "udp"]
    script = LibvirtNft.change(snap, {"d=g5": tcp22 + udp})
    into, out = render_accepts(udp[0])
    assert script.splitlines() == [
        f"delete rule ip libvirt_network {INPUT} handle 30",
        f"insert rule ip libvirt_network {INPUT} " + into[1],
        f"insert rule ip libvirt_network {OUTPUT} " + out[1]]
    assert "handle 11" not in script and "handle 12" not in script


def test_other_owners_stay_drop_removes_a_bridge_and_clear_removes_only_ours():
    rules = owners_rules()
    snap = fake_kernel(LibvirtNft.change(empty_table(), rules))
    assert LibvirtNft.change(snap, rules) == ""  # applying twice changes nothing
    assert LibvirtNft.present(snap, rules["d=g5"]) and LibvirtNft.present(snap, rules["n=lab"])
    stop = LibvirtNft.change(snap, {"d=g5": ()})
    assert stop and all(l.startswith("delete rule") for l in stop.splitlines())
    assert len(stop.splitlines()) == 8  # g5's, not the network's own forward
    by_bridge = LibvirtNft.change(snap, {}, drop=lambda t: t.bridge == "virbr1")
    assert len(by_bridge.splitlines()) == 10
    assert LibvirtNft.clear(snap) == by_bridge
    assert transition(NftSnapshot(), compose(NftSnapshot(), rules)) == ""  # no libvirt table


def fake_kernel(script: str) -> NftSnapshot:
    """What ``nft -a list`` would show after ``script`` on an empty table (unit tests;
    the kernel tests below check the same against the real thing)."""
    snap, handle = empty_table(), 100
    for line in script.splitlines():
        _i, _r, _f, _t, chain, text = line.split(" ", 5)
        handle += 1
        tagged = parse_comment(text.rsplit('comment "', 1)[1][:-1])
        snap.chains[chain].insert(0, NftRule(handle, text, tagged))
    return snap


# --------------------------------------------------------------------------- unit: detection

DEBIAN13_CONF = """\
#   If firewall_backend isn't configured, libvirt will choose the
#   first available backend from the following list:
#
#     [iptables, nftables]
#
#firewall_backend = "iptables"
"""


class Kernel:
    def __init__(self, table: bool):
        self.table = table

    def table_present(self) -> bool:
        return self.table


def test_detection_order_kernel_then_chains_then_config_then_build(tmp_path):
    conf = tmp_path / "network.conf"
    conf.write_text(DEBIAN13_CONF)
    with_chains = "iptables"  # what the iptables backend's libvirt_backend() found
    without = None
    nft_table = libvirt_firewall(with_chains, Kernel(True), str(conf))
    assert (nft_table.backend, nft_table.table) == ("nftables", True)
    assert nft_table.reason == "kernel: table ip libvirt_network"
    assert libvirt_firewall(with_chains, Kernel(False), str(conf)).backend == "iptables"
    debian = libvirt_firewall(without, Kernel(False), str(conf))
    assert debian.backend == "iptables" and "build's order (iptables, nftables)" in debian.reason
    conf.write_text(DEBIAN13_CONF.replace("[iptables, nftables]", "[nftables, iptables]"))
    assert libvirt_firewall(without, Kernel(False), str(conf)).backend == "nftables"
    conf.write_text(DEBIAN13_CONF + 'firewall_backend = "nftables"\n')
    explicit = libvirt_firewall(without, Kernel(False), str(conf))
    assert (explicit.backend, explicit.table) == ("nftables", False)
    old = libvirt_firewall(without, Kernel(False), str(tmp_path / "missing.conf"))
    assert old.backend == "iptables"  # libvirt < 10.4 has no nftables backend


def test_build_order_and_setting_from_network_conf():
    assert build_order(DEBIAN13_CONF) == ("iptables", "nftables")
    assert build_order("#     [nftables, iptables]\n") == ("nftables", "iptables")
    assert build_order("# Master configuration file\n") == ("iptables",)
    assert configured(DEBIAN13_CONF) is None  # the commented default is not a setting
    assert configured('  firewall_backend = "nftables"  \n') == "nftables"
    assert configured("firewall_backend='iptables'") == "iptables"


def test_first_installed_backend_of_the_build_order(tmp_path, monkeypatch):
    conf = tmp_path / "network.conf"
    conf.write_text(DEBIAN13_CONF)
    monkeypatch.setattr(nftmod.shutil, "which", lambda t, path=None: "/x" if t == "nft" else None)
    found = libvirt_firewall(None, Kernel(False), str(conf))
    assert found.backend == "nftables" and found.reason.endswith("first installed")


# --------------------------------------------------------------------------- kernel

# What libvirt 11's nftables backend runs for the NAT network lab (virbr1 10.0.0.0/24,
# forward dev eth0): nftablesSetupPrivateChains, then nftablesAddFirewallRules, in order.
LIBVIRT_TABLE = """\
add table ip libvirt_network
add chain ip libvirt_network forward { type filter hook forward priority 0; policy accept; }
add chain ip libvirt_network guest_output
insert rule ip libvirt_network forward counter jump guest_output
add chain ip libvirt_network guest_input
insert rule ip libvirt_network forward counter jump guest_input
add chain ip libvirt_network guest_cross
insert rule ip libvirt_network forward counter jump guest_cross
add chain ip libvirt_network guest_nat { type nat hook postrouting priority 100; policy accept; }
"""
LIBVIRT_LAB = """\
insert rule ip libvirt_network guest_output iif "virbr1" counter reject
insert rule ip libvirt_network guest_input oif "virbr1" counter reject
insert rule ip libvirt_network guest_cross iif "virbr1" oif "virbr1" counter accept
insert rule ip libvirt_network guest_output ip saddr 10.0.0.0/24 iif "virbr1" oifname "eth0" counter accept
insert rule ip libvirt_network guest_input iifname "eth0" oif "virbr1" ip daddr 10.0.0.0/24 ct state related,established counter accept
insert rule ip libvirt_network guest_nat ip saddr 10.0.0.0/24 ip daddr != 10.0.0.0/24 oifname "eth0" counter masquerade
insert rule ip libvirt_network guest_nat meta l4proto udp ip saddr 10.0.0.0/24 ip daddr != 10.0.0.0/24 oifname "eth0" counter masquerade to :1024-65535
insert rule ip libvirt_network guest_nat meta l4proto tcp ip saddr 10.0.0.0/24 ip daddr != 10.0.0.0/24 oifname "eth0" counter masquerade to :1024-65535
insert rule ip libvirt_network guest_nat oifname "eth0" ip saddr 10.0.0.0/24 ip daddr 255.255.255.255/32 counter return
insert rule ip libvirt_network guest_nat oifname "eth0" ip saddr 10.0.0.0/24 ip daddr 224.0.0.0/24 counter return
"""
# UFW on a host whose libvirt uses nftables: DROP policies, nothing of libvirt's in iptables
UFW_ONLY = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:ufw-before-input - [0:0]
:ufw-before-forward - [0:0]
-A INPUT -j ufw-before-input
-A FORWARD -j ufw-before-forward
-A ufw-before-input -i lo -j ACCEPT
-A ufw-before-input -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""


@pytest.fixture
def nftns(netns):
    need_root_tools("nft")
    return netns


def nft(ns, script: str) -> None:
    ns.run("nft", "-f", "-", input=script)


def listing(ns) -> str:
    return ns.run("nft", "-a", "list", "table", "ip", "libvirt_network").stdout


def libvirts(text: str) -> list[str]:
    """libvirt's rules (handles included: we never touch them) without their counters."""
    import re
    return [re.sub(r"counter packets \d+ bytes \d+", "counter", l.strip())
            for l in text.splitlines() if "kvmufw:" not in l]


def saved(ns) -> str:
    """iptables-save without its policy counters."""
    import re
    return re.sub(r"\[\d+:\d+\]", "[0:0]", ns.save())


def ours(text: str) -> list[str]:
    return [l.strip() for l in text.splitlines() if "kvmufw:" in l]


def probe_in(ns) -> str:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from kvmufw_hook.backends.libvirt_nft import table_in_kernel; "
            "print(table_in_kernel())")
    return ns.run(sys.executable, "-c", code, str(ROOT)).stdout.strip()


def test_netlink_probe_sees_libvirts_table_in_its_own_namespace(nftns):
    assert probe_in(nftns) == "False"
    assert LibvirtNft(nftns.prefix).table_present() is False
    nft(nftns, "add table ip libvirt_network\n")
    assert probe_in(nftns) == "True"
    assert LibvirtNft(nftns.prefix).table_present() is True
    nft(nftns, "add table ip6 libvirt_network\ndelete table ip libvirt_network\n")
    assert probe_in(nftns) == "False"  # the ip table, not ip6's


def lab_table(ns) -> None:
    ns.run("ip", "link", "add", "virbr1", "type", "bridge")
    ns.run("ip", "link", "set", "virbr1", "up")
    nft(ns, LIBVIRT_TABLE + LIBVIRT_LAB)


def test_accepts_read_back_byte_identical_and_apply_twice_changes_nothing(nftns):
    lab_table(nftns)
    before = listing(nftns)
    backend = backends.get("iptables", prefix=nftns.prefix)
    first = apply_rules(owners_rules(), backend=backend)
    assert "# nft -f: our accepts in libvirt's tables (ip and ip6 libvirt_network)" in first.payload
    after = listing(nftns)
    snap = LibvirtNft(nftns.prefix).read()
    wanted = LibvirtNft.change(empty_table(), owners_rules())
    read_back = {(c, r.text) for c in (INPUT, OUTPUT) for r in snap.chains[c]}
    for line in wanted.splitlines():  # what nft prints is exactly what we render
        _insert, _rule, _ip, _table, chain, text = line.split(" ", 5)
        assert (chain, text) in read_back, line
    for chain in (INPUT, OUTPUT):  # ours first, then libvirt's, untouched
        tagged = [r.tag is not None for r in snap.chains[chain]]
        assert tagged == sorted(tagged, reverse=True) and any(tagged)
    assert libvirts(after) == libvirts(before)
    assert LibvirtNft.present(snap, owners_rules()["d=g5"])
    assert apply_rules(owners_rules(), backend=backend).payload == ""
    assert listing(nftns) == after


def test_accepts_behind_a_rebuilt_libvirt_table_go_back_to_the_top(nftns):
    lab_table(nftns)
    backend = backends.get("iptables", prefix=nftns.prefix)
    apply_rules(owners_rules(), backend=backend)
    # libvirtd restarts: it deletes its rules and inserts them again, at the top
    snap = LibvirtNft(nftns.prefix).read()
    nft(nftns, "".join(f"delete rule ip libvirt_network {c} handle {r.handle}\n"
                       for c in ("guest_input", "guest_output", "guest_cross", "guest_nat")
                       for r in snap.chains[c] if r.tag is None) + LIBVIRT_LAB)
    behind = LibvirtNft(nftns.prefix).read()
    assert not LibvirtNft.present(behind, owners_rules()["d=g5"])
    # the reconnect hook re-applies the guest: iptables has nothing to do, nft has
    applied = apply_rules({"d=g5": owners_rules()["d=g5"]}, backend=backend)
    assert applied.payload.startswith("# nft -f")
    fixed = LibvirtNft(nftns.prefix).read()
    assert LibvirtNft.present(fixed, owners_rules()["d=g5"])
    assert LibvirtNft.present(fixed, owners_rules()["n=lab"])  # moved up with it
    # libvirt rebuilt the whole table: ours are gone with it and come back
    nft(nftns, "delete table ip libvirt_network\n" + LIBVIRT_TABLE + LIBVIRT_LAB)
    apply_rules({"d=g5": owners_rules()["d=g5"]}, backend=backend)
    assert len(ours(listing(nftns))) == 8


def test_nft_refused_reverts_the_iptables_change_too(nftns):
    """A real refusal: a forward on a bridge the kernel does not have (``oif`` needs it)."""
    lab_table(nftns)
    nftns.run("iptables-restore", input=UFW_ONLY)
    backend = backends.get("iptables", prefix=nftns.prefix)
    apply_rules({"n=lab": owner_rules(LAB)}, backend=backend)
    before, listed = saved(nftns), listing(nftns)
    ghost = parse_network_xml(LAB_NET.replace(b"virbr1", b"virbr9").replace(b"lab<", b"gh<"))
    with pytest.raises(ApplyError) as exc:
        apply_rules({"n=gh": owner_rules(ghost)}, backend=backend)
    assert "nft failed" in str(exc.value) and "\n" not in str(exc.value)
    assert saved(nftns) == before and listing(nftns) == listed


def test_iptables_refused_writes_nothing_in_libvirts_table(nftns):
    from breaking import BreaksNat
    lab_table(nftns)
    backend = backends.get("iptables", prefix=nftns.prefix)
    apply_rules({"n=lab": owner_rules(LAB)}, backend=backend)
    before, listed = saved(nftns), listing(nftns)
    with pytest.raises(ApplyError):
        apply_rules(owners_rules(), backend=backends.with_participants(
            BreaksNat(prefix=nftns.prefix)))
    assert saved(nftns) == before and listing(nftns) == listed


def test_flush_removes_our_accepts_and_nothing_of_libvirts(nftns):
    from kvmufw_hook.ops import flush
    lab_table(nftns)
    before = listing(nftns)
    backend = backends.get("iptables", prefix=nftns.prefix)
    apply_rules(owners_rules(), backend=backend)
    assert "delete rule ip libvirt_network" in flush(backend=backend).payload
    assert listing(nftns) == before  # handles, order, everything: as libvirt left it
    assert "KVMUFW" not in nftns.save()


PROCESSES = """
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import ops
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata
count = [0]
def counted(real):
    def spawn(*a, **k):
        count[0] += 1
        return real(*a, **k)
    return spawn
# every way a process can start: process.py uses posix_spawn, anything else Popen
real_init = subprocess.Popen.__init__
def counting(self, *a, **k):
    count[0] += 1
    real_init(self, *a, **k)
subprocess.Popen.__init__ = counting
os.posix_spawn, os.posix_spawnp = counted(os.posix_spawn), counted(os.posix_spawnp)
raw = sys.stdin.buffer.read()
net, _ = parse_hookdata(raw)
ops.network_started(net, raw)
dom = parse_domain_xml(sys.argv[2].encode())
out = []
for step in ("start", "again", "stop"):
    count[0] = 0
    t = time.perf_counter()
    ops.domain_stopped("g5") if step == "stop" else ops.domain_started(dom, sys.argv[2].encode())
    out.append(f"{step}={count[0]}/{(time.perf_counter() - t) * 1000:.1f}ms")
print(" ".join(out))
"""


def processes(ns, state) -> dict:
    """Processes a hook-like call spawns (the host's default backend, run inside ns)."""
    proc = ns.run(sys.executable, "-c", PROCESSES, str(ROOT), GUEST.decode(), input=LAB_NET.decode(),
                  env={**os.environ, **state})
    return {k: int(v.split("/")[0]) for k, v in (f.split("=") for f in proc.stdout.split())}


def test_no_extra_process_unless_libvirts_table_is_there(nftns, state_env, tmp_path):
    nftns.run("ip", "link", "add", "virbr1", "type", "bridge")
    nftns.run("ip", "addr", "add", "203.0.113.1/32", "dev", "lo")  # the forwards' host-ip
    without = processes(nftns, state_env)
    # iptables-save and -restore for the start; then nothing changed the ruleset but us
    # (nf_tables' generation says so): the record of it stands for iptables-save
    assert without == {"start": 2, "again": 0, "stop": 1}
    nftns.run("ip", "link", "del", "virbr1")
    lab_table(nftns)
    state = {k: v + "-2" for k, v in state_env.items()}
    os.makedirs(state["KVMUFW_LIBVIRT_NETWORK_DIR"])
    assert processes(nftns, state) == {"start": 4, "again": 2, "stop": 4}  # + nft list, -f


# --------------------------------------------------------------------------- packets

@pytest.fixture
def topo(nftns, state_env):
    from netlab import Topology
    topology = Topology(nftns)
    nftns.run("iptables-restore", input=UFW_ONLY)
    nft(nftns, LIBVIRT_TABLE + LIBVIRT_LAB)
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
        "dnat": inet.ask("tcp", "203.0.113.1", 2222, 1.0),
        "network_forward": inet.ask("tcp", "203.0.113.1", 8080, 1.0),
        "udp_shifted": [inet.ask("udp", "203.0.113.1", p, 1.0) for p in (6000, 6002)],
        "hairpin": g6.ask("tcp", "203.0.113.1", 2222, 1.0),
        "host_local": host.ask("tcp", "203.0.113.1", 2222, 1.0),
        "source_refused": inet.ask("tcp", "203.0.113.1", 8443, 1.0),
    }


WORKING = {
    "egress": "203.0.113.1", "dnat": "203.0.113.2", "network_forward": "203.0.113.2",
    "udp_shifted": ["203.0.113.2", "203.0.113.2"], "hairpin": "10.0.0.1",
    "host_local": "203.0.113.1", "source_refused": None,
}


def test_packets_pass_libvirts_reject_only_with_our_accepts(topo):
    from kvmufw_hook import ops
    host = topo.host
    backend = backends.get("iptables", prefix=host.prefix)
    libvirt_before = libvirts(listing(host))
    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)
    assert probes(topo) == WORKING

    # the control: our iptables rules alone, without the accepts in libvirt's table
    accepts = LibvirtNft(host.prefix).read()
    nft(host, "".join(f"delete rule ip libvirt_network {c} handle {r.handle}\n"
                      for c in (INPUT, OUTPUT) for r, _a in accepts.ours(c)))
    assert "KVMUFW-FORWARD" in host.save()
    rejected = probes(topo)
    assert rejected["dnat"] is None and rejected["network_forward"] is None
    assert rejected["udp_shifted"] == [None, None]
    assert rejected["egress"] == "203.0.113.1"  # egress never needed them
    assert rejected["hairpin"] == "10.0.0.1"  # guest_cross accepts bridge to bridge
    assert rejected["host_local"] == "203.0.113.1"  # nat OUTPUT: no forwarding at all

    ops.domain_started(parse_domain_xml(GUEST), GUEST, backend=backend)  # e.g. reconnect
    ops.network_port(net, LAB_NET, None, deleted=False, backend=backend)  # port-created
    assert probes(topo) == WORKING
    ops.domain_stopped("g5", backend=backend)
    stopped = probes(topo)
    assert stopped["dnat"] is None and stopped["network_forward"] == "203.0.113.2"
    ops.network_stopped(net, backend=backend)
    assert ours(listing(host)) == [] and libvirts(listing(host)) == libvirt_before


def test_isolated_network_replies_need_the_guest_output_accept(nftns, state_env):
    """Isolated: libvirt rejects both ways (``oif``/``iif virbr3 reject``), so the
    forward's replies need our ``guest_output`` accept as much as the request does."""
    from netlab import Topology

    from kvmufw_hook import ops
    topology = Topology(nftns)
    try:
        host = topology.host
        host.sh("""
            ip link add virbr3 type bridge
            ip addr add 10.30.0.1/24 dev virbr3
            ip link set virbr3 up
        """)
        iso = topology.add_guest("10.30.0.5", "virbr3", "10.30.0.1", 24)
        iso.serve("tcp", 80)
        host.run("iptables-restore", input=UFW_ONLY)
        nft(host, LIBVIRT_TABLE + "insert rule ip libvirt_network guest_output iif \"virbr3\" "
            "counter reject\ninsert rule ip libvirt_network guest_input oif \"virbr3\" counter "
            "reject\ninsert rule ip libvirt_network guest_cross iif \"virbr3\" oif \"virbr3\" "
            "counter accept\n")
        backend = backends.get("iptables", prefix=host.prefix)
        net, _ = parse_hookdata(ISOLATED)
        ops.network_started(net, ISOLATED, backend=backend)
        assert topology.inet.ask("tcp", "203.0.113.1", 8093) == "203.0.113.2"
        snap = LibvirtNft(host.prefix).read()
        out = [r for r, _a in snap.ours(OUTPUT)]
        nft(host, f"delete rule ip libvirt_network {OUTPUT} handle {out[0].handle}\n")
        assert topology.inet.ask("tcp", "203.0.113.1", 8093, 1.0) is None  # replies rejected
    finally:
        topology.destroy()


def test_the_real_hooks_sync_the_accepts_in_their_namespace(topo, state_env):
    """The hook shims as libvirt runs them (cleared environment, default backend): the
    detection there is the netlink probe, inside the namespace the hook runs in."""
    from hookrun import run_hook
    host = topo.host
    env = dict(state_env)
    proc = run_hook("network", ["lab", "started", "begin", "-"], LAB_NET, env, host)
    assert proc.returncode == 0, proc.stderr
    proc = run_hook("qemu", ["g5", "start", "begin", "-"], GUEST, env, host)
    assert proc.returncode == 0, proc.stderr
    assert len(ours(listing(host))) == 10
    assert probes(topo) == WORKING
    proc = run_hook("qemu", ["g5", "stopped", "end", "-"], b"", env, host)
    assert proc.returncode == 0 and len(ours(listing(host))) == 2


def test_longest_owner_tag_fits_an_nft_comment():
    """nft keeps at most 128 bytes of a comment; our longest tag stays under it."""
    from ipaddress import IPv4Network

    from kvmufw_hook.intents import Forward
    from kvmufw_hook.model import PortRange
    from kvmufw_hook.names import domain_owner
    for name in ("x" * 64, "é" * 200):
        forward = Forward(domain_owner(name), 4, "b" * 15, IPv4Network("255.255.255.255/32"),
                          proto="sctp", host_ports=PortRange(65534, 65535),
                          guest=ip_address("10.0.0.5"), guest_ports=PortRange(65534, 65535))
        text = render_accepts(forward)[0][1]
        assert len(text.split('comment "')[1][:-1].encode()) <= 128, text
        assert "ip daddr 10.0.0.5 sctp dport 65534-65535" in text  # a host: no /32


DUAL_NET = LAB_NET.replace(b"</dhcp></ip>", b"</dhcp></ip><ip family='ipv6' address='fd00:10::1' "
                           b"prefix='64'><dhcp><host name='g5' ip='fd00:10::5'/></dhcp></ip>")


def test_ipv6_forwards_get_their_accepts_in_libvirts_ip6_table():
    """libvirt keeps an IPv6 subnet's rules in ``table ip6 libvirt_network``: each table
    gets the accepts of its own family, and nothing of the other."""
    dual = parse_network_xml(DUAL_NET)
    rules = {"d=g5": owner_rules(parse_domain_xml(GUEST), {"lab": dual})}
    v4 = LibvirtNft.change(empty_table(), rules)
    v6 = LibvirtNft.change(NftSnapshot(table=True, chains={INPUT: [], OUTPUT: []},
                                       family="ip6"), rules)
    assert v4 and "ip6" not in v4 and "fd00" not in v4
    tag6 = "kvmufw:d=g5,b=virbr1,s=fd00:10::/64"
    assert (f'insert rule ip6 libvirt_network {INPUT} oif "virbr1" ip6 daddr fd00:10::5 tcp '
            f'dport 22 ct status dnat accept comment "{tag6}"') in v6.splitlines()
    assert all(" ip6 " in line and "10.0.0" not in line for line in v6.splitlines())
    # 22 and the udp range in both families; the forwards limited to an IPv4 source or
    # host-ip exist in IPv4 only
    assert (len(v4.splitlines()), len(v6.splitlines())) == (8, 4)
    # an empty ip table that does not hold the IPv6 rules does not make them present
    snap6 = fake_kernel(v6)
    snap6.family = "ip6"
    assert LibvirtNft.present(snap6, rules["d=g5"]) and not LibvirtNft.present(
        empty_table(), rules["d=g5"])


def test_an_ipv6_tag_too_long_for_nft_keeps_owner_and_bridge():
    from ipaddress import IPv6Network

    from kvmufw_hook.intents import Forward
    from kvmufw_hook.model import PortRange
    from kvmufw_hook.names import domain_owner
    subnet = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120"
    forward = Forward(domain_owner("x" * 64), 6, "b" * 15, IPv6Network(subnet), proto="tcp",
                      host_ports=PortRange(22, 22),
                      guest=ip_address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff05"),
                      guest_ports=PortRange(22, 22))
    text = render_accepts(forward)[0][1]
    comment = text.split('comment "')[1][:-1]
    assert len(comment.encode()) <= 128 and subnet not in comment
    assert parse_comment(comment) == Tag(domain_owner("x" * 64), "b" * 15, "")
    assert "ip6 daddr ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff05 tcp dport 22" in text


def test_dual_stack_accepts_in_both_of_libvirts_tables_and_a_stop_removes_both(nftns):
    """On the kernel: libvirt's ip6 table gets the IPv6 accepts (read back as rendered),
    its ip table the IPv4 ones, in one nft transaction; a stop removes ours from both and
    leaves libvirt's rules as they were."""
    lab_table(nftns)
    nft(nftns, LIBVIRT_TABLE.replace(" ip libvirt_network", " ip6 libvirt_network")
        + 'insert rule ip6 libvirt_network guest_input oif "virbr1" counter reject\n'
        + 'insert rule ip6 libvirt_network guest_output iif "virbr1" counter reject\n')
    def six():
        return nftns.run("nft", "-a", "list", "table", "ip6", "libvirt_network").stdout
    before4, before6 = listing(nftns), six()
    dual = parse_network_xml(DUAL_NET)
    rules = {"d=g5": owner_rules(parse_domain_xml(GUEST), {"lab": dual})}
    backend = backends.get("iptables", prefix=nftns.prefix)
    apply_rules(rules, backend=backend)
    snap6 = LibvirtNft(nftns.prefix, "ip6").read()
    assert LibvirtNft.present(snap6, rules["d=g5"])
    assert LibvirtNft.present(LibvirtNft(nftns.prefix).read(), rules["d=g5"])
    assert len(ours(six())) == 4 and all("ip6 daddr fd00:10::5" in l or
                                         "ip6 saddr fd00:10::5" in l for l in ours(six()))
    assert len(ours(listing(nftns))) == 8 and "fd00" not in listing(nftns)
    assert apply_rules(rules, backend=backend).payload == ""  # read back as rendered
    apply_rules({"d=g5": ()}, backend=backend)
    assert ours(six()) == [] and ours(listing(nftns)) == []
    assert libvirts(six()) == libvirts(before6) and libvirts(listing(nftns)) == libvirts(before4)
