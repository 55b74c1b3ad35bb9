"""libvirt XML -> model. Pure: bytes in, frozen dataclasses out, InputError on bad input.

The parser never resolves entities, never loads a DTD and never touches the network;
a document with a DOCTYPE is refused outright (libvirt never sends one).
"""

from __future__ import annotations

import re
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Interface,
    ip_address,
    ip_network,
)

from lxml import etree

from .errors import InputError, shown
from .model import (
    PROTOCOLS,
    DhcpHost,
    Domain,
    ForwardSpec,
    Network,
    NetworkPort,
    Nic,
    PortRange,
)
from .names import NAMESPACE

MAX_XML_BYTES = 16 * 1024 * 1024
MAX_FORWARDS = 4096

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          dtd_validation=False, huge_tree=False, remove_comments=True,
                          remove_pis=True)

DOMAIN_ATTRS = frozenset({"proto", "host-port", "guest-port", "guest-ip", "mac",
                          "host-ip", "source", "comment"})
NETWORK_ATTRS = frozenset({"proto", "host-port", "guest-port", "guest-ip", "guest-mac",
                           "host-ip", "source", "comment"})

_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,15}")


def load(data: bytes | str, what: str = "input") -> etree._Element:
    """Parse XML safely; InputError with one line if it is not acceptable."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > MAX_XML_BYTES:
        raise InputError(f"{what}: XML larger than {MAX_XML_BYTES} bytes")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise InputError(f"{what}: a DOCTYPE or entity declaration is not allowed")
    try:
        root = etree.fromstring(data, _PARSER)
    except (etree.XMLSyntaxError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{what}: not well-formed XML: {msg}") from None
    if root is None:
        raise InputError(f"{what}: empty XML document")
    return root


def _local(el: etree._Element) -> str:
    return etree.QName(el).localname if isinstance(el.tag, str) else ""


def _text(el: etree._Element | None, path: str) -> str | None:
    if el is None:
        return None
    found = el.find(path)
    if found is None or found.text is None:
        return None
    return found.text.strip() or None


def _mac(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    mac = value.strip().lower()
    if not _MAC.fullmatch(mac):
        raise InputError(f"{what}: {shown(value)} is not a MAC address")
    return mac


def _ifname(value: str | None, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not _IFNAME.fullmatch(value):
        raise InputError(f"{what}: {shown(value)} is not a valid interface name")
    return value


def _ipv4(value: str, what: str) -> IPv4Address:
    try:
        addr = ip_address(value.strip())
    except ValueError:
        raise InputError(f"{what}: {shown(value)} is not an IP address") from None
    if not isinstance(addr, IPv4Address):
        raise InputError(f"{what}: {shown(value)} is an IPv6 address; "
                         "only IPv4 forwards are supported so far")
    return addr


def _ports(value: str, what: str) -> PortRange:
    match = _PORTS.fullmatch(value.strip())
    if not match:
        raise InputError(f"{what}: {shown(value)} is not a port or range (N or N-M)")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise InputError(f"{what}: {shown(value)} is outside 1-65535")
    if last < first:
        raise InputError(f"{what}: {shown(value)} is a reversed range")
    return PortRange(first, last)


def _sources(value: str, what: str) -> tuple[IPv4Network, ...]:
    out: list[IPv4Network] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            raise InputError(f"{what}: empty entry in {shown(value)}")
        try:
            net = ip_network(part, strict=False)
        except ValueError:
            raise InputError(f"{what}: {shown(part)} is not an address or CIDR") from None
        if not isinstance(net, IPv4Network):
            raise InputError(f"{what}: {shown(part)} is IPv6; "
                             "only IPv4 forwards are supported so far")
        if net not in out:
            out.append(net)
    return tuple(out)


# --------------------------------------------------------------------------- forwards

def _forwards_element(metadata: etree._Element | None, owner: str) -> etree._Element | None:
    if metadata is None:
        return None
    found = [c for c in metadata if isinstance(c.tag, str)
             and etree.QName(c).namespace == NAMESPACE]
    if not found:
        return None
    if len(found) > 1 or _local(found[0]) != "forwards":
        raise InputError(f"{owner}: metadata in {NAMESPACE} must be one <forwards> element")
    return found[0]


def parse_forwards(metadata: etree._Element | None, owner: str,
                   allowed: frozenset[str]) -> tuple[ForwardSpec, ...]:
    """The ``<forwards>`` of a ``<metadata>`` element (prefixed or unprefixed children)."""
    root = _forwards_element(metadata, owner)
    if root is None:
        return ()
    specs: list[ForwardSpec] = []
    for index, el in enumerate((c for c in root if isinstance(c.tag, str)), start=1):
        ns = etree.QName(el).namespace
        if _local(el) != "forward" or ns not in (None, NAMESPACE):
            raise InputError(f"{owner}: forward #{index}: unknown element "
                             f"{shown(_local(el))} in <forwards>")
        if index > MAX_FORWARDS:
            raise InputError(f"{owner}: more than {MAX_FORWARDS} forwards")
        specs.append(_parse_forward(el, f"{owner}: forward #{index}", allowed))
    return tuple(specs)


def _parse_forward(el: etree._Element, where: str, allowed: frozenset[str]) -> ForwardSpec:
    if el.get("host-port") is not None:
        where = f"{where} (host-port {shown(el.get('host-port'), 20)})"
    attrs: dict[str, str] = {}
    for key, value in el.attrib.items():
        qname = etree.QName(key)
        if qname.namespace not in (None, NAMESPACE) or qname.localname not in allowed:
            raise InputError(f"{where}: unknown attribute {shown(qname.localname)}")
        attrs[qname.localname] = value
    if "host-port" not in attrs:
        raise InputError(f"{where}: host-port is required")
    proto = attrs.get("proto", "tcp").strip().lower()
    if proto not in PROTOCOLS:
        raise InputError(f"{where}: proto {shown(attrs['proto'])} is not one of "
                         + ", ".join(PROTOCOLS))
    host_port = _ports(attrs["host-port"], f"{where}: host-port")
    guest_port = (_ports(attrs["guest-port"], f"{where}: guest-port")
                  if "guest-port" in attrs else host_port)
    if guest_port.width != host_port.width:
        raise InputError(f"{where}: guest-port {guest_port} is not as wide as "
                         f"host-port {host_port}")
    return ForwardSpec(
        proto=proto,
        host_port=host_port,
        guest_port=guest_port,
        guest_ip=_ipv4(attrs["guest-ip"], f"{where}: guest-ip") if "guest-ip" in attrs else None,
        mac=_mac(attrs.get("mac"), f"{where}: mac"),
        guest_mac=_mac(attrs.get("guest-mac"), f"{where}: guest-mac"),
        host_ip=_ipv4(attrs["host-ip"], f"{where}: host-ip") if "host-ip" in attrs else None,
        sources=_sources(attrs["source"], f"{where}: source") if "source" in attrs else (),
        comment=attrs.get("comment"),
    )


def _named(el: etree._Element, kind: str) -> tuple[str, str]:
    """The object's name, and how messages call it: ``domain 'web1'``."""
    if _local(el) != kind:
        raise InputError(f"expected <{kind}>, found <{_local(el)}>")
    name = _text(el, "name")
    if not name:
        raise InputError(f"{kind}: <name> is missing")
    return name, f"{kind} {shown(name)}"


