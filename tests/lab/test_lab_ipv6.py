"""Lab tests for IPv6: a real libvirtd calling the installed hooks, real QEMU
guests, real UFW with its defaults (IPV6=yes, routed traffic denied in ip6tables too) and
real packets in both families, inside namespaces this test creates (tests/support/lab.py).

The uplink eth0 holds 203.0.113.1/24 and 2001:db8:ff::1/64; the "internet" namespace inet
holds 203.0.113.2 and 2001:db8:ff::2 (plus 2001:db8:ff::3, a second IPv6 client that a
source limit must refuse). Networks:
- lab6 (virbr1): nat, 10.0.0.0/24 and fd00:10::/64. libvirt NATs only IPv4 there and routes
  IPv6, so inet routes fd00:10::/64 back through the host, as an ISP would.
- nat66 (virbr3): nat with <nat ipv6='yes'/>, 10.30.0.0/24 and fd00:30::/64; inet has no
  route to fd00:30::/64, so an answer proves the masquerade.
- open6 (virbr4): open, 10.40.0.0/24 and fd00:40::/64, routed by inet.
``test_without_the_product_ipv6_fails`` runs the same probes on a lab where kvmufw_hook
is not installed and shows them failing.
"""

import json
import time

import pytest
from conftest import ROOT, need_root_tools

lab_module = pytest.importorskip("lab")
Lab = lab_module.Lab
forwards = lab_module.forwards

HOST4, HOST6 = "203.0.113.1", "2001:db8:ff::1"
INET4, INET6, INET6_OTHER = "203.0.113.2", "2001:db8:ff::2", "2001:db8:ff::3"

NETS = {
    "lab6": """<network><name>lab6</name><forward mode='nat' dev='eth0'/>
      <bridge name='virbr1' stp='off'/>
      <ip address='10.0.0.1' prefix='24'><dhcp><range start='10.0.0.100' end='10.0.0.200'/>
        <host mac='52:54:00:00:00:05' ip='10.0.0.5'/></dhcp></ip>
      <ip family='ipv6' address='fd00:10::1' prefix='64'><dhcp>
        <host name='web6' ip='fd00:10::5'/></dhcp></ip></network>""",
    "nat66": """<network><name>nat66</name>
      <forward mode='nat' dev='eth0'><nat ipv6='yes'/></forward>
      <bridge name='virbr3' stp='off'/>
      <ip address='10.30.0.1' prefix='24'/>
      <ip family='ipv6' address='fd00:30::1' prefix='64'/></network>""",
    "open6": """<network><name>open6</name><forward mode='open'/>
      <bridge name='virbr4' stp='off'/>
      <ip address='10.40.0.1' prefix='24'/>
      <ip family='ipv6' address='fd00:40::1' prefix='64'/></network>""",
}
GUEST_NS = {  # namespace: (bridge, ip, gateway, ip6, gateway6)
    "g5": ("virbr1", "10.0.0.5", "10.0.0.1", "fd00:10::5", "fd00:10::1"),
    "g6": ("virbr1", "10.0.0.6", "10.0.0.1", "fd00:10::6", "fd00:10::1"),
    "n5": ("virbr3", "10.30.0.5", "10.30.0.1", "fd00:30::5", "fd00:30::1"),
    "o5": ("virbr4", "10.40.0.5", "10.40.0.1", "fd00:40::5", "fd00:40::1"),
}
UPLINK6 = f"""
ip addr add {HOST6}/64 dev eth0 nodad
ip -6 route add default via {INET6}
ip netns exec inet ip addr add {INET6}/64 dev eth0 nodad
# deprecated: never picked as a source unless a client binds it
ip netns exec inet ip addr add {INET6_OTHER}/64 dev eth0 nodad preferred_lft 0
# the "internet" routes the subnets libvirt does not NAT back to the host (not fd00:30::/64)
ip netns exec inet ip -6 route add fd00:10::/64 via {HOST6}
ip netns exec inet ip -6 route add fd00:40::/64 via {HOST6}
ip netns exec inet ip route add 10.40.0.0/16 via {HOST4}
"""


