"""Scale and speed by construction: what keeps hooks, status and replay fast, checked
for behaviour (timings belong to benchmarks/run.py; these machines are too noisy)."""

import os
import re
import sys
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmufw_hook import ops, policy, status
from kvmufw_hook.backends.iptables import (
    IptablesBackend,
    Snapshot,
    comment,
    compose,
    transition,
)
from kvmufw_hook.errors import InputError
from kvmufw_hook.model import ForwardSpec, PortRange
from kvmufw_hook.plan import check_conflicts
from kvmufw_hook.process import communicate

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


# --------------------------------------------------------------------------- process

def test_communicate_feeds_and_drains_large_streams_without_deadlock():
    data = os.urandom(3 * 1024 * 1024)  # far beyond a pipe's buffer, both ways
    status_, out, err = communicate(["cat"], data)
    assert (status_, out, err) == (0, data, b"")
    status_, out, err = communicate(["sh", "-c", "cat >&2; echo done; exit 3"], data)
    assert (status_, out, err) == (3, b"done\n", data)


def test_communicate_never_hands_over_the_callers_stdin():
    status_, out, _err = communicate(["cat"])  # /dev/null: returns at once
    assert (status_, out) == (0, b"")


def test_communicate_when_the_command_stops_reading_missing_or_slow():
    status_, _out, _err = communicate(["true"], b"x" * (1 << 20))  # EPIPE is not an error
    assert status_ == 0
    with pytest.raises(FileNotFoundError):
        communicate(["kvmufw-no-such-command"])
    with pytest.raises(TimeoutError):
        communicate([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert communicate(["sh", "-c", "kill -9 $$"])[0] == -9


# --------------------------------------------------------------------------- comments

OLD_COMMENT = re.compile(r'--comment (?:"((?:[^"\\]|\\.)*)"|(\S+))')


def old_comment(line: str):
    match = OLD_COMMENT.search(line)
    if not match:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


@given(st.lists(st.sampled_from(['"', "\\", " ", "a", "--comment ", "kvmufw:d=x,", ","]),
                max_size=14))
def test_comment_reads_tags_as_the_regular_expression_did(parts):
    line = "-A KVMUFW-FORWARD " + "".join(parts)
    ours = [c if c and c.startswith("kvmufw:") else None
            for c in (comment(line), old_comment(line))]
    assert ours[0] == ours[1]


# --------------------------------------------------------------------------- conflicts

ports = st.integers(1, 60).flatmap(lambda a: st.tuples(st.just(a), st.integers(a, a + 8)))
forward = st.builds(lambda p, proto, ip: ForwardSpec(proto, PortRange(*p), PortRange(*p),
                                                     host_ip=ip),
                    ports, st.sampled_from(["tcp", "udp"]),
                    st.sampled_from([None, None, IPv4Address("192.0.2.1"),
                                     IPv4Address("192.0.2.2")]))


@settings(max_examples=300, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(forward, max_size=4), max_size=8))
def test_claims_index_answers_as_checking_against_everything(owners):
    """plan_host checks each owner against the claims near its ports only: the same
    owners fail, with the same messages, as against every claim."""
    claimed_all, index = [], policy._Claimed()
    for n, forwards in enumerate(owners):
        label = f"domain 'g{n}'"
        answers = []
        for others in (claimed_all, index.near(forwards)):
            try:
                check_conflicts(label, forwards, others)
                answers.append(None)
            except InputError as exc:
                answers.append(str(exc))
        assert answers[0] == answers[1]
        if answers[0] is None:
            claimed_all.append((label, forwards))
            index.add(label, forwards)


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
    monkeypatch.setattr("kvmufw_hook.status.default_backend", lambda: backend)
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


def test_a_snapshot_builds_its_set_of_our_lines_once():
    text = "*nat\n:KVMUFW-OUTPUT - [0:0]\n-A KVMUFW-OUTPUT -j ACCEPT\nCOMMIT\n"
    snap = Snapshot.parse(text)
    assert snap.our_lines() is snap.our_lines()
    assert snap.our_lines() == {"-A KVMUFW-OUTPUT -j ACCEPT"}


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
