"""Parser: every captured libvirt 9.0 input, and the refusals of bad input."""

from ipaddress import IPv4Address, IPv4Interface, IPv6Interface

import pytest
from conftest import FIXTURES, SAMPLES

from kvmufw_hook.errors import InputError
from kvmufw_hook.model import PortRange
from kvmufw_hook.parse import (
    load,
    parse_any,
    parse_domain_xml,
    parse_hookdata,
    parse_network_xml,
)

NETWORK_SAMPLES = sorted(SAMPLES.glob("*-network.*.xml"))
QEMU_SAMPLES = sorted(SAMPLES.glob("*-qemu.*.xml"))


def test_every_sample_is_there():
    assert len(NETWORK_SAMPLES) == 10 and len(QEMU_SAMPLES) == 6
    for xml in NETWORK_SAMPLES + QEMU_SAMPLES:
        assert xml.with_suffix(".argv").exists()


@pytest.mark.parametrize("path", NETWORK_SAMPLES, ids=lambda p: p.name)
def test_network_samples(path):
    net, port = parse_hookdata(path.read_bytes())
    name = path.read_text().split("<name>")[1].split("</name>")[0]
    assert net.name == name == path.with_suffix(".argv").read_text().split()[0]
    assert net.managed and net.bridge.startswith("virbr")
    assert ("port-" in path.name) == (port is not None)
    if port is not None:
        assert port.owner_name == "web1"
        assert port.bridge == net.bridge
        assert port.mac in ("52:54:00:00:00:10", "52:54:00:00:00:20")


def test_lab_network_in_full():
    net, _ = parse_hookdata((SAMPLES / "16-network.lab.started.xml").read_bytes())
    assert net.mode == "nat" and net.dev == "eth0" and net.bridge == "virbr1"
    assert net.ipv4 == (IPv4Interface("10.0.0.1/24"),)
    assert net.ipv6 == (IPv6Interface("fd00:10::1/64"),)
    assert net.reservation("52:54:00:00:00:20") == IPv4Address("10.0.0.5")
    assert net.nat_ports == PortRange(1024, 65535)
    [fwd] = net.forwards
    assert (fwd.proto, fwd.host_port, fwd.guest_port, fwd.guest_ip(4)) == (
        "tcp", PortRange(8080, 8080), PortRange(80, 80), IPv4Address("10.0.0.5"))


def test_routed_sample_without_metadata():
    net, _ = parse_hookdata((SAMPLES / "13-network.routed.stopped.xml").read_bytes())
    assert (net.mode, net.bridge, net.forwards) == ("route", "virbr2", ())
    assert [str(s) for s in net.subnets] == ["10.20.0.0/24"]


@pytest.mark.parametrize("path", QEMU_SAMPLES, ids=lambda p: p.name)
def test_qemu_samples(path):
    dom = parse_domain_xml(path.read_bytes())
    assert dom.name == "web1" and dom.uuid == "fea4d738-cef0-4b4d-8bdd-5ec70873bef7"
    assert [n.mac for n in dom.nics] == ["52:54:00:00:00:10", "52:54:00:00:00:20"]
    assert [n.network for n in dom.nics] == ["default", "lab"]
    # libvirt names the bridge only while the guest's ports exist (start to stopped)
    running = any(op in path.name for op in (".start.", ".started.", ".reconnect."))
    bridges = [n.bridge for n in dom.nics]
    assert bridges == (["virbr0", "virbr1"] if running else [None, None])
    assert [(f.proto, str(f.host_port), str(f.guest_port)) for f in dom.forwards] == [
        ("tcp", "2222", "22"), ("udp", "5000-5002", "5000-5002"), ("tcp", "8443", "443")]
    assert dom.forwards[2].mac == "52:54:00:00:00:20"
    assert [str(s) for s in dom.forwards[2].sources] == ["198.51.100.0/24"]


def test_unprefixed_children_and_wrappers():
    net = parse_network_xml((FIXTURES / "net-mac.xml").read_bytes())
    assert [f.guest_mac for f in net.forwards] == ["52:54:00:aa:00:01", None]
    assert [str(s) for s in net.forwards[1].sources] == ["198.51.100.0/24", "192.0.2.7/32"]
    status = b"<networkstatus><class_id/>" + (SAMPLES / "net-lab.xml").read_bytes() \
        + b"</networkstatus>"
    assert parse_network_xml(status).name == "lab"
    assert parse_any(b"<domstatus><domain><name>x</name></domain></domstatus>", "f").name == "x"