# --------------------------------------------------------------------------- network

def parse_network(el: etree._Element) -> Network:
    """A ``<network>`` element (live or persistent definition)."""
    name, what = _named(el, "network")
    fwd = el.find("forward")
    if fwd is None:
        mode = "isolated"
        dev = None
    else:
        mode = fwd.get("mode", "nat")
        dev = _ifname(fwd.get("dev"), f"{what}: forward dev")
    bridge_el = el.find("bridge")
    bridge = _ifname(bridge_el.get("name") if bridge_el is not None else None,
                     f"{what}: bridge name")
    nat_ports = None
    port_el = fwd.find("nat/port") if fwd is not None else None
    if port_el is not None and port_el.get("start") and port_el.get("end"):
        nat_ports = _ports(f"{port_el.get('start')}-{port_el.get('end')}",
                           f"{what}: nat port")

    ipv4: list[IPv4Interface] = []
    ipv6: list[IPv6Interface] = []
    hosts: list[DhcpHost] = []
    for ip_el in el.findall("ip"):
        address = ip_el.get("address")
        if not address:
            continue
        family = ip_el.get("family") or ("ipv6" if ":" in address else "ipv4")
        prefix = ip_el.get("prefix")
        netmask = ip_el.get("netmask")
        try:
            if family == "ipv6":
                ipv6.append(IPv6Interface(f"{address}/{prefix or 64}"))
                continue
            iface = IPv4Interface(f"{address}/{prefix or netmask or 24}")
        except ValueError:
            raise InputError(f"{what}: bad <ip address={shown(address)}>") from None
        ipv4.append(iface)
        for host in ip_el.findall("dhcp/host"):
            if not host.get("ip"):
                continue
            hosts.append(DhcpHost(mac=_mac(host.get("mac"), f"{what}: dhcp host mac"),
                                  ip=_ipv4(host.get("ip"), f"{what}: dhcp host ip"),
                                  name=host.get("name")))
    forwards = parse_forwards(el.find("metadata"), what, NETWORK_ATTRS)
    return Network(name=name, uuid=_text(el, "uuid"), mode=mode, bridge=bridge, dev=dev,
                   ipv4=tuple(ipv4), ipv6=tuple(ipv6), hosts=tuple(hosts),
                   forwards=forwards, nat_ports=nat_ports)


