"""The host policy with real packets: real iptables and ip6tables in namespaces this test
creates, libvirt-like REJECTs and UFW's DROP policies seeded, hooks' operations driven as
libvirt drives them. Each hole is shown open without the policy and closed with it.

The host: uplink eth0 (203.0.113.1, 2001:db8:ee::1) to ``inet``; bridge virbr1 (network
``lab``, nat without ``dev``: 10.0.0.0/24, fd00:10::/64 routed) with guests g5 and g6;
bridge virbr2 (network ``iso``, isolated: 10.0.2.0/24, fd00:2::/64) with guest g25.
"""

import re
import sys

import pytest
from hookrun import FORWARDS
from netlab import Netns, Topology, settle, veth

from kvmufw_hook import backends, ops, state
from kvmufw_hook.errors import InputError
from kvmufw_hook.model import NetworkPort
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata
from kvmufw_hook.plan import eui64_address

HOST6, INET6 = "2001:db8:ee::1", "2001:db8:ee::2"
G6_MAC = "52:54:00:00:00:06"


def _seed(family: int, bridges: list[str]) -> str:
    """FORWARD as a UFW host with libvirt's iptables rules has it: policy DROP, libvirt's
    REJECTs into and out of each bridge, UFW's chain (replies accepted) last."""
    reject = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":LIBVIRT_FWI - [0:0]", ":LIBVIRT_FWO - [0:0]", ":LIBVIRT_FWX - [0:0]",
             ":ufw-before-forward - [0:0]", "-A FORWARD -j LIBVIRT_FWX",
             "-A FORWARD -j LIBVIRT_FWI", "-A FORWARD -j LIBVIRT_FWO",
             "-A FORWARD -j ufw-before-forward"]
    for bridge in bridges:
        lines += [f"-A LIBVIRT_FWI -o {bridge} -j REJECT --reject-with {reject}",
                  f"-A LIBVIRT_FWO -i {bridge} -j REJECT --reject-with {reject}"]
    lines += ["-A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
              "COMMIT", ""]
    return "\n".join(lines)


def _bridge(host, name: str, *addrs: str) -> None:
    host.run("ip", "link", "add", name, "type", "bridge")
    for addr in addrs:
        host.run("ip", "addr", "add", addr, "dev", name, *(["nodad"] if ":" in addr else []))
    host.run("ip", "link", "set", name, "up")


def _v6(ns, addr: str, gateway: str | None = None, dev: str = "eth0") -> None:
    ns.run("ip", "addr", "add", addr, "dev", dev, "nodad")
    if gateway:
        ns.run("ip", "-6", "route", "add", "default", "via", gateway)


@pytest.fixture
def topo(netns):
    topology = Topology(netns)
    try:
        host, inet = netns, topology.inet
        _bridge(host, "virbr2", "10.0.2.1/24", "fd00:2::1/64")
        topology.guests[25] = topology.add_guest("10.0.2.5", "virbr2", "10.0.2.1", 24)
        _v6(host, f"{HOST6}/64")
        _v6(host, "fd00:10::1/64", dev="virbr1")
        _v6(inet, f"{INET6}/64")
        for n, addr, gateway in ((5, "fd00:10::5/64", "fd00:10::1"),
                                 (6, "fd00:10::6/64", "fd00:10::1"),
                                 (25, "fd00:2::5/64", "fd00:2::1")):
            _v6(topology.guests[n], addr, gateway)
        host.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        host.run("ip", "-6", "route", "add", "default", "via", INET6)
        inet.run("ip", "-6", "route", "add", "fd00::/16", "via", HOST6)
        host.run("iptables-restore", input=_seed(4, ["virbr1", "virbr2"]))
        host.run("ip6tables-restore", input=_seed(6, ["virbr1", "virbr2"]))
        settle([host, inet, *topology.guests.values()])
        inet.serve("tcp", 9000)
        yield topology
    finally:
        topology.destroy()


@pytest.fixture
def backend(topo):
    return backends.get("iptables", prefix=topo.host.prefix)


