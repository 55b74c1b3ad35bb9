"""The host checks (``host.py``) in both families. A forward's host-ip may be
one of the host's IPv6 addresses, never ``::1``, a link-local address or one another host
on the link holds; a host service's port is taken from it only in the families the
forward and the socket share.

Unit tests use hand-built facts; kernel tests read a network namespace this test creates
(real addresses, real duplicate address detection, real listening sockets), through the
child that ``HostFacts.read(prefix)`` starts there, as ops.py reads a backend's.
"""

import sys
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from host_addresses import GUEST_V4, GUEST_V6, OTHER_V6, V4, V6, forward, refusal

from kvmufw_hook.host import (
    HostFacts,
    Listener,
    check_forwards,
    read_ipv4_addresses,
    read_ipv6_addresses,
)


def sock(addr, port=8443, proto="tcp", v6only=False):
    return Listener(proto, ip_address(addr), port, inode=0, uid=0, v6only=v6only)


# --------------------------------------------------------------------------- unit

@pytest.mark.parametrize("listener,family,host_ip,reached", [
    (sock("0.0.0.0"), 4, None, True),
    (sock("0.0.0.0"), 6, None, False),  # an IPv4 socket never sees IPv6
    (sock("203.0.113.1"), 4, V4, True),
    (sock("203.0.113.1"), 4, IPv4Address("203.0.113.9"), False),
    (sock("127.0.0.1"), 4, None, False),
    (sock("::"), 4, None, True),  # dual-stack
    (sock("::"), 6, None, True),
    (sock("::", v6only=True), 4, None, False),
    (sock("::", v6only=True), 6, V6, True),
    (sock(str(V6)), 6, None, True),
    (sock(str(V6)), 6, V6, True),
    (sock(str(V6)), 6, OTHER_V6, False),
    (sock(str(V6)), 4, None, False),
    (sock("::1"), 6, None, False),
    (sock("::ffff:203.0.113.1"), 4, V4, True),  # mapped: an IPv4 socket in effect
    (sock("::ffff:203.0.113.1"), 6, None, False),
    (sock("::ffff:127.0.0.1"), 4, None, False),
])
def test_a_socket_takes_only_its_own_families(listener, family, host_ip, reached):
    assert listener.reaches(family, host_ip) is reached


FACTS = HostFacts(frozenset({V4, V6, OTHER_V6, IPv6Address("fe80::1")}),
                  (sock("::", port=8443, v6only=True), sock("0.0.0.0", port=8080),
                   sock(str(V6), port=9000), sock("::", port=53, proto="udp")),
                  frozenset({IPv6Address("2001:db8:1::dad")}))


@pytest.mark.parametrize("spec,refused", [
    # an IPv6-only service: IPv4 forwards keep the port, IPv6 ones are refused
    (forward(8443, guest_ips=[GUEST_V4]), None),
    (forward(8443, host_ip=V4), None),
    (forward(8443, sources=["198.51.100.0/24"]), None),
    (forward(8443, guest_ips=[GUEST_V6]), "host port 8443/tcp"),
    (forward(8443, host_ip=V6), "host port 8443/tcp"),
    (forward(8443), "host port 8443/tcp"),  # family unknown: both
    (forward(8443, guest_ips=[GUEST_V4, GUEST_V6], sources=["2001:db8::/32"]),
     "host port 8443/tcp"),
    # an IPv4 service: only forwards that may take IPv4
    (forward(8080, guest_ips=[GUEST_V6]), None),
    (forward(8080, host_ip=V6), None),
    (forward(8080, guest_ips=[GUEST_V4, GUEST_V6], sources=["2001:db8::/32"]), None),
    (forward(8080, guest_ips=[GUEST_V4, GUEST_V6]), "host port 8080/tcp"),
    # a service on one IPv6 address: forwards to that address or to every address
    (forward(9000, host_ip=V6), "host port 9000/tcp"),
    (forward(9000, guest_ips=[GUEST_V6]), "host port 9000/tcp"),
    (forward(9000, host_ip=OTHER_V6), None),
    (forward(9000, guest_ips=[GUEST_V4]), None),
    # a udp ``::`` socket (v6only unknown from /proc): both families
    (forward(53, proto="udp", guest_ips=[GUEST_V4]), "host port 53/udp"),
    (forward(53, proto="udp", host_ip=V6), "host port 53/udp"),
    (forward(8443, host_ip=V6, allow_host_service=True), "host port 8443/tcp"),  # XML: no
])
def test_host_services_conflict_per_family(spec, refused):
    line = refusal(FACTS, spec)
    if refused is None:
        assert line is None, line
    else:
        assert line is not None and refused in line and "allow_host_service" in line, line
        assert line.startswith(f"domain 'web7': forward #1 ({spec.label}): "), line


@pytest.mark.parametrize("host_ip,reason", [
    ("::1", "is a loopback address"),
    ("fe80::1", "is a link-local address"),  # FACTS lists it as local: still refused
    ("2001:db8:1::dad", "failed duplicate address detection"),
    ("2001:db8:9::1", "is not an address of this host"),
    ("::ffff:203.0.113.1", "is not an address of this host"),
    ("127.0.0.1", "is a loopback address"),
    ("198.51.100.1", "is not an address of this host"),
])
def test_a_host_ip_that_is_not_this_hosts_to_take_is_refused(host_ip, reason):
    spec = forward(7000, host_ip=host_ip)
    line = refusal(FACTS, spec)
    assert line is not None and line.startswith(
        f"domain 'web7': forward #1 ({spec.label}): host-ip {ip_address(host_ip)} {reason}"), line


