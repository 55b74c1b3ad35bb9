"""doctor covers both families: net.ipv6.conf.all.forwarding and UFW's IPV6
setting, each verdict from a temp directory standing in for /proc and /etc."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path

import pytest

from kvmufw_hook.commands import doctor
from kvmufw_hook.model import Network

pytestmark = pytest.mark.unit

UFW_DEFAULT = 'IPV6={ipv6}\nDEFAULT_FORWARD_POLICY="DROP"\nMANAGE_BUILTINS=no\n'


def network(name: str, mode: str = "nat", v4: bool = True, v6: bool = True) -> Network:
    return Network(name=name, uuid=None, mode=mode, bridge=f"br-{name}", dev=None,
                   ipv4=(IPv4Interface("192.168.122.1/24"),) if v4 else (),
                   ipv6=(IPv6Interface("2001:db8:ca2:2::1/64"),) if v6 else ())


def nets(*networks: Network) -> dict[str, Network]:
    return {n.name: n for n in networks}


def host(root: Path, ip_forward: str = "1", ipv6_forwarding: str | None = "1",
         ufw_ipv6: str | None = "yes") -> str:
    """A host's /proc/sys and /etc/ufw under ``root``; ipv6_forwarding None: a kernel
    without IPv6 (no /proc/sys/net/ipv6); ufw_ipv6 None: no IPV6 line at all."""
    def write(path: str, text: str) -> None:
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(text)

    write(doctor.FORWARDING[4], ip_forward + "\n")
    if ipv6_forwarding is not None:
        write(doctor.FORWARDING[6], ipv6_forwarding + "\n")
    default = UFW_DEFAULT.format(ipv6=ufw_ipv6)
    if ufw_ipv6 is None:
        default = default.split("\n", 1)[1]
    write(doctor.UFW_DEFAULT, default)
    write(doctor.UFW_CONF, "ENABLED=yes\n")
    return str(root)


def ipv6_forwarding(networks, root: str) -> doctor.Finding:
    finding = doctor.check_forwarding(networks, 6, root=root)
    assert finding.check == "IPv6 forwarding"
    return finding


def ufw_ipv6(networks, root: str) -> doctor.Finding:
    [finding] = [f for f in doctor.check_ufw(networks, root=root) if f.check == "UFW IPv6"]
    return finding


# --------------------------------------------------------------------------- forwarding

@pytest.mark.parametrize("mode", ["nat", "route", "open"])
def test_ipv6_forwarding_off_fails_while_an_ipv6_network_routes(tmp_path, mode):
    root = host(tmp_path, ipv6_forwarding="0")
    finding = ipv6_forwarding(nets(network("lab6", mode)), root)
    assert finding.level == "FAIL"
    assert "net.ipv6.conf.all.forwarding = 0 while lab6 is active" in finding.detail
    assert finding.fix.startswith("sysctl -w net.ipv6.conf.all.forwarding=1")
    assert "accept_ra=2" in finding.fix  # forwarding on drops RA routes unless 2


def test_ipv6_forwarding_off_is_fine_without_an_ipv6_network_that_routes(tmp_path):
    """An IPv4-only nat network and an isolated IPv6 one need no IPv6 forwarding (most
    hosts: no warning for what nothing uses); the IPv4 verdict for the same host is
    unchanged."""
    root = host(tmp_path, ip_forward="0", ipv6_forwarding="0")
    networks = nets(network("v4only", v6=False), network("iso6", "isolated", v4=False))
    assert ipv6_forwarding(networks, root).level == "OK"
    assert ipv6_forwarding({}, root).level == "OK"
    ipv4 = doctor.check_forwarding(networks, 4, root=root)
    assert (ipv4.level, ipv4.check) == ("FAIL", "IP forwarding")
    assert "while v4only is active" in ipv4.detail


def test_ipv4_forwarding_ignores_an_ipv6_only_network(tmp_path):
    root = host(tmp_path, ip_forward="0")
    assert doctor.check_forwarding(nets(network("v6only", "route", v4=False)), 4,
                                   root=root).level == "WARN"


def test_ipv6_forwarding_on_is_ok(tmp_path):
    root = host(tmp_path, ipv6_forwarding="1")
    finding = ipv6_forwarding(nets(network("lab6")), root)
    assert (finding.level, finding.detail) == ("OK", "net.ipv6.conf.all.forwarding = 1")


def test_a_kernel_without_ipv6_is_ok_and_says_so(tmp_path):
    root = host(tmp_path, ip_forward="1", ipv6_forwarding=None)
    finding = ipv6_forwarding(nets(network("lab")), root)
    assert finding.level == "OK" and "IPv6 is off" in finding.detail
    assert doctor.check_forwarding(nets(network("lab")), 4, root=root).level == "OK"


# --------------------------------------------------------------------------- UFW's IPV6

def test_ufw_without_ipv6_warns_while_an_ipv6_network_is_active(tmp_path):
    root = host(tmp_path, ufw_ipv6="no")
    finding = ufw_ipv6(nets(network("lab6"), network("v4only", v6=False)), root)
    assert finding.level == "WARN"
    assert "IPV6=no while lab6 has an IPv6 subnet" in finding.detail
    assert "does not manage ip6tables" in finding.detail
    assert finding.fix == "set IPV6=yes in /etc/default/ufw, then ufw reload"


def test_ufw_without_an_ipv6_line_is_ufw_without_ipv6(tmp_path):
    """ufw uses IPv6 only where the setting says yes: a missing line is no."""
    root = host(tmp_path, ufw_ipv6=None)
    assert ufw_ipv6(nets(network("lab6", "isolated")), root).level == "WARN"


def test_ufw_ipv6_is_ok_when_yes_or_when_no_network_has_ipv6(tmp_path):
    root = host(tmp_path, ufw_ipv6="yes")
    assert ufw_ipv6(nets(network("lab6")), root).level == "OK"
    root = host(tmp_path / "no", ufw_ipv6="no")
    finding = ufw_ipv6(nets(network("v4only", v6=False)), root)
    assert finding.level == "OK" and "no active network has an IPv6 subnet" in finding.detail
    assert ufw_ipv6({}, root).level == "OK"


def test_without_ufw_there_is_no_ipv6_line(tmp_path):
    root = host(tmp_path, ufw_ipv6="no")
    (tmp_path / doctor.UFW_CONF.lstrip("/")).unlink()
    findings = doctor.check_ufw(nets(network("lab6")), root=str(root))
    assert [(f.level, f.check) for f in findings] == [("OK", "UFW")]


def test_run_reports_both_families(tmp_path, monkeypatch):
    """doctor.run puts the IPv6 forwarding verdict beside the IPv4 one."""
    from kvmufw_hook import state
    monkeypatch.setattr(state, "load_networks", lambda: nets(network("lab6")))

    class NoFirewall:
        def read(self, families=()):
            from kvmufw_hook.errors import ApplyError
            raise ApplyError("no iptables here")

    checks = [f.check for f in doctor.run("test:///default", backend=NoFirewall())]
    assert checks[:2] == ["IP forwarding", "IPv6 forwarding"]


def test_a_host_without_ipv6_firewall_is_a_warn_only_where_a_network_needs_it():
    from fakebackend import FakeBackend  # tests/ is on the path (conftest)
    backend = FakeBackend(ipv6=False)
    ruleset = backend.read((4, 6))
    assert ruleset.unavailable == {6: "IPv6 is disabled in the kernel"}
    found = doctor.check_rules(backend, ruleset, 1, ipv6_networks=True)
    warn = [f for f in found if f.check == "IPv6 firewall"]
    assert [f.level for f in warn] == ["WARN"] and "left out" in warn[0].detail
    assert not [f for f in doctor.check_rules(backend, ruleset, 1, ipv6_networks=False)
                if f.check == "IPv6 firewall"]
