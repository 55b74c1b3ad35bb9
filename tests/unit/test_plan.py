"""Planner and renderer: XML fixtures in, golden iptables-restore text out (no root).

Regenerate the golden files after an intended change with
``KVMUFW_UPDATE_GOLDEN=1 python3 -m pytest tests/unit/test_plan.py`` and read the diff.
"""

import os

import pytest
from conftest import FIXTURES, ROOT, SAMPLES

from kvmufw_hook.cli import main
from kvmufw_hook.errors import InputError
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml
from kvmufw_hook.plan import check_conflicts, resolve_domain_forwards

GOLDEN = ROOT / "tests" / "golden"
DEFAULT = SAMPLES / "02-network.default.port-created.xml"

CASES = {
    "network-nat": [SAMPLES / "net-lab.xml"],
    "network-route": [SAMPLES / "net-routed.xml"],
    "network-open": [FIXTURES / "net-open.xml"],
    "network-isolated": [SAMPLES / "net-iso.xml"],
    "network-bridge": [FIXTURES / "net-bridge.xml"],
    "network-forwards-guest-mac": [FIXTURES / "net-mac.xml"],
    "domain-web1": [SAMPLES / "net-lab.xml", DEFAULT, SAMPLES / "dom-web1.xml"],
    "domain-every-kind": [SAMPLES / "net-lab.xml", DEFAULT, FIXTURES / "dom-all.xml"],
    "dual-stack-nat66": [FIXTURES / "net-dual.xml"],
    "dual-stack-domain": [FIXTURES / "net-dual.xml", FIXTURES / "dom-dual.xml"],
}