@pytest.mark.parametrize("host_ip", [str(V4), str(V6), str(OTHER_V6)])
def test_an_address_of_this_host_is_accepted(host_ip):
    assert refusal(FACTS, forward(7000, host_ip=host_ip)) is None


def test_a_port_held_in_one_family_is_not_held_in_the_other():
    """The owner's IPv4 rules hold 8443; its forward now gains an IPv6 guest address. A
    later socket does not take the IPv4 port away, but an IPv6 service on 8443 must still
    refuse the new IPv6 half."""
    dual = forward(8443, guest_ips=[GUEST_V4, GUEST_V6])
    v4_held = [forward(8443, guest_ips=[GUEST_V4])]
    assert "host port 8443/tcp" in refusal(FACTS, dual, held=v4_held)
    assert refusal(FACTS, dual, held=[dual]) is None
    ipv4_service = HostFacts(FACTS.local, (sock("0.0.0.0", port=8443),))
    assert refusal(ipv4_service, dual, held=v4_held) is None
    assert "host port 8443/tcp" in refusal(ipv4_service, dual)


def test_the_families_the_plan_resolved_decide():
    """No guest-ip: the metadata allows both families, but the guest's address comes from
    an IPv4 reservation, so the plan knows the forward takes only the IPv4 port; an
    IPv6-only service on it refuses nothing (as in tests/lab/test_adversarial.py)."""
    spec = forward(8443)
    assert spec.families == (4, 6)
    assert refusal(FACTS, spec, families=(4,)) is None
    assert "host port 8443/tcp" in refusal(FACTS, spec, families=(6,))
    assert "host port 8080/tcp" in refusal(FACTS, forward(8080), families=(4,))
    assert refusal(FACTS, forward(8080), families=(6,)) is None
    facts = HostFacts(FACTS.local, (sock("::", port=8443, v6only=True),))
    check_forwards("domain 'web7'", [forward(8443, guest_ips=[GUEST_V6]), spec], facts,
                   families=[(), (4,)])  # aligned with the specs, in order


def test_if_inet6_is_read_with_duplicates_apart(tmp_path):
    """The file's format: address, ifindex, prefix length, scope, flags, device."""
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "if_inet6").write_text(
        "20010db8000100000000000000000001 02 40 00 80     eth0\n"
        "20010db8000100000000000000000dad 02 40 00 c8     eth0\n"  # dadfailed|tentative
        "20010db8000100000000000000000002 02 40 00 40     eth0\n"  # tentative: usable
        "fe800000000000000000000000000001 02 40 20 80     eth0\n"
        "00000000000000000000000000000001 01 80 10 80       lo\n")
    usable, duplicates = read_ipv6_addresses(str(tmp_path))
    assert usable == {V6, OTHER_V6, IPv6Address("fe80::1"), IPv6Address("::1")}
    assert duplicates == {IPv6Address("2001:db8:1::dad")}
    (tmp_path / "net" / "if_inet6").unlink()  # IPv6 disabled at boot
    assert read_ipv6_addresses(str(tmp_path)) == (frozenset(), frozenset())


def test_an_interface_named_in_any_bytes_does_not_stop_the_reading(tmp_path):
    """The kernel takes any bytes but '/', ':' and whitespace in an interface's name, and
    /proc shows them as they are: a name that is not ASCII (nor UTF-8) is not ours to
    read, the addresses on its line still count."""
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "if_inet6").write_bytes(
        b"20010db8000100000000000000000001 02 40 00 80  caf\xc3\xa9\n"
        b"20010db8000100000000000000000002 03 40 00 80  x\xff\xfe\n")
    (tmp_path / "net" / "fib_trie").write_bytes(
        b"Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 192.0.2.1\n        /32 host LOCAL\n")
    assert read_ipv6_addresses(str(tmp_path))[0] == {V6, OTHER_V6}
    assert read_ipv4_addresses(str(tmp_path)) == {IPv4Address("192.0.2.1")}


def test_reading_the_host_stays_light():
    """host.py is imported on every guest start: beyond the model (imported anyway) it
    loads the readers of the host's facts and root's configuration, and neither the
    parser, the planner, ``subprocess`` (commands run through ``process.py``) nor
    ``typing``."""
    import ast
    import subprocess

    from conftest import ROOT
    code = ("import sys; sys.path.insert(0, %r); import kvmufw_hook.model; "
            "before = set(sys.modules); import kvmufw_hook.host; "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-S", "-c", code % str(ROOT)], capture_output=True,
                         text=True, check=True).stdout
    loaded = set(ast.literal_eval(out))
    assert {m for m in loaded if m.startswith("kvmufw_hook.")} == {
        "kvmufw_hook.config", "kvmufw_hook.errors", "kvmufw_hook.host", "kvmufw_hook.names",
        "kvmufw_hook.process", "kvmufw_hook.sockdiag"}
    assert not loaded & {"subprocess", "typing", "lxml", "inspect"}, loaded
