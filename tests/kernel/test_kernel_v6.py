"""Kernel tests for IPv6: the dual-stack twin of test_kernel's packet test.
Real iptables-restore and ip6tables-restore in network namespaces this test creates,
real packets through veth pairs and bridges, no libvirt. Root only; CI runs them.

host: eth0 203.0.113.1/24 + 2001:db8:ff::1/64 to ``inet`` (.2, ::2 and ::3);
      virbr1 10.0.0.1/24 + fd00:10::1/64 (network ``lab``: IPv4 NAT, IPv6 routed) with
      guests g5 and g6 (.5/::5, .6/::6);
      virbr2 10.0.2.1/24 + fd00:20::1/64 (network ``lab2``: NAT66) with guest g7.
inet routes fd00:10::/64 via the host (a routed prefix) and nothing else: fd00:20::/64
is reachable only masqueraded behind the host's address.
"""

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from netlab import SEED, Topology, settle

from kvmufw_hook import backends, ops
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata

# Both bridges get libvirt's REJECTs in IPv4 as in test_kernel's SEED.
SEED4 = SEED.replace(
    "-A LIBVIRT_FWO -i virbr1 -j REJECT --reject-with icmp-port-unreachable\n",
    "-A LIBVIRT_FWO -i virbr1 -j REJECT --reject-with icmp-port-unreachable\n"
    "-A LIBVIRT_FWI -o virbr2 -j REJECT --reject-with icmp-port-unreachable\n"
    "-A LIBVIRT_FWO -i virbr2 -j REJECT --reject-with icmp-port-unreachable\n")
assert SEED4.count("virbr2") == 2

# ip6tables as UFW (IPV6=yes, its defaults) and libvirt leave it: INPUT and FORWARD
# policies DROP; UFW's before6 rules let neighbour discovery and replies in; libvirt's
# REJECTs for each bridge come before UFW's forward chain (which would accept ICMPv6
# errors and replies, but is reached too late).
SEED6 = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:LIBVIRT_INP - [0:0]
:LIBVIRT_FWI - [0:0]
:LIBVIRT_FWO - [0:0]
:LIBVIRT_FWX - [0:0]
:ufw6-before-input - [0:0]
:ufw6-before-forward - [0:0]
-A INPUT -j LIBVIRT_INP
-A INPUT -j ufw6-before-input
-A FORWARD -j LIBVIRT_FWX
-A FORWARD -j LIBVIRT_FWI
-A FORWARD -j LIBVIRT_FWO
-A FORWARD -j ufw6-before-forward
-A LIBVIRT_FWI -o virbr1 -j REJECT --reject-with icmp6-port-unreachable
-A LIBVIRT_FWO -i virbr1 -j REJECT --reject-with icmp6-port-unreachable
-A LIBVIRT_FWI -o virbr2 -j REJECT --reject-with icmp6-port-unreachable
-A LIBVIRT_FWO -i virbr2 -j REJECT --reject-with icmp6-port-unreachable
-A ufw6-before-input -i lo -j ACCEPT
-A ufw6-before-input -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -j ACCEPT
-A ufw6-before-input -p ipv6-icmp -m icmp6 --icmpv6-type 136 -m hl --hl-eq 255 -j ACCEPT
-A ufw6-before-input -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ufw6-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ufw6-before-forward -p ipv6-icmp -m icmp6 --icmpv6-type 2 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:LIBVIRT_PRT - [0:0]
-A POSTROUTING -j LIBVIRT_PRT
-A LIBVIRT_PRT -s fd00:20::/64 -d ff02::/16 -j RETURN
COMMIT
"""

LAB = b"""<network><name>lab</name>
  <metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="8080" guest-port="80" guest-ip="10.0.0.6,fd00:10::6"/>
  </forwards></metadata>
  <forward mode='nat' dev='eth0'/><bridge name='virbr1'/>
  <ip address='10.0.0.1' prefix='24'><dhcp>
    <host mac='52:54:00:00:00:05' ip='10.0.0.5'/><host mac='52:54:00:00:00:06' ip='10.0.0.6'/>
  </dhcp></ip>
  <ip family='ipv6' address='fd00:10::1' prefix='64'><dhcp>
    <host name='g5' ip='fd00:10::5'/>
  </dhcp></ip></network>"""
LAB2 = b"""<network><name>lab2</name>
  <forward mode='nat' dev='eth0'><nat ipv6='yes'/></forward><bridge name='virbr2'/>
  <ip address='10.0.2.1' prefix='24'/>
  <ip family='ipv6' address='fd00:20::1' prefix='64'/></network>"""
# g5's forwards take its addresses from the reservations: IPv4 by MAC, IPv6 by name
G5 = b"""<domain><name>g5</name><metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="2222" guest-port="22"/>
    <forward host-port="2223" guest-port="22" source="2001:db8:ff::2/128"/>
    <forward host-port="2224" guest-port="22" host-ip="2001:db8:ff::1"/>
  </forwards></metadata><devices><interface type='network'>
    <source network='lab' bridge='virbr1'/><mac address='52:54:00:00:00:05'/>
  </interface></devices></domain>"""

HOST4, HOST6 = "203.0.113.1", "2001:db8:ff::1"
INET6, OTHER6 = "2001:db8:ff::2", "2001:db8:ff::3"
FAR6 = "2001:db8:ee::9"  # beyond inet, on a route whose MTU is 1280
BIG = 1400  # bytes of UDP payload: more than that route takes


def dual_stack(host) -> Topology:
    """test_kernel's topology with IPv6 added, and a second bridge for NAT66."""
    topo = Topology(host)
    try:
        _add_ipv6(topo)
    except BaseException:
        topo.destroy()  # the namespaces made so far: the fixture never gets them
        raise
    return topo