def make_lab(install: bool) -> "Lab":
    need_root_tools(*lab_module.PACKAGES_TOOLS, "ip6tables", "ip6tables-save")
    lab = Lab()
    try:
        lab.sh(UPLINK6)
        lab.start_libvirt()
        for xml in NETS.values():
            lab.define_network(xml)
        lab.sh("ufw --force enable >/dev/null")  # defaults: deny incoming, deny routed
        for ns, (bridge, ip, gw, ip6, gw6) in GUEST_NS.items():
            lab.add_guest_ns(ns, bridge, ip, 24, gw, ip6, gw6)
            lab.serve(ns, "tcp", 22, 80)
        lab.serve("inet", "tcp", 9000)
        if install:
            lab.run(str(ROOT / "install.sh"))
    except BaseException:
        lab.destroy()
        raise
    return lab


@pytest.fixture(scope="module")
def lab():
    the_lab = make_lab(install=True)
    yield the_lab
    the_lab.destroy()


def ours(save: str) -> list[str]:
    return [l for l in save.splitlines() if "KVMUFW" in l or "kvmufw" in l]


def egress(lab, family: int) -> dict:
    server = INET4 if family == 4 else INET6
    return {ns: lab.ask(ns, "tcp", server, 9000) for ns in ("g5", "n5", "o5")}


def reached(lab, family: int, port: int, source: str | None = None,
            timeout: float = 2.0) -> str | None:
    """The address the guest saw for a connection from inet to the host's uplink:port."""
    return lab.ask("inet", "tcp", HOST4 if family == 4 else HOST6, port, timeout, source)


def unreached(lab, family: int, port: int, source: str | None = None) -> bool:
    return reached(lab, family, port, source, timeout=1.0) is None


def jumps_first_once(save: str) -> bool:
    """One jump to each KVMUFW chain, at position 1 of its built-in chain."""
    chains, table = {}, None
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            chains.setdefault((table, line.split()[1]), []).append(line)
    builtins = [("filter", "INPUT"), ("filter", "FORWARD"), ("nat", "PREROUTING"),
                ("nat", "OUTPUT"), ("nat", "POSTROUTING")]
    return all(chains.get((t, c), [""])[0] == f"-A {c} -j KVMUFW-{c}"
               and chains[(t, c)].count(f"-A {c} -j KVMUFW-{c}") == 1 for t, c in builtins)


MAC5, MAC6, MAC_N5 = "52:54:00:00:00:05", "52:54:00:00:00:06", "52:54:00:00:30:05"
EGRESS = {4: {"g5": HOST4, "n5": HOST4, "o5": "10.40.0.5"},
          # lab6 routes IPv6 (the guest's own address), nat66 masquerades it
          6: {"g5": "fd00:10::5", "n5": HOST6, "o5": "fd00:40::5"}}


# --------------------------------------------------------------------------- networks

def test_dual_stack_networks_egress_in_both_families(lab):
    assert "<nat ipv6='yes'" in lab.virsh("net-dumpxml", "nat66")  # libvirt 9.0 takes it
    assert "-P FORWARD DROP" in lab.run("ip6tables", "-S").stdout  # UFW's deny (routed), v6
    assert egress(lab, 4) == EGRESS[4]
    assert egress(lab, 6) == EGRESS[6]
    save6 = lab.save(6)
    assert jumps_first_once(save6), save6
    assert all(subnet in "\n".join(ours(save6))
               for subnet in ("fd00:10::/64", "fd00:30::/64", "fd00:40::/64")), save6


# --------------------------------------------------------------------------- forwards

def test_forward_from_reservations_reached_over_both_families(lab, guest):
    """IPv4 from the MAC's <host mac ip>, IPv6 from the <host name='web6' ip> entry."""
    assert unreached(lab, 4, 2222) and unreached(lab, 6, 2222)
    guest("web6", [("lab6", MAC5)], forwards('host-port="2222" guest-port="22"'))
    assert reached(lab, 4, 2222) == INET4
    assert reached(lab, 6, 2222) == INET6
    save6 = lab.save(6)
    assert "--to-destination [fd00:10::5]:22" in save6, save6
    assert any("d=web6" in l for l in ours(save6)) and jumps_first_once(save6), save6


def test_a_guest_without_an_ipv6_address_is_forwarded_over_ipv4_only(lab, guest):
    """Same MAC as web6, another name: the <host name='web6'> entry is not this guest's."""
    guest("v4only", [("lab6", MAC5)], forwards('host-port="2229" guest-port="22"'))
    assert reached(lab, 4, 2229) == INET4
    assert unreached(lab, 6, 2229)
    assert "fd00:10::5" not in "\n".join(l for l in ours(lab.save(6)) if "d=v4only" in l)


