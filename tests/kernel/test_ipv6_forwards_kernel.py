"""IPv6 forwards in the kernel, against what someone who writes a domain's or a network's
XML can make the hooks do: rules present once in ip6tables whatever the address text,
removed by a stop, put back by restore and replay, claims read back whole, another
network's guests unreachable, a host service's port kept in the families it listens in.
The real shims (hooks/, as libvirt runs them) or ops with ``backends.get("iptables", prefix=…)``
run inside a network namespace the test creates; the pure side is
tests/unit/test_ipv6_policy.py.
"""

import re
from ipaddress import ip_address

import pytest
from dualstack import DB_MAC, EVIL_MAC, WEB1_MAC, WIDE, dom_xml, net_xml, wide_with_forward
from hookrun import run_hook

from kvmufw_hook import backends, ops, state
from kvmufw_hook.errors import InputError
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml

# --------------------------------------------------------------------------- the kernel

def ns_backend(netns):
    return backends.get("iptables", prefix=netns.prefix)


def start_net(netns, raw: bytes):
    ops.network_started(parse_network_xml(raw), raw, ns_backend(netns))


def start_dom(netns, raw: bytes):
    return ops.domain_started(parse_domain_xml(raw), raw, ns_backend(netns))


def ours6(netns) -> list[str]:
    return [l for l in netns.run("ip6tables-save").stdout.splitlines() if "kvmufw:" in l]


def ours4(netns) -> list[str]:
    return [l for l in netns.save().splitlines() if "kvmufw:" in l]


def present(netns, name: str, net_raw: bytes, dom_raw: bytes) -> bool:
    backend = ns_backend(netns)
    net = parse_network_xml(net_raw)
    rules = owner_rules(parse_domain_xml(dom_raw), {net.name: net})
    return backend.present(backend.read((4, 6)), rules)


@pytest.mark.parametrize("source", ["::/0", "0.0.0.0/0", "0.0.0.0/0,::/0"])
def test_a_whole_family_source_is_present_and_not_rewritten(netns, state_env, source):
    """source="::/0" renders ``-s ::/0``, which ip6tables-save never prints: status
    called the forward missing and every apply deleted and re-added it."""
    start_net(netns, net_xml())
    dom = dom_xml("web1", WEB1_MAC, f'host-port="2222" guest-port="22" source="{source}"')
    start_dom(netns, dom)
    assert present(netns, "web1", net_xml(), dom)
    assert start_dom(netns, dom).payload == ""


def test_ipv4_compatible_source_text_matches_ip6tables_save(netns, state_env):
    start_net(netns, net_xml())
    dom = dom_xml("web1", WEB1_MAC, 'host-port="2222" guest-port="22" '
                  'source="::10.0.0.0/104"')
    start_dom(netns, dom)
    assert present(netns, "web1", net_xml(), dom)
    assert start_dom(netns, dom).payload == ""


def test_non_canonical_ipv6_text_in_xml_is_present_and_idempotent(netns, state_env):
    """Uppercase, leading zeros, :: anywhere: parsed to one address, rendered as
    ip6tables-save prints it, so nothing is re-added forever."""
    raw = net_xml(v6="FD00:0010:0000:0000::0001", v6hosts="")
    start_net(netns, raw)
    dom = dom_xml("web1", WEB1_MAC, 'host-port="2222" guest-port="22" '
                  'guest-ip="FD00:10:0:0:0:0:0:20" source="2001:0DB8:0000::/32,'
                  '2001:DB8:0:1:1:1:1:1"')
    start_dom(netns, dom)
    assert any("[fd00:10::20]:22" in l for l in ours6(netns))
    assert present(netns, "web1", raw, dom)
    assert start_dom(netns, dom).payload == ""