def parse_networkport(el: etree._Element) -> NetworkPort:
    plug = el.find("plug")
    mac_el = el.find("mac")
    return NetworkPort(
        owner_name=_text(el, "owner/name"),
        owner_uuid=_text(el, "owner/uuid"),
        mac=_mac(mac_el.get("address") if mac_el is not None else None, "networkport mac"),
        bridge=_ifname(plug.get("bridge") if plug is not None else None, "networkport bridge"),
    )


def parse_hookdata(data: bytes | str) -> tuple[Network, NetworkPort | None]:
    """stdin of a network hook: ``<hookData><network/>[<networkport/>]</hookData>``."""
    root = load(data, "network hook input")
    if _local(root) == "network":
        return parse_network(root), None
    if _local(root) != "hookData":
        raise InputError(f"network hook input: expected <hookData>, found <{_local(root)}>")
    net_el = root.find("network")
    if net_el is None:
        raise InputError("network hook input: <hookData> has no <network>")
    port_el = root.find("networkport")
    return parse_network(net_el), (parse_networkport(port_el) if port_el is not None else None)


# --------------------------------------------------------------------------- domain

def parse_domain(el: etree._Element) -> Domain:
    name, what = _named(el, "domain")
    nics: list[Nic] = []
    for iface in el.findall("devices/interface"):
        kind = iface.get("type", "")
        if kind not in ("network", "bridge"):
            continue
        source = iface.find("source")
        mac_el = iface.find("mac")
        nics.append(Nic(
            mac=_mac(mac_el.get("address") if mac_el is not None else None, f"{what}: NIC mac"),
            network=source.get("network") if source is not None and kind == "network" else None,
            bridge=_ifname(source.get("bridge") if source is not None else None,
                           f"{what}: NIC bridge"),
            type=kind,
        ))
    forwards = parse_forwards(el.find("metadata"), what, DOMAIN_ATTRS)
    return Domain(name=name, uuid=_text(el, "uuid"), nics=tuple(nics), forwards=forwards)


_WRAPPERS = {"networkstatus": "network", "hookData": "network", "domstatus": "domain"}


def _unwrap(root: etree._Element, what: str) -> etree._Element:
    """The ``<network>``/``<domain>`` inside libvirt's status and hook wrappers."""
    inner_name = _WRAPPERS.get(_local(root))
    if inner_name is None:
        return root
    inner = root.find(inner_name)
    if inner is None:
        raise InputError(f"{what}: <{_local(root)}> has no <{inner_name}>")
    return inner


def parse_domain_xml(data: bytes | str) -> Domain:
    return parse_domain(_unwrap(load(data, "domain XML"), "domain XML"))


def parse_network_xml(data: bytes | str) -> Network:
    """A network document: ``<network>``, ``<hookData>`` or libvirt's ``<networkstatus>``."""
    return parse_network(_unwrap(load(data, "network XML"), "network XML"))


def parse_any(data: bytes | str, what: str) -> Network | Domain:
    """A network or domain document, whichever it is (for ``kvmufw_hook plan``)."""
    root = _unwrap(load(data, what), what)
    kind = _local(root)
    if kind == "network":
        return parse_network(root)
    if kind == "domain":
        return parse_domain(root)
    raise InputError(f"{what}: expected <network> or <domain>, found <{kind}>")


def object_name(data: bytes | str) -> str | None:
    """The ``<name>`` of a network or domain document whose content is otherwise bad
    (so that ``replay`` can keep that owner's rules), or None."""
    try:
        root = _unwrap(load(data, "XML"), "XML")
        return _text(root, "name") if _local(root) in ("network", "domain") else None
    except InputError:
        return None