def _network(name: str, bridge: str, body: str) -> bytes:
    return (f"<network><name>{name}</name>{body}<bridge name='{bridge}'/>"
            "</network>").encode()


LAB = _network("lab", "virbr1", """<forward mode='nat'/>
  <ip address='10.0.0.1' prefix='24'><dhcp><range start='10.0.0.100' end='10.0.0.200'/>
    <host mac='52:54:00:00:00:05' ip='10.0.0.5'/></dhcp></ip>
  <ip family='ipv6' address='fd00:10::1' prefix='64'/>""")
ISO = _network("iso", "virbr2", """<ip address='10.0.2.1' prefix='24'/>
  <ip family='ipv6' address='fd00:2::1' prefix='64'/>""")


def _domain(name: str, mac: str, forwards: str) -> bytes:
    return (f"<domain><name>{name}</name><metadata><forwards xmlns='urn:kvmufw:1'>"
            f"{forwards}</forwards></metadata><devices><interface type='network'>"
            f"<source network='lab' bridge='virbr1'/><mac address='{mac}'/></interface>"
            "</devices></domain>").encode()


def _start_network(raw: bytes, backend) -> None:
    net, _ = parse_hookdata(raw)
    ops.network_started(net, raw, backend=backend)


def _start_domain(raw: bytes, backend, log=None):
    return ops.domain_started(parse_domain_xml(raw), raw, backend=backend,
                              **({"log": log} if log else {}))


# --------------------------------------------------------------------------- between networks

def test_a_guest_of_a_nat_network_cannot_reach_into_an_isolated_one(topo, backend, state_env):
    """libvirt refuses lab -> iso (LIBVIRT_FWI rejects into virbr2); our accept out of
    virbr1 without -o sits ahead of it and must not let that through, in either family,
    while the guest's way out to the internet stays open."""
    g5, iso_guest = topo.guests[5], topo.guests[25]
    iso_guest.serve("tcp", 5432)
    _start_network(LAB, backend)
    _start_network(ISO, backend)
    assert g5.ask("tcp", "203.0.113.2", 9000) == "203.0.113.1"  # masqueraded out
    assert g5.ask("tcp", INET6, 9000) == "fd00:10::5"  # routed out
    assert g5.ask("tcp", "10.0.2.5", 5432, 1.0) is None
    assert g5.ask("tcp", "fd00:2::5", 5432, 1.0) is None
    # and the other way round, started in the other order: the same
    ops.network_stopped(parse_hookdata(LAB)[0], backend=backend)
    _start_network(LAB, backend)
    assert g5.ask("tcp", "10.0.2.5", 5432, 1.0) is None
    assert g5.ask("tcp", "203.0.113.2", 9000) == "203.0.113.1"
    # starting again adds nothing (the fence reads back as written)
    net, _ = parse_hookdata(LAB)
    assert ops.network_started(net, LAB, backend=backend).payload == ""


# --------------------------------------------------------------------------- capture

VICTIM = _domain("victim", "52:54:00:00:00:05",
                 '<forward host-port="2222" guest-port="22" guest-ip="10.0.0.5,fd00:10::5"/>')
EVIL = _network("evil", "virbr3", """<forward mode='route'/>
  <ip address='10.0.0.2' prefix='29'/><ip family='ipv6' address='fd00:10::2' prefix='80'/>""")