def _add_ipv6(topo: Topology) -> None:
    host = topo.host
    host.run("ip", "link", "add", "virbr2", "type", "bridge")
    host.run("ip", "addr", "add", "10.0.2.1/24", "dev", "virbr2")
    host.run("ip", "link", "set", "virbr2", "up")
    topo.guests[7] = topo.add_guest("10.0.2.7", "virbr2", "10.0.2.1", 24)
    v6 = [(host, "eth0", f"{HOST6}/64"), (host, "virbr1", "fd00:10::1/64"),
          (host, "virbr2", "fd00:20::1/64"), (topo.inet, "eth0", f"{INET6}/64"),
          (topo.inet, "eth0", f"{OTHER6}/64")]
    v6 += [(topo.guests[n], "eth0", f"fd00:{net}::{n}/64")
           for n, net in ((5, 10), (6, 10), (7, 20))]
    for ns, dev, addr in v6:
        # ::3 deprecated: inet sends from ::2 unless a probe binds ::3 on purpose
        lifetime = ["preferred_lft", "0"] if addr.startswith(OTHER6 + "/") else []
        ns.run("ip", "addr", "add", addr, "dev", dev, "nodad", *lifetime)
    for n, net in ((5, 10), (6, 10), (7, 20)):
        topo.guests[n].run("ip", "-6", "route", "add", "default", "via", f"fd00:{net}::1")
    host.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    host.run("ip", "-6", "route", "add", "default", "via", INET6)
    # inet: an upstream router that routes lab's prefix to the host and forwards toward
    # a narrower link (the locked MTU makes it answer big packets with packet-too-big)
    topo.inet.run("ip", "-6", "route", "add", "fd00:10::/64", "via", HOST6)
    topo.inet.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    topo.inet.run("ip", "-6", "route", "add", "2001:db8:ee::/64", "dev", "eth0",
                  "mtu", "lock", "1280")
    settle([host, topo.inet, *topo.guests.values()])


@pytest.fixture
def topo(netns):
    topology = dual_stack(netns)
    try:
        netns.run("iptables-restore", input=SEED4)
        netns.run("ip6tables-restore", input=SEED6)
        topology.inet.serve("tcp", 9000)
        topology.guests[5].serve("tcp", 22)
        topology.guests[6].serve("tcp", 80)
        topology.guests[7].serve("tcp", 22)
        netns.serve("udp", 53, 547)  # dnsmasq's DNS and DHCPv6, as far as a probe goes
        yield topology
    finally:
        topology.destroy()


def saved(ns, family: int) -> str:
    """(ip6)iptables-save without timestamps or counters (the built-in chains count)."""
    return re.sub(r" \[\d+:\d+\]$", "", ns.save(family), flags=re.M)