def test_the_longest_tag_with_an_ipv6_subnet_reads_back_whole(netns, state_env):
    """A hashed owner, a 15-byte bridge and the longest IPv6 subnet text: the tag must
    come back from ip6tables-save exactly (a cut tag is a rule nobody can remove)."""
    long_name = "x" * 200
    v6 = "fd12:3456:789a:bcde:f012:3456:789a:bc01"
    raw = net_xml(bridge="virbr-abcdefghi", v6=v6)
    raw = raw.replace(b"prefix='64'", b"prefix='120'").replace(
        b"fd00:10::20", b"fd12:3456:789a:bcde:f012:3456:789a:bc20").replace(
        b"fd00:10::30", b"fd12:3456:789a:bcde:f012:3456:789a:bc30")
    start_net(netns, raw)
    dom = dom_xml(long_name, EVIL_MAC, 'host-port="2222" guest-port="22" '
                  'guest-ip="fd12:3456:789a:bcde:f012:3456:789a:bc66"')
    start_dom(netns, dom)
    lines = [l for l in ours6(netns) if "-j DNAT" in l]
    assert lines and all("s=fd12:3456:789a:bcde:f012:3456:789a:bc00/120\"" in l
                         for l in lines), lines
    assert present(netns, long_name, raw, dom)
    hook(netns, state_env, "qemu", [long_name, "stopped", "end", "-"], dom)
    assert not [l for l in ours6(netns) if "d=x" in l]


def hook(netns, env, kind, argv, stdin):
    proc = run_hook(kind, argv, stdin, env, netns)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_a_guest_stop_run_as_libvirt_runs_it_removes_its_ipv6_rules(netns, state_env):
    """The stop path reads IPv6 only when a netlink probe finds our chains there: the
    real shim, with the host's backend, inside the namespace."""
    hook(netns, state_env, "network", ["lab", "started", "begin", "-"], net_xml())
    dom = dom_xml("web1", WEB1_MAC, 'host-port="2222" guest-port="22"')
    hook(netns, state_env, "qemu", ["web1", "start", "begin", "-"], dom)
    assert any("d=web1" in l for l in ours6(netns)) and any("d=web1" in l for l in ours4(netns))
    hook(netns, state_env, "qemu", ["web1", "stopped", "end", "-"], dom)
    assert not [l for l in ours6(netns) + ours4(netns) if "d=web1" in l]
    hook(netns, state_env, "network", ["lab", "stopped", "end", "-"], net_xml())
    assert ours6(netns) == [] and ours4(netns) == []
    assert "KVMUFW" not in netns.run("ip6tables-save").stdout


def test_a_v6_only_guest_stop_removes_it_when_ipv4_holds_nothing_of_ours(netns, state_env):
    """Only IPv6 rules of ours anywhere (an IPv6-only network): stop still finds them."""
    raw = (b"<network><name>six</name><forward mode='route'/><bridge name='virbr6'/>"
           b"<ip family='ipv6' address='fd00:6::1' prefix='64'/></network>")
    hook(netns, state_env, "network", ["six", "started", "begin", "-"], raw)
    dom = dom_xml("web6", EVIL_MAC, 'host-port="2222" guest-ip="fd00:6::66"', network="six")
    hook(netns, state_env, "qemu", ["web6", "start", "begin", "-"], dom)
    assert any("d=web6" in l for l in ours6(netns))
    hook(netns, state_env, "qemu", ["web6", "stopped", "end", "-"], dom)
    assert not [l for l in ours6(netns) if "d=web6" in l]
    hook(netns, state_env, "network", ["six", "stopped", "end", "-"], raw)
    assert "KVMUFW" not in netns.run("ip6tables-save").stdout


def test_replay_removes_stale_ipv6_rules_and_flush_clears_both(netns, state_env):
    start_net(netns, net_xml())
    dom = dom_xml("web1", WEB1_MAC, 'host-port="2222" guest-port="22"')
    start_dom(netns, dom)
    backend = ns_backend(netns)
    ops.replay([net_xml()], [], backend=backend)  # web1 no longer runs
    assert not [l for l in ours6(netns) if "d=web1" in l]
    assert [l for l in ours6(netns) if "n=lab" in l]
    ops.flush(backend)
    assert "KVMUFW" not in netns.run("ip6tables-save").stdout + netns.save()