def test_a_narrower_network_started_later_does_not_capture_a_forward(topo, backend,
                                                                      state_env):
    """libvirt 9.0 starts a route network 10.0.0.2/29 beside lab's /24: the kernel then
    routes 10.0.0.5 to the new bridge. Its start re-checks every forward reaching into
    its subnets: the victim's is withdrawn, and connections to host:2222 never reach
    the guest at 10.0.0.5 on the attacker's bridge, in either family."""
    host = topo.host
    _start_network(LAB, backend)
    topo.guests[5].serve("tcp", 22)
    _start_domain(VICTIM, backend)
    assert topo.inet.ask("tcp", "203.0.113.1", 2222) == "203.0.113.2"
    _bridge(host, "virbr3", "10.0.0.2/29", "fd00:10::2/80")
    attacker = Netns.create("evil")  # the same address as g5, on the new bridge
    topo.extra.append(attacker)
    veth(host, "vpevil", attacker, "eth0")
    host.run("ip", "link", "set", "vpevil", "master", "virbr3")
    attacker.run("ip", "addr", "add", "10.0.0.5/29", "dev", "eth0")
    attacker.run("ip", "route", "add", "default", "via", "10.0.0.2")
    _v6(attacker, "fd00:10::5/80", "fd00:10::2")
    settle([attacker])
    attacker.serve("tcp", 22)
    logs: list[str] = []
    net, _ = parse_hookdata(EVIL)
    ops.network_started(net, EVIL, backend=backend, log=logs.append)
    assert topo.inet.ask("tcp", "203.0.113.1", 2222, 1.0) is None
    assert topo.inet.ask("tcp", HOST6, 2222, 1.0) is None
    assert any(line.startswith("forwards withdrawn: domain 'victim'") for line in logs), logs
    assert "d=victim" not in backend.claims(backend.read())


# --------------------------------------------------------------------------- leases

def test_a_forward_to_an_address_dnsmasq_leased_to_another_guest_is_refused(
        topo, backend, state_env):
    """``default``-like networks have no reservations: dnsmasq's lease file says whose
    an address is (IPv4), the ports libvirt created say whose SLAAC address is (IPv6)."""
    g6 = topo.guests[6]
    slaac = eui64_address(parse_hookdata(LAB)[0].subnets[1], G6_MAC)
    _v6(g6, f"{slaac}/64")
    settle([g6])
    g6.serve("tcp", 22)
    with open(f"{state_env['KVMUFW_DNSMASQ_DIR']}/virbr1.status", "w") as fh:
        fh.write(f'[{{"ip-address": "10.0.0.6", "mac-address": "{G6_MAC}", '
                 '"hostname": "g6", "expiry-time": 2000000000}]')
    _start_network(LAB, backend)
    state.record_port("lab", G6_MAC, "g6", deleted=False)
    for host_port, guest in ((2223, "10.0.0.6"), (2224, slaac)):
        evil = _domain("evil", "52:54:00:00:00:66",
                       f'<forward host-port="{host_port}" guest-port="22" guest-ip="{guest}"/>')
        with pytest.raises(InputError, match=f"guest {guest} on network 'lab' is another "
                                             "guest's"):
            _start_domain(evil, backend)
    assert topo.inet.ask("tcp", "203.0.113.1", 2223, 1.0) is None
    assert topo.inet.ask("tcp", HOST6, 2224, 1.0) is None


# --------------------------------------------------------------------------- conntrack

UDP_GUEST = _domain("g5", "52:54:00:00:00:05",
                    '<forward proto="udp" host-port="6000" guest-port="5000" '
                    'guest-ip="10.0.0.5,fd00:10::5"/>')
SEND_FROM = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 40000))
s.settimeout(1.0)
s.sendto(b"hello", (sys.argv[1], 6000))
try:
    print(s.recvfrom(256)[0].decode().strip())
except OSError:
    sys.exit(1)