def test_forward_with_a_guest_ip_of_each_family(lab, guest):
    guest("dual", [("lab6", MAC6)],
          forwards('host-port="2224" guest-port="22" guest-ip="10.0.0.6,fd00:10::6"'))
    guest("nat6g", [("nat66", MAC_N5)],
          forwards('host-port="2230" guest-port="22" guest-ip="10.30.0.5,fd00:30::5"'))
    assert reached(lab, 4, 2224) == INET4 and reached(lab, 6, 2224) == INET6
    # NAT66 network: libvirt rejects new connections into it; the forward gets through
    assert reached(lab, 4, 2230) == INET4 and reached(lab, 6, 2230) == INET6


def test_forward_limited_by_source_per_family(lab, guest):
    guest("web6", [("lab6", MAC5)],
          forwards('host-port="2225" guest-port="22" source="2001:db8:ff::2"',
                   'host-port="2226" guest-port="22" source="2001:db8:ff::/64"',
                   'host-port="2227" guest-port="22" source="203.0.113.2,2001:db8:ff::2/128"',
                   'host-port="2228" guest-port="22" source="203.0.113.0/24"'))
    # one IPv6 address allowed: that one only, and nothing at all over IPv4
    assert reached(lab, 6, 2225, INET6) == INET6
    assert unreached(lab, 6, 2225, INET6_OTHER)
    assert unreached(lab, 4, 2225)
    # an IPv6 prefix: every address in it, still nothing over IPv4
    assert reached(lab, 6, 2226, INET6_OTHER) == INET6_OTHER
    assert unreached(lab, 4, 2226)
    # sources of both families: each family its own
    assert reached(lab, 4, 2227) == INET4 and reached(lab, 6, 2227, INET6) == INET6
    assert unreached(lab, 6, 2227, INET6_OTHER)
    # IPv4 sources only: closed over IPv6
    assert reached(lab, 4, 2228) == INET4
    assert unreached(lab, 6, 2228, INET6)


def test_hairpin_and_host_local_over_ipv6(lab, guest):
    guest("web6", [("lab6", MAC5)], forwards('host-port="2222" guest-port="22"'))
    assert lab.ask("g6", "tcp", HOST6, 2222) == "fd00:10::1"  # masqueraded hairpin
    assert lab.ask("g6", "tcp", "fd00:10::1", 2222) == "fd00:10::1"
    assert lab.ask(None, "tcp", HOST6, 2222) == HOST6  # from the host itself
    assert lab.ask(None, "tcp", HOST4, 2222) == HOST4


def test_destroy_removes_the_guests_forwards_in_both_families(lab, guest):
    guest("web6", [("lab6", MAC5)], forwards('host-port="2222" guest-port="22"',
                                             'host-port="2225" guest-port="22" '
                                             'source="2001:db8:ff::2"'))
    guest("dual", [("lab6", MAC6)],
          forwards('host-port="2224" guest-port="22" guest-ip="10.0.0.6,fd00:10::6"'))
    running = {4: lab.save(4), 6: lab.save(6)}
    assert reached(lab, 6, 2225) == INET6
    lab.virsh("destroy", "web6")
    for family in (4, 6):
        after = lab.save(family)
        assert not [l for l in ours(after) if "d=web6" in l], after
        assert ours(after) == [l for l in ours(running[family]) if "d=web6" not in l]
        assert unreached(lab, family, 2222)
        assert reached(lab, family, 2224) == (INET4 if family == 4 else INET6)
    assert unreached(lab, 6, 2225, INET6)
    assert lab.ask("g6", "tcp", HOST6, 2222, 1.0) is None
    assert lab.ask(None, "tcp", HOST6, 2222, 1.0) is None


def test_ufw_reload_keeps_ipv6(lab, guest):
    guest("web6", [("lab6", MAC5)], forwards('host-port="2222" guest-port="22"'))
    lab.sh("ufw reload >/dev/null")
    assert egress(lab, 6) == EGRESS[6]
    assert reached(lab, 6, 2222) == INET6
    assert jumps_first_once(lab.save(6))


