"""Scale by construction, in a network namespace this test creates: a stop deletes in
short chains and rewrites long ones, status finds each forward of many guests, sock_diag
lists the listeners /proc lists (timings belong to benchmarks/run.py)."""

import sys

from kvmufw_hook import ops
from kvmufw_hook.backends.iptables import (
    IptablesBackend,
    compose,
    transition,
)
from kvmufw_hook.commands import status

GUESTS = 60


def network_xml(hosts: int) -> bytes:
    dhcp = "".join(f"<host mac='52:54:00:90:00:{i:02x}' ip='10.90.0.{10 + i}'/>"
                   for i in range(hosts))
    return (f"<network><name>bench</name><forward mode='nat'/><bridge name='virbr9'/>"
            f"<ip address='10.90.0.1' prefix='24'><dhcp>{dhcp}</dhcp></ip></network>").encode()


def domain_xml(i: int, forwards: int) -> bytes:
    lines = "".join(f'<kvmufw:forward host-port="{20000 + 100 * i + j}" guest-port="{22 + j}"/>'
                    for j in range(forwards))
    return (f"<domain><name>g{i:03d}</name><metadata><kvmufw:forwards "
            f'xmlns:kvmufw="urn:kvmufw:1">{lines}</kvmufw:forwards></metadata><devices>'
            f"<interface type='network'><mac address='52:54:00:90:00:{i:02x}'/>"
            f"<source network='bench' bridge='virbr9'/></interface></devices></domain>").encode()


# --------------------------------------------------------------------------- kernel

def test_a_stop_deletes_in_short_chains_and_rewrites_long_ones(netns, state_env):
    """iptables-nft finds each rule to delete by comparing it with every rule of its
    chain: a few deletions stay deletions, thousands rewrite the chain instead."""
    backend = IptablesBackend(prefix=netns.prefix)
    net = network_xml(GUESTS)
    doms = [domain_xml(i, 2) for i in range(GUESTS - 1)] + [domain_xml(GUESTS - 1, 90)]
    ops.replay([net], doms, backend=backend)
    before = backend.read()[4]
    small = ops.apply_rules({"d=g000": ()}, backend=backend).payload
    assert ":KVMUFW-" not in small and small.count("\n-D ") == 10
    big = ops.apply_rules({f"d=g{GUESTS - 1:03d}": ()}, backend=backend).payload
    assert ":KVMUFW-FORWARD - [0:0]" in big and "\n-D " not in big
    wanted = compose(before, {"d=g000": (), f"d=g{GUESTS - 1:03d}": ()})
    assert backend.read()[4].ours() == wanted
    assert transition(backend.read()[4], wanted) == ""


def test_status_finds_each_forward_of_many_guests(netns, state_env, monkeypatch):
    backend = IptablesBackend(prefix=netns.prefix)
    monkeypatch.setattr("kvmufw_hook.commands.status.default_backend", lambda: backend)
    ops.replay([network_xml(GUESTS)], [domain_xml(i, 10) for i in range(GUESTS)],
               backend=backend)
    victim = next(l for l in backend.read()[4].ours()["nat"]["KVMUFW-PREROUTING"]
                  if "kvmufw:d=g007," in l and "--dport 20703 " in l)
    netns.run("iptables", "-t", "nat", "-D", *victim[3:].replace('"', "").split())
    report = status.collect()
    rows = {(d["name"], f["host_port"]): f["present"] for d in report["domains"]
            for f in d["forwards"]}
    assert len(rows) == GUESTS * 10
    assert [k for k, present in rows.items() if not present] == [("g007", "20703")]
    assert all(n["rules_present"] for n in report["networks"])


def test_sock_diag_lists_the_listeners_proc_lists(netns):
    """host.py asks sock_diag for listening TCP sockets (/proc/net/tcp* walks every
    connection): the same sockets as /proc, connected ones left out."""
    from conftest import ROOT
    code = """
import socket, sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import host, sockdiag
v4 = socket.socket(); v4.bind(("127.0.0.1", 2222)); v4.listen()
dual = socket.socket(socket.AF_INET6); dual.bind(("::", 8080)); dual.listen()
v6 = socket.socket(socket.AF_INET6)
v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); v6.bind(("::1", 9090)); v6.listen()
client = socket.socket(); client.connect(("127.0.0.1", 2222)); peer = v4.accept()
# "/proc/self/.." is /proc, but not the default: read_listeners parses the files then
proc = sorted((str(l.addr), l.port, l.inode) for l in host.read_listeners("/proc/self/..")
              if l.proto == "tcp")
diag = sorted((str(host.ip_address(a)), p, i) for a, p, i, *_ in sockdiag.tcp_listeners())
used = sorted((str(l.addr), l.port) for l in host.read_listeners() if l.proto == "tcp")
print(proc == diag, used)
"""
    out = netns.run(sys.executable, "-c", code, str(ROOT)).stdout
    assert out == "True [('127.0.0.1', 2222), ('::', 8080), ('::1', 9090)]\n"
