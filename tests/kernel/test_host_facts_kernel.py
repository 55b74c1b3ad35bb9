"""The host checks (``host.py``) reading a network namespace this test creates: real
addresses in both families, real duplicate address detection, real listening sockets,
through the child that ``HostFacts.read(prefix)`` starts there, as ops.py reads a
backend's. The same checks over hand-built facts are in tests/unit/test_host_v6.py."""

import sys
import time
from ipaddress import ip_address

import pytest
from host_addresses import GUEST_V4, GUEST_V6, OTHER_V6, V4, V6, forward, refusal
from netlab import Netns, veth

from kvmufw_hook.host import HostFacts

# --------------------------------------------------------------------------- kernel

LISTENERS = """
import socket, sys, time
socks = []
def listen(family, addr, port, v6only=None, kind=socket.SOCK_STREAM):
    s = socket.socket(family, kind)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    s.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        s.listen()
    socks.append(s)
listen(socket.AF_INET6, "::", 8443, v6only=True)       # nginx's listen [::]:8443
listen(socket.AF_INET6, "::", 8444, v6only=False)      # dual-stack
listen(socket.AF_INET, "0.0.0.0", 8445)                # IPv4 only
listen(socket.AF_INET6, "2001:db8:1::1", 8446, v6only=True)  # one IPv6 address
listen(socket.AF_INET6, "::1", 8447, v6only=True)      # loopback only
listen(socket.AF_INET6, "::", 8448, kind=socket.SOCK_DGRAM)
print("ready", flush=True)
time.sleep(300)
"""


@pytest.fixture
def v6host(netns):
    """The namespace with 203.0.113.1 and 2001:db8:1::1 (no DAD wait) on an uplink (a
    veth whose peer stays in the namespace: this kernel has no dummy), and its link-local
    address."""
    netns.sh("""
        ip link add eth0 type veth peer name eth0p
        sysctl -qw net.ipv6.conf.eth0.accept_dad=0
        ip link set eth0p up
        ip link set eth0 up
        ip addr add 203.0.113.1/24 dev eth0
        ip addr add 2001:db8:1::1/64 dev eth0 nodad
    """)
    deadline = time.monotonic() + 10
    while True:
        out = netns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link").stdout
        if "tentative" not in out and "fe80::" in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.1)
    netns.link_local = out.split()[3].split("/")[0]
    return netns


def test_kernel_local_addresses_of_both_families_reach_the_check(v6host):
    facts = HostFacts.read(v6host.prefix)
    assert {V4, V6} <= facts.local
    assert refusal(facts, forward(7000, host_ip=V6)) is None
    assert refusal(facts, forward(7000, host_ip=V4)) is None
    assert "is not an address of this host" in refusal(facts, forward(7000, host_ip=OTHER_V6))
    assert "is a loopback address" in refusal(facts, forward(7000, host_ip="::1"))
    link_local = ip_address(v6host.link_local)
    assert link_local in facts.local  # the kernel's own, yet no forward may take it
    assert f"host-ip {link_local} is a link-local address" in refusal(
        facts, forward(7000, host_ip=link_local))


def test_kernel_an_address_another_host_holds_is_refused(v6host):
    """Duplicate address detection: ``peer`` holds 2001:db8:2::1 on the link; the host
    adds it too, the kernel finds the duplicate and keeps the address unused."""
    peer = Netns.create("peer")
    try:
        veth(v6host, "eth1", peer, "eth0")
        peer.run("ip", "addr", "add", "2001:db8:2::1/64", "dev", "eth0", "nodad")
        v6host.run("sysctl", "-qw", "net.ipv6.conf.eth1.accept_dad=1")
        v6host.run("ip", "addr", "add", "2001:db8:2::1/64", "dev", "eth1")
        deadline = time.monotonic() + 15
        while "dadfailed" not in (out := v6host.run("ip", "-6", "addr", "show", "dev",
                                                     "eth1").stdout):
            assert time.monotonic() < deadline, out
            time.sleep(0.2)
        facts = HostFacts.read(v6host.prefix)
        line = refusal(facts, forward(7000, host_ip="2001:db8:2::1"))
        assert line is not None and "failed duplicate address detection" in line, line
    finally:
        peer.destroy()


# port, the forward, whether a service of LISTENERS refuses it
CONFLICTS = [
    (8443, {"families": (4,)}, False),  # guest IPv4 only (as in tests/lab/test_adversarial.py)
    (8443, {"families": (4, 6)}, True),
    (8443, {"guest_ips": [GUEST_V4]}, False),  # v6only: IPv4 is free
    (8443, {"guest_ips": [GUEST_V6]}, True),
    (8443, {"host_ip": V6}, True),
    (8444, {"guest_ips": [GUEST_V4]}, True),  # dual-stack takes both
    (8444, {"guest_ips": [GUEST_V6]}, True),
    (8445, {"guest_ips": [GUEST_V6]}, False),  # IPv4 only: IPv6 is free
    (8445, {"host_ip": V6}, False),
    (8445, {}, True),
    (8446, {"host_ip": V6}, True),
    (8446, {"guest_ips": [GUEST_V6]}, True),
    (8446, {"guest_ips": [GUEST_V4]}, False),
    (8447, {"guest_ips": [GUEST_V6]}, False),  # ::1 never sees a forwarded packet
    (8448, {"proto": "udp", "guest_ips": [GUEST_V6]}, True),
]


def test_kernel_listeners_conflict_per_family(v6host):
    server = v6host.spawn(sys.executable, "-c", LISTENERS)  # ended by the fixture
    assert server.stdout.readline().strip() == "ready", server.stderr.read()
    facts = HostFacts.read(v6host.prefix)
    wrong = []
    for port, spec_args, refused in CONFLICTS:
        spec_args = dict(spec_args)
        families = spec_args.pop("families", None)
        line = refusal(facts, forward(port, **spec_args), families=families)
        if refused and not (line and f"host port {port}/" in line and "python3" in line):
            wrong.append(f"{port} {spec_args}: not refused ({line})")
        elif not refused and line is not None:
            wrong.append(f"{port} {spec_args}: {line}")
    assert wrong == []