"""


def _udp_from_40000(ns, host: str) -> str | None:
    proc = ns.run(sys.executable, "-c", SEND_FROM, host, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


@pytest.mark.parametrize("host", ["203.0.113.1", HOST6])
def test_removing_a_forward_ends_its_conntrack_flows(topo, backend, state_env, host):
    """A remote UDP flow that keeps sending would outlive the guest's stop (conntrack
    keeps translating it, UFW accepts it as established) and reach whoever has that
    address next. The stop ends it."""
    topo.guests[5].serve("udp", 5000)
    _start_network(LAB, backend)
    _start_domain(UDP_GUEST, backend)
    assert _udp_from_40000(topo.inet, host) is not None
    ops.domain_stopped("g5", backend=backend)
    assert _udp_from_40000(topo.inet, host) is None


# --------------------------------------------------------------------------- kept, static, open

def test_a_guest_reaches_no_isolated_network_after_its_network_was_kept_for_a_port(
        topo, backend, state_env):
    """lab's
    ``updated`` brings a forward of lab's own on host port 2222, which the guest
    ``victim`` holds: lab's rules are kept, rightly. Then ``iso`` (isolated) starts:
    lab's accept out of virbr1 to anywhere gets no fence for virbr2, and g5 on lab
    opens 10.0.2.5:5432 on iso, in both families."""
    g5, iso_guest = topo.guests[5], topo.guests[25]
    iso_guest.serve("tcp", 5432)
    _start_network(LAB, backend)
    _start_domain(VICTIM, backend)
    updated = LAB.replace(b"<bridge", b"<metadata>" + FORWARDS.format(
        '<kvmufw:forward host-port="2222" guest-port="22" guest-ip="10.0.0.6"/>').encode()
        + b"</metadata><bridge")
    net, _ = parse_hookdata(updated)
    said: list[str] = []
    ops.network_port(net, updated, None, False, backend=backend, log=said.append)
    assert any("keeping the current rules" in line for line in said), said
    _start_network(ISO, backend)
    assert g5.ask("tcp", "203.0.113.2", 9000) == "203.0.113.1"  # its way out stays
    assert g5.ask("tcp", "10.0.2.5", 5432, 1.0) is None
    assert g5.ask("tcp", "fd00:2::5", 5432, 1.0) is None


def _static(topo, address: str, owner: str) -> str:
    """g6 runs with the static ``address`` on lab (no ``<dhcp><host>``, no dnsmasq
    lease), libvirt created its port for ``owner`` (recorded as port-created records
    it), and the host's neighbour table has the address at g6's MAC (what ARP or
    neighbour discovery give the host once g6 has said anything). g6's MAC."""
    g6 = topo.guests[6]
    mac = g6.run("cat", "/sys/class/net/eth0/address").stdout.strip()
    state.record_port("lab", mac, owner, False)
    topo.host.run("ip", "neigh", "replace", address, "lladdr", mac, "dev", "virbr1",
                  "nud", "reachable")
    g6.serve("tcp", 22)
    return mac


def _host_address(address: str) -> str:
    return HOST6 if ":" in address else "203.0.113.1"


@pytest.mark.parametrize("address", ["10.0.0.6", "fd00:10::6"])
def test_a_domain_cannot_forward_to_another_guests_static_address(
        topo, backend, state_env, address):
    """10.0.0.6 is a static address, fd00:10::6 not the EUI-64 of g6's MAC (what every
    guest with RFC 7217 stable-privacy addresses, Debian's and Ubuntu's default,
    autoconfigures): no lease or reservation names them. ``evil``, another guest on
    lab, declares that guest-ip to publish g6's port 22 on host port 2223: refused in
    one line naming the forward, the address and whose it is, by the host's neighbour
    table (the address at g6's MAC) and libvirt's port (that MAC is ``victim6``'s)."""
    _start_network(LAB, backend)
    mac = _static(topo, address, "victim6")
    evil = _domain("evil", "52:54:00:00:00:66",
                   f'<forward host-port="2223" guest-port="22" guest-ip="{address}"/>')
    with pytest.raises(InputError, match=re.escape(
            f"domain 'evil': forward tcp 2223->22: guest {address} on network 'lab' is "
            f"another guest's (the host's neighbour table has it at MAC {mac}, the MAC "
            "of domain 'victim6''s port)")):
        _start_domain(evil, backend)
    assert topo.inet.ask("tcp", _host_address(address), 2223, 1.0) is None


@pytest.mark.parametrize("address", ["10.0.0.6", "fd00:10::6"])
def test_a_domain_forwards_to_its_own_static_address(topo, backend, state_env, address):
    """The same static address, when the guest forwarding to it is the one whose MAC the
    neighbour table has it at: the forward is applied and reaches g6."""
    _start_network(LAB, backend)
    mac = _static(topo, address, "g6")
    own = _domain("g6", mac, f'<forward host-port="2223" guest-port="22" guest-ip="{address}"/>')
    _start_domain(own, backend)
    assert topo.inet.ask("tcp", _host_address(address), 2223) is not None