def path_mtu(guest, dst: str) -> int | None:
    """The path MTU the guest's kernel learnt toward ``dst`` (a packet-too-big reached
    it), or None."""
    found = re.search(r"\bmtu (\d+)", guest.run("ip", "-6", "route", "get", dst).stdout)
    return int(found.group(1)) if found else None


def probes(topo) -> dict:
    """What each probe's server saw (None: no answer), the probes run side by side:
    most of those that fail wait for their timeout."""
    g5, g6, g7, inet, host = (topo.guests[5], topo.guests[6], topo.guests[7], topo.inet,
                              topo.host)
    asks = {
        "egress_routed": (g5, "tcp", INET6, 9000),
        "egress_nat66": (g7, "tcp", INET6, 9000),
        "egress_v4": (g5, "tcp", "203.0.113.2", 9000),
        "dnat_v6": (inet, "tcp", HOST6, 2222),
        "dnat_v4": (inet, "tcp", HOST4, 2222),
        "network_forward_v6": (inet, "tcp", HOST6, 8080),
        "network_forward_v4": (inet, "tcp", HOST4, 8080),
        "source_v6": (inet, "tcp", HOST6, 2223, 2.0, INET6),
        "source_other_v6": (inet, "tcp", HOST6, 2223, 2.0, OTHER6),
        "source_over_v4": (inet, "tcp", HOST4, 2223),
        "host_ip_v6": (inet, "tcp", HOST6, 2224),
        "host_ip_other_address": (inet, "tcp", "fd00:10::1", 2224),
        "host_ip_over_v4": (inet, "tcp", HOST4, 2224),
        "hairpin_v6": (g6, "tcp", HOST6, 2222),
        "host_local_v6": (host, "tcp", HOST6, 2222),
        "dns_v6": (g5, "udp", "fd00:10::1", 53),
        "dhcp_v6": (g5, "udp", "fd00:10::1", 547),
    }
    with ThreadPoolExecutor(max_workers=len(asks)) as pool:
        futures = {name: pool.submit(ns.ask, *args) for name, (ns, *args) in asks.items()}
        return {name: future.result() for name, future in futures.items()}