def test_restore_puts_ipv6_rules_back(netns, state_env):
    start_net(netns, net_xml())
    start_dom(netns, dom_xml("web1", WEB1_MAC, 'host-port="2222" guest-port="22"'))
    wanted = sorted(ours6(netns))
    for table in ("nat", "filter"):
        netns.run("ip6tables", "-t", table, "-F")
        netns.run("ip6tables", "-t", table, "-X")
    ops.restore(backend=ns_backend(netns))
    assert sorted(ours6(netns)) == wanted


def test_an_ipv6_kernel_claim_blocks_ipv6_only(netns, state_env):
    """A holder the state does not know (its file lost): its ip6tables DNAT still holds
    the port in IPv6, and only there."""
    start_net(netns, net_xml())
    start_dom(netns, dom_xml("db", DB_MAC, 'host-port="8080" guest-ip="fd00:10::30"'))
    state.forget_domain("db")
    with pytest.raises(InputError, match="already forwarded by domain 'db'"):
        start_dom(netns, dom_xml("web1", WEB1_MAC, 'host-port="8080" guest-ip="fd00:10::20"'))
    assert not [l for l in ours6(netns) + ours4(netns) if "d=web1" in l]  # nothing half
    start_dom(netns, dom_xml("web1", WEB1_MAC, 'host-port="8080" guest-ip="10.0.0.20"'))
    assert any("d=web1" in l and "--dport 8080" in l for l in ours4(netns))


def test_a_guest_with_only_ipv4_does_not_block_another_guests_ipv6_forward(netns,
                                                                          state_env):
    """'v4only' has no IPv6 reservation: its forward without guest-ip takes 8080 in IPv4
    only (its rules say so). web1's forward of 8080 to its own IPv6 address takes a port
    nobody holds, and must start."""
    start_net(netns, net_xml(v4hosts=f"<host mac='{EVIL_MAC}' name='v4only' ip='10.0.0.66'/>"))
    start_dom(netns, dom_xml("v4only", EVIL_MAC, 'host-port="8080"'))
    assert not [l for l in ours6(netns) if "d=v4only" in l]
    start_dom(netns, dom_xml("web1", WEB1_MAC, 'host-port="8080" guest-ip="fd00:10::20"'))
    assert any("d=web1" in l and "--dport 8080" in l for l in ours6(netns))


# --------------------------------------------------------------------------- libvirt's nft

LIBVIRT_IP6 = """table ip6 libvirt_network {
  chain forward {
    type filter hook forward priority filter; policy accept;
    counter jump guest_cross
    counter jump guest_input
    counter jump guest_output
  }
  chain guest_output {
    iif "virbr1" ip6 saddr fd00:10::/64 counter accept
    iif "virbr1" counter reject
  }
  chain guest_input {
    oif "virbr1" ip6 daddr fd00:10::/64 ct state related,established counter accept
    oif "virbr1" counter reject
  }
  chain guest_cross {
    iif "virbr1" oif "virbr1" counter accept
  }
}
"""
LIBVIRT_IP = LIBVIRT_IP6.replace("ip6 ", "ip ").replace("fd00:10::/64", "10.0.0.0/24")