def test_other_namespaces_are_not_ours():
    dom = parse_domain_xml(b"""<domain><name>d</name><metadata>
        <app:forwards xmlns:app="urn:other:1"><app:forward host-port="x"/></app:forwards>
        </metadata></domain>""")
    assert dom.forwards == ()
    # a '}' in a namespace URI would make ``{URI}local`` ambiguous (ours, followed by
    # more?): expat refuses the separator in a URI, so the document is refused, never read
    for lookalike in ("urn:kvmufw:1}x", "urn:kvmufw:1}"):
        with pytest.raises(InputError, match="not well-formed"):
            parse_domain_xml(f"""<domain><name>d</name><metadata>
                <k:forwards xmlns:k="{lookalike}"><k:forward host-port="22"/></k:forwards>
                </metadata></domain>""".encode())


def _dom(forwards: str, extra: str = "") -> bytes:
    return (f"""<domain><name>web1</name><metadata><forwards xmlns="urn:kvmufw:1">{forwards}
    </forwards></metadata>{extra}</domain>""").encode()


BAD_FORWARDS = [
    ('<forward/>', "forward #1: host-port is required"),
    ('<forward host-port="0"/>', "'0' is outside 1-65535"),
    ('<forward host-port="65536"/>', "'65536' is outside 1-65535"),
    ('<forward host-port="-1"/>', "'-1' is not a port or range"),
    ('<forward host-port="22abc"/>', "'22abc' is not a port or range"),
    ('<forward host-port="５０"/>', "is not a port or range"),
    ('<forward host-port="30-20"/>', "'30-20' is a reversed range"),
    ('<forward host-port="10-12" guest-port="20-21"/>', "guest-port 20-21 is not as wide"),
    ('<forward host-port="22" proto="icmp"/>', "proto 'icmp' is not one of tcp, udp, sctp"),
    ('<forward host-port="22" guest-ip="10.0.0.300"/>', "guest-ip: '10.0.0.300' is not an IP"),
    ('<forward host-port="22" guest-ip="10.0.0.5,10.0.0.6"/>', "two IPv4 addresses"),
    ('<forward host-port="22" guest-ip="fd00::5,fd00::6"/>', "two IPv6 addresses"),
    ('<forward host-port="22" guest-ip="10.0.0.5,"/>', "is not an IP address"),
    ('<forward host-port="22" source="10.0.0.0/33"/>', "'10.0.0.0/33' is not an address or CIDR"),
    ('<forward host-port="22" source="10.0.0.1,,10.0.0.2"/>', "empty entry"),
    ('<forward host-port="22" mac="52:54:00:zz:00:01"/>', "is not a MAC address"),
    ('<forward host-port="22" colour="red"/>', "unknown attribute 'colour'"),
    ('<forward host-port="22" guest-mac="52:54:00:00:00:01"/>', "unknown attribute 'guest-mac'"),
    ('<rule host-port="22"/>', "unknown element 'rule'"),
    # one attribute twice, plain and in our namespace: the forward would be one thing to
    # a reader of the XML and its error lines (host-port 22), another to the rules (8080)
    ('<forward xmlns:k="urn:kvmufw:1" host-port="22" k:host-port="8080"/>',
     "attribute 'host-port' given twice"),
]


@pytest.mark.parametrize("forward,message", BAD_FORWARDS)
def test_bad_forwards_are_one_line_errors(forward, message):
    with pytest.raises(InputError) as exc:
        parse_domain_xml(_dom(forward))
    text = str(exc.value)
    assert text.startswith("domain 'web1': forward #1"), text
    assert message in text
    assert "\n" not in text


def test_network_forward_cannot_use_mac():
    xml = b"""<network><name>n</name><metadata><forwards xmlns="urn:kvmufw:1">
      <forward host-port="22" mac="52:54:00:00:00:01"/></forwards></metadata></network>"""
    with pytest.raises(InputError, match="network 'n': forward #1 .*unknown attribute 'mac'"):
        parse_network_xml(xml)


@pytest.mark.parametrize("data,message", [
    (b"", "not well-formed"),
    (b"<domain><name>x</name>", "not well-formed"),
    (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY e "x">]><domain><name>&e;</name></domain>',
     "DOCTYPE"),
    (b"<domain/>", "<name> is missing"),
    (b"<network><name>x</name></network>", "expected <domain>"),
])
def test_bad_documents(data, message):
    with pytest.raises(InputError, match=message):
        parse_domain_xml(data)


def test_names_with_newlines_stay_one_line():
    with pytest.raises(InputError) as exc:
        parse_domain_xml(_dom('<forward host-port="x"/>').replace(
            b"<name>web1</name>", "<name>we\nb'1 ☃</name>".encode()))
    assert "\n" not in str(exc.value) and "we\\nb\\'1" in str(exc.value)


def test_load_refuses_huge_input():
    with pytest.raises(InputError, match="larger than"):
        load(b"<a>" + b" " * (16 * 1024 * 1024) + b"</a>")