def packet_too_big(guest) -> int | None:
    """Send a datagram too big for the path to FAR6; the path MTU the guest learnt
    from the packet-too-big inet answers with (None: none arrived)."""
    guest.run(sys.executable, "-c", "import socket; s = socket.socket(socket.AF_INET6, "
              f"socket.SOCK_DGRAM); s.sendto(b'x' * {BIG}, ('{FAR6}', 9))")
    deadline = time.monotonic() + 2
    while (mtu := path_mtu(guest, FAR6)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return mtu


def test_dual_stack_packets_before_and_after(topo, state_env):
    backend = backends.get("iptables", prefix=topo.host.prefix)
    seeded = {f: saved(topo.host, f) for f in (4, 6)}
    # Without our rules UFW's DROP policies and libvirt's REJECTs stop everything.
    before = probes(topo)
    assert before == dict.fromkeys(before), before
    assert packet_too_big(topo.guests[5]) is None

    lab, _ = parse_hookdata(LAB)
    lab2, _ = parse_hookdata(LAB2)
    ops.network_started(lab, LAB, backend=backend)
    ops.network_started(lab2, LAB2, backend=backend)
    ops.domain_started(parse_domain_xml(G5), G5, backend=backend)
    after = probes(topo)
    assert after == {
        "egress_routed": "fd00:10::5",  # routed: inet sees the guest itself
        "egress_nat66": HOST6,  # <nat ipv6='yes'/>: masqueraded behind the uplink
        "egress_v4": HOST4,
        "dnat_v6": INET6,  # one forward, both families, the real client in each
        "dnat_v4": "203.0.113.2",
        "network_forward_v6": INET6,  # guest-ip="10.0.0.6,fd00:10::6"
        "network_forward_v4": "203.0.113.2",
        "source_v6": INET6,  # source='2001:db8:ff::2/128'
        "source_other_v6": None,  # ::3 is not that source
        "source_over_v4": None,  # an IPv6 source: the forward exists only in IPv6
        "host_ip_v6": INET6,  # host-ip='2001:db8:ff::1'
        "host_ip_other_address": None,  # the host's, but not that host-ip
        "host_ip_over_v4": None,  # an IPv6 host-ip: the forward exists only in IPv6
        "hairpin_v6": "fd00:10::1",  # g6 via the host's address, masqueraded
        "host_local_v6": HOST6,  # from the host itself, through nat OUTPUT
        "dns_v6": "fd00:10::5",
        "dhcp_v6": "fd00:10::5",
    }, ip6tables_listing(topo.host)
    # ICMPv6 errors reach the guests: routed (any inbound) and NAT66 (related, un-NATed)
    assert packet_too_big(topo.guests[5]) == 1280
    assert packet_too_big(topo.guests[7]) == 1280

    ops.domain_stopped("g5", backend=backend)
    stopped = probes(topo)
    for gone in ("dnat_v6", "dnat_v4", "source_v6", "host_ip_v6", "hairpin_v6",
                 "host_local_v6"):
        assert stopped[gone] is None, gone
    assert stopped["egress_routed"] == "fd00:10::5"
    assert stopped["network_forward_v6"] == INET6
    ops.network_stopped(lab, backend=backend)
    ops.network_stopped(lab2, backend=backend)
    assert probes(topo) == before
    assert "KVMUFW" not in topo.host.save(6)
    assert {f: saved(topo.host, f) for f in (4, 6)} == seeded


def ip6tables_listing(ns) -> str:
    """What the kernel holds, shown when a probe fails."""
    return ns.run("ip6tables-save", "-c").stdout


# --------------------------------------------------------------------------- no IPv6

# What ip6tables says on a host booted with ipv6.disable=1
NO_IPV6 = "Cannot initialize: Address family not supported by protocol"


def without_ip6tables(ns, tmp_path) -> list[str]:
    """A prefix that runs commands in ``ns`` with a PATH whose ip6tables-save and
    ip6tables-restore fail as on a host without IPv6 (iptables is the real one)."""
    bin_dir = tmp_path / "no-ipv6-bin"
    bin_dir.mkdir()
    for tool in ("ip6tables-save", "ip6tables-restore"):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\necho '{tool}: {NO_IPV6}' >&2\nexit 1\n")
        script.chmod(0o755)
    return [*ns.prefix, "env", f"PATH={bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"]


def test_a_host_without_ipv6_keeps_ipv4_and_says_once_what_it_left_out(topo, state_env,
                                                                       tmp_path):
    backend = backends.get("iptables", prefix=without_ip6tables(topo.host, tmp_path))
    g5, inet = topo.guests[5], topo.inet
    seeded6 = saved(topo.host, 6)
    assert inet.ask("tcp", HOST4, 2222) is None and g5.ask("tcp", "203.0.113.2", 9000) is None

    logs: dict[str, list[str]] = {}
    lab, _ = parse_hookdata(LAB)
    ops.network_started(lab, LAB, backend=backend, log=logs.setdefault("net", []).append)
    ops.domain_started(parse_domain_xml(G5), G5, backend=backend,
                       log=logs.setdefault("dom", []).append)
    for op in ("net", "dom"):
        left_out = [line for line in logs[op] if line.startswith("IPv6 rules left out")]
        assert left_out == [f"IPv6 rules left out: ip6tables-save failed (exit 1): "
                            f"ip6tables-save: {NO_IPV6}"], (op, logs[op])
    # the guest's summary does not claim its IPv6-only forwards were applied
    assert "domain 'g5': 3 forward(s), applied (IPv6 left out)" in logs["dom"]
    # IPv4 as on any host; nothing of ours in ip6tables (the real one, read directly)
    assert g5.ask("tcp", "203.0.113.2", 9000) == HOST4
    assert inet.ask("tcp", HOST4, 2222) == "203.0.113.2"
    assert inet.ask("tcp", HOST4, 8080) == "203.0.113.2"
    assert saved(topo.host, 6) == seeded6
    assert inet.ask("tcp", HOST6, 2222) is None and g5.ask("tcp", INET6, 9000) is None

    # stopping has nothing of IPv6 to leave out: it says nothing about it
    ops.domain_stopped("g5", backend=backend, log=logs.setdefault("stop", []).append)
    ops.network_stopped(lab, backend=backend, log=logs["stop"].append)
    assert not [line for line in logs["stop"] if "IPv6" in line], logs["stop"]
    assert inet.ask("tcp", HOST4, 2222) is None and g5.ask("tcp", "203.0.113.2", 9000) is None
    assert "KVMUFW" not in topo.host.save(4)