def test_libvirt_nft_ip6_table_gets_our_accepts(netns, state_env):
    """libvirt's nftables backend keeps IPv6 in ``table ip6 libvirt_network`` (the same
    chains as its ``ip`` table). A NATed IPv6 subnet's guest_input accepts replies only,
    then rejects: the accept that lets a DNAT'd connection through must be there too."""
    netns.run("ip", "link", "add", "virbr1", "type", "bridge")
    netns.run("nft", "-f", "-", input=LIBVIRT_IP + LIBVIRT_IP6)
    start_net(netns, net_xml(nat="<nat ipv6='yes'/>"))
    start_dom(netns, dom_xml("web1", WEB1_MAC, 'host-port="2222" guest-port="22"'))
    v4 = netns.run("nft", "list", "table", "ip", "libvirt_network").stdout
    assert "kvmufw:d=web1" in v4  # the IPv4 accept is there
    v6 = netns.run("nft", "list", "table", "ip6", "libvirt_network").stdout
    assert re.search(r'oif "virbr1" ip6 daddr fd00:10::20 tcp dport 22 ct status dnat '
                     r'accept comment "kvmufw:d=web1', v6), v6


def test_a_v6_claim_read_from_the_kernel_keeps_its_host_ip(netns, state_env):
    """kernel_claims reads ``-d`` of an IPv6 DNAT: a claim on one IPv6 host-ip leaves
    another host-ip's port free."""
    for a in ("2001:db8::1/128", "2001:db8::2/128"):
        netns.run("ip", "addr", "add", a, "dev", "lo")
    start_net(netns, net_xml())
    start_dom(netns, dom_xml("db", DB_MAC, 'host-port="8080" host-ip="2001:db8::1"'))
    state.forget_domain("db")
    claims = ns_backend(netns).claims(ns_backend(netns).read((4, 6)))
    assert [s.host_ip for s in claims["d=db"]] == [ip_address("2001:db8::1")]
    start_dom(netns, dom_xml("web1", WEB1_MAC, 'host-port="8080" host-ip="2001:db8::2"'))
    with pytest.raises(InputError, match="already forwarded"):
        start_dom(netns, dom_xml("web1", WEB1_MAC, 'host-port="8080" host-ip="2001:db8::1"'))



# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("forward", [
    'proto="udp" host-port="6000-6002" guest-port="5000-5002"',
    'proto="sctp" host-port="3868" guest-port="3869"',
    'proto="tcp" host-port="2222" guest-port="22" source="2001:db8:0:1::/64,::1:2:3:4"',
])
def test_ipv6_forwards_of_every_kind_are_present_once_applied(netns, state_env, forward):
    start_net(netns, net_xml())
    dom = dom_xml("web1", WEB1_MAC, forward + ' guest-ip="fd00:10::20"')
    start_dom(netns, dom)
    assert present(netns, "web1", net_xml(), dom)
    assert start_dom(netns, dom).payload == ""


@pytest.mark.parametrize("nat", ["", "<nat ipv6='yes'/>"])
def test_an_ipv6_network_applies_once(netns, state_env, nat):
    raw = net_xml(nat=nat)
    start_net(netns, raw)
    assert ours6(netns)
    assert ops.network_started(parse_network_xml(raw), raw, ns_backend(netns)).payload == ""


def test_restore_jumps_only_puts_the_ipv6_jumps_first_again(netns, state_env):
    """libvirt puts its jumps at position 1 in ip6tables too when it reloads."""
    from hookrun import cli
    hook(netns, state_env, "network", ["lab", "started", "begin", "-"], net_xml())
    netns.run("ip6tables", "-N", "LIBVIRT_FWX")
    netns.run("ip6tables", "-I", "FORWARD", "1", "-j", "LIBVIRT_FWX")
    proc = cli(netns, state_env, "restore", "--jumps-only")
    assert proc.returncode == 0, proc.stderr
    first = netns.run("ip6tables", "-S", "FORWARD").stdout.splitlines()[1]
    assert first == "-A FORWARD -j KVMUFW-FORWARD"


SERVE6 = ("import socket,sys\n"
          "s=socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET,"
          " socket.SO_REUSEADDR, 1); s.bind(('::', int(sys.argv[1]))); s.listen(4)\n"
          "print('ready', flush=True)\n"
          "while True:\n"
          "    c, a = s.accept(); c.sendall(a[0].encode()); c.close()\n")