def test_status_and_doctor_cover_ipv6(lab, guest):
    guest("web6", [("lab6", MAC5)], forwards('host-port="2222" guest-port="22"'))
    proc = lab.run("kvmufw_hook", "status", "--json", check=False)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    assert "fd00:10::" in proc.stdout, proc.stdout
    proc = lab.run("kvmufw_hook", "status", check=False)
    assert proc.returncode == 0 and "fd00:10::" in proc.stdout, proc.stdout + proc.stderr
    proc = lab.run("kvmufw_hook", "doctor", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout.replace("0 FAIL", ""), proc.stdout


def test_flush_and_replay_cover_ipv6(lab, guest):
    guest("web6", [("lab6", MAC5)], forwards('host-port="2222" guest-port="22"'))
    lab.run("kvmufw_hook", "flush")
    assert "KVMUFW" not in lab.save(6) and "kvmufw" not in lab.save(6)
    assert unreached(lab, 6, 2222) and egress(lab, 6)["o5"] is None
    lab.run("kvmufw_hook", "replay")
    assert reached(lab, 6, 2222) == INET6 and egress(lab, 6) == EGRESS[6]
    assert jumps_first_once(lab.save(6))
    assert lab.run("kvmufw_hook", "replay", "--dry-run").stdout == "# nothing to change\n"


# --------------------------------------------------------------------------- the proof

def test_without_the_product_ipv6_fails():
    """Same lab, kvmufw_hook not installed: every IPv6 probe that passes above fails."""
    bare = make_lab(install=False)
    try:
        bare.define_domain("web6", [("lab6", MAC5)], forwards('host-port="2222" guest-port="22"'))
        bare.virsh("start", "web6")
        assert egress(bare, 6)["o5"] is None  # open network: UFW's ip6tables DROP policy
        assert unreached(bare, 6, 2222) and unreached(bare, 4, 2222)  # no DNAT at all
        assert bare.ask("g6", "tcp", HOST6, 2222, 1.0) is None  # no hairpin
        assert bare.ask(None, "tcp", HOST6, 2222, 1.0) is None  # nor from the host
        assert "kvmufw" not in bare.save(6).lower()
        # a hand-made DNAT into the NAT66 network is swallowed by libvirt's REJECT in
        # LIBVIRT_FWI (into lab6, which libvirt routes for IPv6, it would pass)
        bare.run("ip6tables", "-t", "nat", "-I", "PREROUTING", "-p", "tcp", "--dport", "2230",
                 "-j", "DNAT", "--to-destination", "[fd00:30::5]:22")
        assert unreached(bare, 6, 2230)
    finally:
        bare.destroy()


# --------------------------------------------------------------------------- UFW, install.sh

def test_ufw_reload_that_wipes_every_chain_keeps_ipv6(lab, guest):
    """MANAGE_BUILTINS=yes: the reload flushes ip6tables too; after.init restores ours."""
    guest("web6", [("lab6", MAC5)], forwards('host-port="2222" guest-port="22"'))
    lab.sh("sed -i 's/^MANAGE_BUILTINS=.*/MANAGE_BUILTINS=yes/' /etc/default/ufw")
    try:
        lab.sh("ufw reload >/dev/null")
        save6 = lab.save(6)
        assert "LIBVIRT_FWI" not in save6  # libvirt's IPv6 rules are really gone
        assert egress(lab, 6) == EGRESS[6]
        assert reached(lab, 6, 2222) == INET6 and reached(lab, 4, 2222) == INET4
        assert jumps_first_once(save6), save6
    finally:
        lab.sh("sed -i 's/^MANAGE_BUILTINS=.*/MANAGE_BUILTINS=no/' /etc/default/ufw; "
               "ufw reload >/dev/null")
        lab.restart_libvirt()  # libvirt recreates its chains only when it restarts
        # ... in the background, its jumps on top: wait for them, then put ours first again
        deadline = time.monotonic() + 15
        while not all("-A FORWARD -j LIBVIRT_FWI" in lab.save(f) for f in (4, 6)) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        lab.run("kvmufw_hook", "restore", "--jumps-only")
        assert jumps_first_once(lab.save(6))


def test_uninstall_takes_ours_out_of_ip6tables_too(lab):
    lab.run(str(ROOT / "install.sh"), "--uninstall")
    try:
        save6 = lab.save(6)
        assert "KVMUFW" not in save6 and "kvmufw" not in save6, save6
        assert egress(lab, 6)["o5"] is None  # UFW's DROP again, as without the product
    finally:
        lab.run(str(ROOT / "install.sh"))
    assert egress(lab, 6) == EGRESS[6]