@pytest.mark.parametrize("event", ["port-created", "restore"])
@pytest.mark.parametrize("address", ["10.0.0.6", "fd00:10::6"])
def test_a_forward_to_a_static_address_is_withdrawn_when_its_guests_port_appears(
        topo, backend, state_env, address, event):
    """``evil`` forwarded to the address while no port said whose it is (g6 not yet
    started: the address was nobody's); g6's port-created re-checks every guest whose
    forwards reach into lab (and ``restore``, from our state alone, every owner): the
    neighbour table has the address at the port's MAC, and ``evil``'s forward goes at
    once, with one line saying why."""
    _start_network(LAB, backend)
    g6 = topo.guests[6]
    mac = g6.run("cat", "/sys/class/net/eth0/address").stdout.strip()
    topo.host.run("ip", "neigh", "replace", address, "lladdr", mac, "dev", "virbr1",
                  "nud", "reachable")
    g6.serve("tcp", 22)
    evil = _domain("evil", "52:54:00:00:00:66",
                   f'<forward host-port="2223" guest-port="22" guest-ip="{address}"/>')
    _start_domain(evil, backend)
    assert topo.inet.ask("tcp", _host_address(address), 2223) is not None  # the hole, then
    said: list[str] = []
    why = (f"domain 'evil': forward tcp 2223->22: guest {address} on network 'lab' is "
           "another guest's")
    if event == "restore":
        state.record_port("lab", mac, "victim6", False)
        assert any(line.startswith(why) for line in ops.restore(backend=backend).problems)
    else:
        net, _ = parse_hookdata(LAB)
        ops.network_port(net, LAB, NetworkPort("victim6", None, mac, "virbr1"), False,
                         backend=backend, log=said.append)
        assert any(line.startswith(f"forwards withdrawn: {why}") for line in said), said
    assert "d=evil" not in backend.claims(backend.read())
    assert topo.inet.ask("tcp", _host_address(address), 2223, 1.0) is None


RECEIVE = """import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5433))
print("ready", flush=True)
s.settimeout(float(sys.argv[2]))
try:
    print(s.recvfrom(99)[1][0], flush=True)
except OSError:
    print("nothing", flush=True)
"""
SEND = """import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(b"x", (sys.argv[1], 5433))
"""


def _datagram_reaches(sender, receiver, address: str) -> bool:
    """Whether a datagram ``sender`` sends to ``address``:5433 arrives at ``receiver``
    (one way: no answer needed, as a UDP attack or a TCP SYN needs none)."""
    listen = receiver.spawn(sys.executable, "-c", RECEIVE, address, "2")
    assert listen.stdout.readline().strip() == "ready"
    sender.run(sys.executable, "-c", SEND, address)
    return listen.stdout.readline().strip() != "nothing"


OPEN = (b"<network><name>lab</name><forward mode='open'/><bridge name='virbr1'/>"
        b"<ip address='10.0.0.1' prefix='24'/>"
        b"<ip family='ipv6' address='fd00:10::1' prefix='64'/></network>")


@pytest.mark.parametrize("address", ["10.0.0.5", "fd00:10::5"])
def test_an_isolated_guest_sends_nothing_into_an_open_network(
        topo, backend, state_env, address):
    """libvirt adds no rule for an open network, and refuses everything out of an
    isolated one (``LIBVIRT_FWO -i virbr2 -j REJECT``). Ours for the open network ``lab``
    accept ``-d 10.0.0.0/24 -o virbr1`` from any interface at position 1: g25 on the
    isolated ``iso`` then sends datagrams (or SYNs) to g5 on lab, in both families. The
    fences of ``plan_network`` guard only the way out of a network, not the way in
    (replies are stopped by lab's fence: the hole is one way)."""
    host = topo.host
    host.run("iptables-restore", input=_seed(4, ["virbr2"]))  # libvirt: nothing for open
    host.run("ip6tables-restore", input=_seed(6, ["virbr2"]))
    assert not _datagram_reaches(topo.guests[25], topo.guests[5], address)  # libvirt's own
    _start_network(OPEN, backend)
    _start_network(ISO, backend)
    assert not _datagram_reaches(topo.guests[25], topo.guests[5], address)