ASK6 = ("import socket,sys\n"
        "s=socket.socket(socket.AF_INET6); s.settimeout(1.5)\n"
        "try:\n"
        "    s.connect((sys.argv[1], int(sys.argv[2]))); print(s.recv(99).decode())\n"
        "except OSError:\n"
        "    sys.exit(1)\n")


def v6_topology(host):
    """host: eth0 2001:db8:1::1 to ``inet`` (::2); virbr1 fd00:10::1/64 with guest g20
    (fd00:10::20); virbr9 fd00::1/8 with nobody; IPv6 forwarding on, FORWARD DROP (UFW)."""
    from netlab import Netns, veth
    inet, g20 = Netns.create("inet6"), Netns.create("g20")
    for bridge, addr in (("virbr1", "fd00:10::1/64"), ("virbr9", "fd00::1/8")):
        host.run("ip", "link", "add", bridge, "type", "bridge")
        host.run("ip", "addr", "add", addr, "dev", bridge, "nodad")
        host.run("ip", "link", "set", bridge, "up")
    veth(host, "eth0", inet, "eth0")
    host.run("ip", "addr", "add", "2001:db8:1::1/64", "dev", "eth0", "nodad")
    inet.run("ip", "addr", "add", "2001:db8:1::2/64", "dev", "eth0", "nodad")
    inet.run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
    veth(host, "vp20", g20, "eth0")
    host.run("ip", "link", "set", "vp20", "master", "virbr1")
    g20.run("ip", "addr", "add", "fd00:10::20/64", "dev", "eth0", "nodad")
    g20.run("ip", "-6", "route", "add", "default", "via", "fd00:10::1")
    host.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    host.run("ip6tables", "-P", "FORWARD", "DROP")
    server = g20.spawn("/usr/bin/python3", "-c", SERVE6, "22")
    assert server.stdout.readline().strip() == "ready"
    return inet, g20


def test_a_guest_on_a_wider_network_cannot_reach_another_networks_guest(netns, state_env):
    """The same, with packets: web1's own forward reaches it; nothing from outside
    reaches web1's port 22 through a forward of evil's, whatever the hooks decide."""
    inet, g20 = v6_topology(netns)
    try:
        start_net(netns, net_xml())
        start_net(netns, WIDE)

        def ask(port):
            proc = inet.run("/usr/bin/python3", "-c", ASK6, "2001:db8:1::1", str(port),
                            check=False)
            return proc.stdout.strip() if proc.returncode == 0 else None

        # the control: web1's own forward reaches it (once the links are up)
        start_dom(netns, dom_xml("web1", WEB1_MAC, 'host-port="2223" guest-port="22" '
                                 'guest-ip="fd00:10::20"'))
        assert any(ask(2223) == "2001:db8:1::2" for _ in range(5))
        assert ask(2222) is None
        try:
            start_dom(netns, dom_xml("evil", EVIL_MAC, 'host-port="2222" guest-port="22" '
                                     'guest-ip="fd00:10::20"', network="wide"))
        except InputError:
            pass  # refused: the right answer
        assert ask(2222) is None, "evil's forward reached web1 on lab"
    finally:
        g20.destroy()
        inet.destroy()


def test_a_network_started_with_a_forward_into_another_networks_subnet_is_refused(
        netns, state_env):
    start_net(netns, net_xml())
    with pytest.raises(InputError, match="network 'lab'"):
        start_net(netns, wide_with_forward())
    assert not [l for l in ours6(netns) if "n=wide" in l]


def test_one_owners_bad_address_does_not_stop_replay_for_everyone(netns, state_env):
    """A running guest's live metadata is written without a hook (virsh metadata --live):
    the next replay (UFW's reload runs it) planned the zone index, ip6tables-restore
    refused the whole payload, and no owner got its rules back."""
    good = dom_xml("web1", WEB1_MAC, 'host-port="2222" guest-port="22"')
    evil = dom_xml("evil", EVIL_MAC, 'host-port="2223" guest-port="22" '
                   'guest-ip="fd00:10::20%evil"')
    result = ops.replay([net_xml()], [good, evil], backend=ns_backend(netns))
    assert any("evil" in p for p in result.problems), result.problems
    assert any("d=web1" in l for l in ours6(netns)) and any("d=web1" in l for l in ours4(netns))