def plan_text(paths, capsys) -> str:
    assert main(["plan", *map(str, paths)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case, capsys):
    text = plan_text(CASES[case], capsys)
    golden = GOLDEN / f"{case}.rules"
    if os.environ.get("KVMUFW_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def lines(text: str, chain: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith(f"-A {chain} ")]


def test_modes_differ_where_the_contract_says(capsys):
    nat = plan_text(CASES["network-nat"], capsys)
    route = plan_text(CASES["network-route"], capsys)
    iso = plan_text(CASES["network-isolated"], capsys)
    assert len(lines(nat, "KVMUFW-POSTROUTING")) == 3 + 1  # masquerade tcp/udp/all + hairpin
    assert lines(route, "KVMUFW-POSTROUTING") == [] and "*nat" not in route
    assert [l.split(" -m comment")[0] for l in lines(iso, "KVMUFW-FORWARD")] == [
        "-A KVMUFW-FORWARD -i virbr3 -o virbr3"]
    for text in (nat, route, iso):  # DHCP and DNS to the host on every managed network
        v4 = text.split("# ip6tables-restore")[0]
        assert len(lines(v4, "KVMUFW-INPUT")) == 3
    # a bridge network: frames crossing the bridge only, in each family; nothing routed
    bridge = plan_text(CASES["network-bridge"], capsys)
    assert [l.split(" -m comment")[0] for l in bridge.splitlines() if l.startswith("-A")] == [
        "-A KVMUFW-FORWARD -i br0 -o br0 -m physdev --physdev-is-bridged"] * 2


def test_shifted_range_keeps_offset_and_sources_fan_out(capsys):
    text = plan_text(CASES["network-forwards-guest-mac"], capsys)
    assert "--dport 6000:6002 -m comment" in text
    assert "-j DNAT --to-destination 10.50.0.6:5000-5002/6000" in text
    pre = lines(text, "KVMUFW-PREROUTING")
    assert [l.split(" -p ")[0] for l in pre if "2525" in l] == [
        "-A KVMUFW-PREROUTING -s 198.51.100.0/24 -d 203.0.113.1/32",
        "-A KVMUFW-PREROUTING -s 192.0.2.7/32 -d 203.0.113.1/32"]
    assert "--to-ports 20000-30000" in text


def test_forward_accept_is_limited_to_dnat(capsys):
    text = plan_text(CASES["domain-web1"], capsys)
    accepts = [l for l in lines(text, "KVMUFW-FORWARD") if "d=web1" in l]
    assert accepts and all("--ctstate DNAT" in l for l in accepts)


NET_LAB = parse_network_xml((SAMPLES / "net-lab.xml").read_bytes())
NET_DEFAULT = parse_network_xml(DEFAULT.read_bytes())


def _dom(forwards: str) -> bytes:
    return f"""<domain><name>db</name><metadata><forwards xmlns="urn:kvmufw:1">{forwards}
      </forwards></metadata><devices>
      <interface type='network'><source network='default'/><mac address='52:54:00:00:00:10'/></interface>
      <interface type='network'><source network='lab'/><mac address='52:54:00:00:00:20'/></interface>
      </devices></domain>""".encode()


@pytest.mark.parametrize("forward,message", [
    ('<forward host-port="22" guest-ip="10.9.9.9"/>',
     "forward #1 (forward tcp 22): guest-ip 10.9.9.9 is outside the subnets of the networks "
     "the guest is attached to: default (192.168.122.0/24), lab (10.0.0.0/24, fd00:10::/64)"),
    ('<forward host-port="22" mac="52:54:00:00:00:99"/>', "has no NIC with mac 52:54:00:00:00:99"),
    ('<forward host-port="22" mac="52:54:00:00:00:10"/>',
     "cannot resolve the guest address: no <dhcp><host> reservation for 52:54:00:00:00:10 on "
     "default (IPv4: by MAC; IPv6: by the name 'db'); add one or set guest-ip"),
])
def test_resolution_errors(forward, message):
    dom = parse_domain_xml(_dom(forward))
    with pytest.raises(InputError) as exc:
        resolve_domain_forwards(dom, {"lab": NET_LAB, "default": NET_DEFAULT})
    assert str(exc.value) == f"domain 'db': {message}" or message in str(exc.value)
    assert str(exc.value).startswith("domain 'db': forward #1")


def test_first_nic_with_a_reservation_is_the_default_target():
    dom = parse_domain_xml(_dom('<forward host-port="22"/>'))
    [target] = resolve_domain_forwards(dom, {"lab": NET_LAB, "default": NET_DEFAULT})
    assert (str(target.guest_ip), target.network.name) == ("10.0.0.5", "lab")
    with pytest.raises(InputError, match="no NIC on a nat, route, open or isolated network"):
        resolve_domain_forwards(dom, {})


@pytest.mark.parametrize("a,b,clash", [
    ('<forward host-port="22"/>', '<forward host-port="22" proto="udp"/>', False),
    ('<forward host-port="22"/>', '<forward host-port="20-30"/>', True),
    ('<forward host-port="22" host-ip="10.0.0.1"/>', '<forward host-port="22"/>', True),
    ('<forward host-port="22" host-ip="10.0.0.1"/>',
     '<forward host-port="22" host-ip="10.0.0.2"/>', False),
    ('<forward host-port="100-200"/>', '<forward host-port="201-300"/>', False),
])
def test_conflicts(a, b, clash):
    first = parse_domain_xml(_dom(a)).forwards
    second = parse_domain_xml(_dom(b)).forwards
    if clash:
        with pytest.raises(InputError, match=r"host port already forwarded by domain 'first'"):
            check_conflicts("domain 'db'", second, [("domain 'first'", first)])
        with pytest.raises(InputError, match="overlaps"):
            check_conflicts("domain 'db'", first + second, [])
    else:
        check_conflicts("domain 'db'", second, [("domain 'first'", first)])


def test_plan_errors_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.xml"
    bad.write_bytes(_dom('<forward host-port="22" guest-ip="10.9.9.9"/>'))
    assert main(["plan", str(SAMPLES / "net-lab.xml"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "domain 'db': forward #1" in err
    assert main(["plan", str(tmp_path / "missing.xml")]) == 2
    assert "No such file" in capsys.readouterr().err
    dup = tmp_path / "dup.xml"
    dup.write_bytes(_dom('<forward host-port="8080" guest-port="80"/>'))
    assert main(["plan", str(SAMPLES / "net-lab.xml"), str(dup)]) == 2
    assert "host port already forwarded by network 'lab'" in capsys.readouterr().err


def test_cli_usage(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("kvmufw_hook 0.")
    assert main([]) == 2
    assert main(["nonsense"]) == 2