# --------------------------------------------------------------------------- host services

LISTEN = ("import socket,sys\n"
          "fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
          "s = socket.socket(fam)\n"
          "if fam == socket.AF_INET6:\n"
          "    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(sys.argv[3]))\n"
          "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)\n"
          "print('ready', flush=True); import time; time.sleep(120)\n")


@pytest.mark.parametrize("bind,v6only,refused,allowed", [
    ("::", "1", 'guest-ip="fd00:10::20"', 'guest-ip="10.0.0.20"'),
    ("0.0.0.0", "0", 'guest-ip="10.0.0.20"', 'guest-ip="fd00:10::20"'),
    ("::", "0", 'guest-ip="fd00:10::20"', None),
    ("::", "0", 'guest-ip="10.0.0.20"', None),
    ("fd00:10::1", "1", 'guest-ip="fd00:10::20"', 'guest-ip="10.0.0.20"'),
])
def test_a_host_service_keeps_its_port_in_the_families_it_listens_in(netns, state_env, bind,
                                                                     v6only, refused, allowed):
    """A root service on port 8443: a forward is refused only in the families the socket
    takes (``::`` without IPV6_V6ONLY takes IPv4 too)."""
    netns.run("ip", "link", "add", "virbr1", "type", "bridge")
    netns.run("ip", "addr", "add", "fd00:10::1/64", "dev", "virbr1", "nodad")
    start_net(netns, net_xml())
    server = netns.spawn("/usr/bin/python3", "-c", LISTEN, bind, "8443", v6only)
    assert server.stdout.readline().strip() == "ready"
    with pytest.raises(InputError, match="used by a host service"):
        start_dom(netns, dom_xml("web1", WEB1_MAC, f'host-port="8443" {refused}'))
    assert not [l for l in ours6(netns) + ours4(netns) if "d=web1" in l]
    if allowed:
        start_dom(netns, dom_xml("web1", WEB1_MAC, f'host-port="8443" {allowed}'))
        assert [l for l in ours6(netns) + ours4(netns) if "d=web1" in l]


@pytest.mark.parametrize("event", ["port-created", "network-restarted"])
def test_a_forward_gaining_ipv6_later_never_takes_a_host_services_ipv6_port(netns,
                                                                           state_env, event):
    """web1 starts with an IPv4 reservation only: its forward of 8443 takes IPv4 only,
    and the host check looked at IPv4 only. A root service listens on [::]:8443 (IPv6
    only). Then web1 gets an IPv6 reservation (net-update); the next port-created (a
    daemon restart re-creates every port) or network restart re-plans web1 and must not
    put a DNAT on the service's IPv6 port."""
    server = netns.spawn("/usr/bin/python3", "-c", LISTEN, "::", "8443", "1")
    assert server.stdout.readline().strip() == "ready"
    before = net_xml(web1_v6=False)
    start_net(netns, before)
    start_dom(netns, dom_xml("web1", WEB1_MAC, 'host-port="8443"'))
    assert [l for l in ours4(netns) if "d=web1" in l]
    assert not [l for l in ours6(netns) if "d=web1" in l]
    after = net_xml()  # web1's IPv6 reservation added
    if event == "port-created":
        from kvmufw_hook.model import NetworkPort
        ops.network_port(parse_network_xml(after), after,
                         NetworkPort("web1", None, WEB1_MAC, "virbr1"), False,
                         ns_backend(netns))
    else:
        ops.network_stopped(parse_network_xml(before), ns_backend(netns))
        start_net(netns, after)
    assert not [l for l in ours6(netns) if "d=web1" in l and "--dport 8443" in l]
