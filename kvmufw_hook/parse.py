"""libvirt XML -> model. Pure: bytes in, frozen dataclasses out, InputError on bad input.

Only UTF-8 is read; a document with a DOCTYPE is refused outright (libvirt never sends
one); the parser never resolves entities, never loads a DTD, never touches the network,
and is bounded in bytes, elements and time (see ``load``). The parser is the standard
library's expat, and every command reads XML through it. It builds ``Node``s of our own:
a guest's start needs a tree to read, not ElementTree (loading it cost a start ~5 ms);
``forward`` edits and writes XML back, and hands the same parser ElementTree's
``TreeBuilder`` (``load_into``). The model reads either tree the same way (``Tree``).
"""

from __future__ import annotations

import re
from ipaddress import IPv4Interface, IPv6Address, IPv6Interface, ip_address, ip_network
from xml.parsers import expat

from .errors import InputError, shown
from .model import (
    PROTOCOLS,
    DhcpHost,
    Domain,
    ForwardSpec,
    IPAddress,
    IPNetwork,
    Network,
    NetworkPort,
    Nic,
    PortRange,
)
from .names import NAMESPACE

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: a guest's start parses
    from collections.abc import Iterable, Iterator
    from typing import Protocol, Self, TypeVar

    class Tree(Protocol):
        """What the model reads of an element: a ``Node`` or ElementTree's ``Element``."""
        tag: str
        text: str | None
        attrib: dict[str, str]

        def get(self, key: str) -> str | None: ...  # with a default: ``attrib.get``
        def find(self, path: str) -> Self | None: ...
        def findall(self, path: str) -> list[Self]: ...
        def __iter__(self) -> Iterator[Self]: ...

    T = TypeVar("T", covariant=True)

    class Builder(Protocol[T]):
        """ElementTree's ``TreeBuilder`` interface, which ``NodeBuilder`` also has."""
        def start(self, tag: str, attrs: dict[str, str], /) -> object: ...
        def end(self, tag: str, /) -> object: ...
        def data(self, data: str, /) -> object: ...
        def close(self) -> T: ...

MAX_XML_BYTES = 16 * 1024 * 1024
MAX_ELEMENTS = 200_000  # libvirt's largest documents hold a few thousand
MAX_PARSE_SECONDS = 2.0  # a 16 MiB document of plain elements parses in a fraction
# Fed piece by piece so that the time bound is checked between pieces. expat before 2.6
# (Debian 12's 2.5) scans an unfinished token again with every piece: a long attribute
# value costs its length squared over the piece size (a 9.9 MB one, which libvirt keeps,
# took 2.9 s in 16 KiB pieces; 0.1 s in pieces of a MiB, as in one piece).
_CHUNK = 1024 * 1024
# A push parser takes a tag whole (expat before 2.6 even scans an unfinished one again
# on every chunk, and libxml2 2.9 compares each attribute with all before it): one huge
# tag would run for long between two checks of the time bound. So a tag may hold at
# most MAX_TAG_CHARS characters besides its attribute values (at most ~11000
# attributes); libvirt's hold dozens. ('<' never occurs inside a tag, so the search is
# linear.)
MAX_TAG_CHARS = 32 * 1024
_HUGE_TAG = re.compile(rb"<[^\s<>!?/](?:[^<>\"']|\"[^<\"]*\"|'[^<']*'){%d}" % MAX_TAG_CHARS)
MAX_FORWARDS = 4096
# Work per owner is linear and bounded: a forward has at most MAX_SOURCES sources, and an
# owner's forwards at most MAX_RULES rules (per family, 2 DNAT per source + 3), counted
# from the attribute text before anything is parsed; over either is one line, no work.
MAX_SOURCES = 256
MAX_RULES = 32768

DOMAIN_ATTRS = frozenset({"proto", "host-port", "guest-port", "guest-ip", "mac",
                          "host-ip", "source", "comment", "allow-host-service"})
NETWORK_ATTRS = frozenset({"proto", "host-port", "guest-port", "guest-ip", "guest-mac",
                           "host-ip", "source", "comment", "allow-host-service"})

_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
# What an interface name may be in our rules: the kernel refuses '/', ':', whitespace,
# '.', '..' and more than 15 bytes; iptables reads a trailing '+' as a wildcard (vir+ is
# every vir* bridge) and a leading '!' as "not"; quotes and the rest would need quoting
# in iptables-restore text. libvirt's own names (virbr0, vnet3, br-lan, eth0.10) fit.
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
_IFNAME_REASONS = (("+", "iptables reads '+' as a wildcard"),
                   ("!", "iptables reads '!' as a negation"),
                   ("/", "the kernel refuses '/'"), (":", "the kernel refuses ':'"))


_BOM_UTF8 = b"\xef\xbb\xbf"
_OTHER_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")  # UTF-16/32, both orders
_DECLARED = re.compile(rb"encoding\s*=\s*([\"'])(.*?)\1")
_UTF8_NAMES = frozenset({b"utf-8", b"utf8", b"us-ascii", b"ascii"})


def _utf8_only(data: bytes, what: str) -> bytes:
    """The document as UTF-8 bytes, or InputError: libvirt sends UTF-8, and deciding the
    encoding here (instead of letting the parser follow a BOM or a declaration) is what
    makes the DOCTYPE search below see exactly the bytes the parser reads."""
    data = data.removeprefix(_BOM_UTF8)
    if data.startswith(_OTHER_BOMS) or b"\x00" in data:
        raise InputError(f"{what}: XML must be UTF-8 (UTF-16/32 and NUL bytes are refused)")
    if data.startswith(b"<?xml"):
        end = data.find(b"?>")
        declared = _DECLARED.search(data[:end if end >= 0 else 200])
        if declared and declared.group(2).lower() not in _UTF8_NAMES:
            raise InputError(f"{what}: XML must be UTF-8, this one declares "
                             f"{shown(declared.group(2).decode('ascii', 'replace'), 20)}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what}: XML must be UTF-8 (invalid byte at offset "
                         f"{exc.start})") from None
    return data


class Node:
    """An element as the parser reads it: its tag (``{URI}local``), attributes, the text
    before its first child, and its children; ElementTree's ``get``, ``find`` and
    ``findall`` on a path of plain child tags (``devices/interface``), iteration, ``len``.
    Text after a child, comments and processing instructions are not kept."""

    __slots__ = ("attrib", "children", "tag", "text")

    def __init__(self, tag: str, attrib: dict[str, str] | None = None) -> None:
        self.tag = tag
        self.attrib = {} if attrib is None else attrib
        self.text: str | None = None
        self.children: list[Node] = []

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.attrib.get(key, default)

    def findall(self, path: str) -> list[Node]:
        found = [self]
        for tag in path.split("/"):
            found = [child for node in found for child in node.children if child.tag == tag]
        return found

    def find(self, path: str) -> Node | None:
        found = self.findall(path)
        return found[0] if found else None

    def append(self, child: Node) -> None:
        self.children.append(child)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)


class NodeBuilder:
    """Builds ``Node``s as ElementTree's ``TreeBuilder`` builds its elements: an
    element's text is the character data between its start and its first child or end."""

    def __init__(self) -> None:
        self._open: list[Node] = []
        self._root: Node | None = None
        self._text: list[str] = []
        self._texting: Node | None = None  # started, no child or end since

    def _flush(self) -> None:
        if self._texting is not None and self._text:
            self._texting.text = "".join(self._text)
        self._text.clear()

    def start(self, tag: str, attrs: dict[str, str], /) -> Node:
        if self._text:  # thousands of elements per replay: no call when there is none
            self._flush()
        node = Node(tag, attrs)
        if self._open:
            self._open[-1].children.append(node)
        else:  # expat allows one root
            self._root = node
        self._open.append(node)
        self._texting = node
        return node

    def end(self, tag: str, /) -> Node:
        if self._text:
            self._flush()
        self._texting = None
        return self._open.pop()

    def data(self, data: str, /) -> None:
        if self._texting is not None:
            self._text.append(data)

    def close(self) -> Node:
        if self._root is None or self._open:
            raise InputError("XML ended inside an element")  # expat refuses it first
        return self._root


def load(data: bytes | str, what: str = "input") -> Node:
    """Parse XML safely into ``Node``s; InputError with one line if it is not acceptable
    (see ``load_into``)."""
    return load_into(data, what, NodeBuilder())


def load_into(data: bytes | str, what: str, builder: Builder[T]) -> T:
    """Parse XML safely into what ``builder`` builds (``NodeBuilder``, ElementTree's
    ``TreeBuilder``); InputError with one line if it is not acceptable.

    Refused before the parser sees a byte: more than MAX_XML_BYTES, anything but UTF-8,
    a DOCTYPE or ENTITY declaration (libvirt never sends one; with the encoding fixed to
    UTF-8 the byte search is exact). The parser itself refuses any DOCTYPE or entity
    declaration it meets, loads no DTD, resolves no entity but XML's five and touches no
    network; it is fed in chunks and stopped past MAX_PARSE_SECONDS or MAX_ELEMENTS.
    Comments and processing instructions are dropped.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > MAX_XML_BYTES:
        raise InputError(f"{what}: XML larger than {MAX_XML_BYTES} bytes")
    data = _utf8_only(data, what)
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise InputError(f"{what}: a DOCTYPE or entity declaration is not allowed")
    if _HUGE_TAG.search(data):
        raise InputError(f"{what}: an XML tag with more than {MAX_TAG_CHARS} characters "
                         "besides its attribute values")
    try:
        return _bounded_parse(data, what, builder)
    except expat.ExpatError as exc:
        raise InputError(f"{what}: not well-formed XML: {exc}") from None


def _clark(name: str) -> str:
    """expat's ``URI}local`` (namespace_separator "}") as ElementTree's ``{URI}local``.
    Exact: expat refuses a namespace URI that holds the separator, and a name has none."""
    return "{" + name if "}" in name else name


def _bounded_parse(data: bytes, what: str, builder: Builder[T]) -> T:
    import time
    parser = expat.ParserCreate("UTF-8", "}")
    parser.buffer_text = True
    elements = 0

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal elements
        elements += 1
        if elements > MAX_ELEMENTS:
            raise InputError(f"{what}: XML with more than {MAX_ELEMENTS} elements")
        for key in attrs:  # most have no namespaced attribute: expat's dict as it is
            if "}" in key:
                attrs = {_clark(k): v for k, v in attrs.items()}
                break
        builder.start("{" + name if "}" in name else name, attrs)

    def declared(*_args: object) -> None:  # cannot happen after the byte search: belt
        raise InputError(f"{what}: a DOCTYPE or entity declaration is not allowed")

    parser.StartElementHandler = start
    # a Node's end needs no tag (expat has matched it): no call to spell it
    parser.EndElementHandler = (builder.end if isinstance(builder, NodeBuilder)
                                else lambda name: builder.end(_clark(name)))
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = declared
    parser.EntityDeclHandler = declared
    deadline = time.monotonic() + MAX_PARSE_SECONDS
    for offset in range(0, len(data), _CHUNK):
        parser.Parse(data[offset:offset + _CHUNK], False)
        if time.monotonic() > deadline:
            raise InputError(f"{what}: XML took more than {MAX_PARSE_SECONDS:g} s to "
                             "parse; refused")
    parser.Parse(b"", True)
    return builder.close()


def _local(el: Tree) -> str:
    return el.tag.rpartition("}")[2]


def _namespace(name: str) -> str | None:
    """The namespace of a tag or attribute name in ElementTree's ``{URI}local`` form."""
    return name[1:].partition("}")[0] if name.startswith("{") else None


def _text(el: Tree | None, path: str) -> str | None:
    if el is None:
        return None
    found = el.find(path)
    if found is None or found.text is None:
        return None
    return found.text.strip() or None


def _exact_text(el: Tree, path: str) -> str | None:
    """A name as libvirt keeps it: ``web1``, ``web1 `` and ``web1\t`` are three objects."""
    found = el.find(path)
    return found.text or None if found is not None else None


def _mac(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    mac = value.strip().lower()
    if not _MAC.fullmatch(mac):
        raise InputError(f"{what}: {shown(value)} is not a MAC address")
    return mac


def _ifname(value: str | None, what: str) -> str | None:
    """An interface name as the kernel and iptables read it, or InputError."""
    if value is None or value == "":
        return None
    if _IFNAME.fullmatch(value):
        return value
    reason = next((why for ch, why in _IFNAME_REASONS if ch in value), None)
    if reason is None and len(value.encode("utf-8", "surrogatepass")) > 15:
        reason = "longer than 15 bytes"
    if reason is None and any(ch.isspace() for ch in value):
        reason = "whitespace"
    raise InputError(f"{what}: {shown(value)} is not a usable interface name ("
                     + (reason or "only letters, digits, '_', '.' and '-', "
                        "not starting with '.' or '-'") + ")")


def _ip(value: str, what: str, family: int | None = None) -> IPAddress:
    """An address of either family (of ``family`` only, when given)."""
    try:
        addr = ip_address(value.strip())
    except ValueError:
        raise InputError(f"{what}: {shown(value)} is not an IP address") from None
    _no_zone(addr, value, what)
    if family is not None and addr.version != family:
        raise InputError(f"{what}: {shown(value)} is not an IPv{family} address")
    return addr


def _no_zone(addr: IPAddress | IPNetwork, value: str, what: str) -> None:
    """InputError for an IPv6 zone index (``fe80::1%eth0``): Python keeps it and counts
    the address unequal to the same one without it (so every check of whose address it
    is would pass), and iptables refuses it, failing the whole write it is in."""
    where = addr.network_address if hasattr(addr, "network_address") else addr
    if getattr(where, "scope_id", None):
        raise InputError(f"{what}: {shown(value)} has a zone index (%…); give the "
                         "address alone")


def _forward_ip(value: str, what: str) -> IPAddress:
    """A forward's address (guest-ip, host-ip). An IPv4-mapped IPv6 address
    (``::ffff:192.0.2.7``, as ``ss`` shows the IPv4 peers of dual-stack sockets) is that
    IPv4 address: no IPv6 packet carries one, so read as IPv6 it would match nothing."""
    addr = _ip(value, what)
    mapped = addr.ipv4_mapped if isinstance(addr, IPv6Address) else None
    return addr if mapped is None else mapped


def _guest_ips(value: str, what: str) -> tuple[IPAddress, ...]:
    """``guest-ip``: one address, or one of each family separated by a comma."""
    out: list[IPAddress] = []
    for part in value.split(","):
        addr = _forward_ip(part, what)
        if any(a.version == addr.version for a in out):
            raise InputError(f"{what}: {shown(value)} has two IPv{addr.version} addresses; "
                             "give at most one of each family")
        out.append(addr)
    return tuple(out)


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


def _sources(value: str, what: str) -> tuple[IPNetwork, ...]:
    """The distinct sources of a ``source`` attribute, in order. A CIDR with host bits
    set (``198.51.100.7/3``, a mistyped /32) is an error, never widened to its network."""
    if not value.strip():  # not "anyone": that is what leaving source out says
        raise InputError(f"{what}: empty; leave source out to allow anyone")
    if value.count(",") >= MAX_SOURCES:
        raise InputError(f"{what}: more than {MAX_SOURCES} sources; use wider CIDRs")
    out: dict[IPNetwork, None] = {}  # ordered and linear: a list's "in" is quadratic
    for part in value.split(","):
        part = part.strip()
        if not part:
            raise InputError(f"{what}: empty entry in {shown(value)}")
        try:
            net = ip_network(part, strict=False)
        except ValueError:
            raise InputError(f"{what}: {shown(part)} is not an address or CIDR") from None
        _no_zone(net, part, what)
        addr = ip_address(part.partition("/")[0]) if "/" in part else None
        if addr is not None and addr != net.network_address:
            raise InputError(f"{what}: {shown(part)} has host bits set: {addr}/"
                             f"{net.max_prefixlen} or {net}? (write the one meant)")
        out.setdefault(_unmapped(net))
    return tuple(out)


_MAPPED = ip_network("::ffff:0:0/96")


def _unmapped(net: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network (``::ffff:198.51.100.0/120``) as the IPv4 network it
    names (``198.51.100.0/24``); any other network as it is. A source limited to mapped
    addresses would match no packet at all and close the forward's IPv4 side."""
    if net.version != 6 or not net.subnet_of(_MAPPED):  # type: ignore[arg-type]
        return net
    return ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")


# --------------------------------------------------------------------------- forwards

def _forwards_element(metadata: Tree | None, owner: str) -> Tree | None:
    if metadata is None:
        return None
    found = [c for c in metadata if _namespace(c.tag) == NAMESPACE]
    if not found:
        return None
    if len(found) > 1 or _local(found[0]) != "forwards":
        raise InputError(f"{owner}: metadata in {NAMESPACE} must be one <forwards> element")
    return found[0]


def parse_forwards(metadata: Tree | None, owner: str,
                   allowed: frozenset[str]) -> tuple[ForwardSpec, ...]:
    """The ``<forwards>`` of a ``<metadata>`` element (prefixed or unprefixed children)."""
    specs: list[ForwardSpec] = []
    rules = 0
    for index, el in forward_elements(metadata, owner):
        specs.append(_plain_forward(el.attrib, allowed)
                     or _parse_forward(el, f"{owner}: forward #{index}", allowed))
        rules += 2 * max(1, len(specs[-1].sources)) + 3
        if rules > MAX_RULES:
            raise InputError(f"{owner}: forwards that need more than {MAX_RULES} rules "
                             f"(forward #{index}); use fewer sources or port ranges")
    return tuple(specs)


_FORWARD = "{" + NAMESPACE + "}forward"


def forward_elements(metadata: Tree | None, owner: str) -> Iterator[tuple[int, Tree]]:
    """Each ``<forward>`` of our ``<forwards>`` in ``metadata`` and its number, checked
    one by one as it comes (InputError for an element that is not one); ``forward``
    edits read our metadata through this and ``forward_attrs``, as the hooks do."""
    root = _forwards_element(metadata, owner)
    if root is None:
        return
    for index, el in enumerate(root, start=1):
        if el.tag != _FORWARD and el.tag != "forward" and (  # the common tags: no split
                _local(el) != "forward" or _namespace(el.tag) not in (None, NAMESPACE)):
            raise InputError(f"{owner}: forward #{index}: unknown element "
                             f"{shown(_local(el))} in <forwards>")
        if index > MAX_FORWARDS:
            raise InputError(f"{owner}: more than {MAX_FORWARDS} forwards")
        yield index, el


def forward_attrs(el: Tree, where: str,
                  allowed: frozenset[str] | None) -> tuple[str, dict[str, str]]:
    """Where a ``<forward>`` is (``where`` and its host-port) and its attributes by local
    name: InputError for one of another namespace, one given twice (plain and in ours)
    or, unless ``allowed`` is None, one not in ``allowed``."""
    if el.get("host-port") is not None:
        where = f"{where} (host-port {shown(el.get('host-port'), 20)})"
    attrs: dict[str, str] = {}
    for key, value in el.attrib.items():
        local = key.rpartition("}")[2]
        if _namespace(key) not in (None, NAMESPACE) or (allowed is not None
                                                          and local not in allowed):
            raise InputError(f"{where}: unknown attribute {shown(local)}")
        if local in attrs:  # plain and in our namespace: which one would be meant?
            raise InputError(f"{where}: attribute {shown(local)} given twice")
        attrs[local] = value
    return where, attrs


def parse_forward_attrs(attrs: dict[str, str], where: str,
                        allowed: frozenset[str]) -> ForwardSpec:
    """One forward from its attributes (``forward add/remove``), checked as in XML."""
    return _parse_forward(Node("forward", attrs), where, allowed)


_PLAIN = frozenset({"proto", "host-port", "guest-port", "comment"})


def _plain_forward(attrs: dict[str, str], allowed: frozenset[str]) -> ForwardSpec | None:
    """The common forward (proto, ports, comment, every one valid as written), exactly as
    ``_parse_forward`` reads it, without building its messages; None for anything
    else, which ``_parse_forward`` reads (or refuses, with its one line)."""
    if not attrs.keys() <= _PLAIN or not attrs.keys() <= allowed or "host-port" not in attrs:
        return None
    proto = attrs.get("proto")
    proto = "tcp" if proto is None else proto.strip().lower()
    host_port = _plain_ports(attrs["host-port"])
    guest = attrs.get("guest-port")
    guest_port = host_port if guest is None else _plain_ports(guest)
    if (proto not in PROTOCOLS or host_port is None or guest_port is None
            or guest_port.last - guest_port.first != host_port.last - host_port.first):
        return None
    return ForwardSpec(proto, host_port, guest_port, (), None, None, None, (),
                       attrs.get("comment"))


def _plain_ports(value: str) -> PortRange | None:
    """``_ports`` of a value it accepts with nothing to strip; None otherwise."""
    if value.isdigit() and value.isascii() and len(value) <= 5:  # one port, most often
        port = int(value)
        return PortRange(port, port) if 1 <= port <= 65535 else None
    match = _PORTS.fullmatch(value)
    if not match:
        return None
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if not (1 <= first <= last <= 65535):
        return None
    return PortRange(first, last)


def _parse_forward(el: Tree, where: str, allowed: frozenset[str]) -> ForwardSpec:
    where, attrs = forward_attrs(el, where, allowed)
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
    spec = ForwardSpec(
        proto=proto,
        host_port=host_port,
        guest_port=guest_port,
        guest_ips=_guest_ips(attrs["guest-ip"], f"{where}: guest-ip")
        if "guest-ip" in attrs else (),
        mac=_mac(attrs.get("mac"), f"{where}: mac"),
        guest_mac=_mac(attrs.get("guest-mac"), f"{where}: guest-mac"),
        host_ip=(_forward_ip(attrs["host-ip"], f"{where}: host-ip")
                 if "host-ip" in attrs else None),
        sources=_sources(attrs["source"], f"{where}: source") if "source" in attrs else (),
        comment=attrs.get("comment"),
        allow_host_service=_yes_no(attrs.get("allow-host-service", "no"),
                                   f"{where}: allow-host-service"),
    )
    if not spec.families:
        raise InputError(f"{where}: {_families_disagree(spec)} name no address family in "
                         "common: the forward could never match a packet")
    return spec


def _families_disagree(spec: ForwardSpec) -> str:
    """``host-ip (IPv4) and source (IPv6)``: the attributes that limit the family."""
    def names(addrs: Iterable[IPAddress | IPNetwork]) -> str:
        return "/".join(f"IPv{f}" for f in sorted({a.version for a in addrs}))
    parts = [(attr, names(addrs)) for attr, addrs in (
        ("host-ip", [spec.host_ip] if spec.host_ip is not None else []),
        ("guest-ip", spec.guest_ips), ("source", spec.sources)) if addrs]
    return " and ".join(f"{attr} ({fams})" for attr, fams in parts)


def _yes_no(value: str, what: str) -> bool:
    if value.strip().lower() not in ("yes", "no"):
        raise InputError(f"{what}: {shown(value)} is not yes or no")
    return value.strip().lower() == "yes"


def _named(el: Tree, kind: str) -> tuple[str, str]:
    """The object's name, and how messages call it: ``domain 'web1'``."""
    if _local(el) != kind:
        raise InputError(f"expected <{kind}>, found <{_local(el)}>")
    name = _exact_text(el, "name")
    if not name:
        raise InputError(f"{kind}: <name> is missing")
    return name, f"{kind} {shown(name)}"


# --------------------------------------------------------------------------- network

def parse_network(el: Tree) -> Network:
    """A ``<network>`` element (live or persistent definition)."""
    name, what = _named(el, "network")
    fwd = el.find("forward")
    if fwd is None:
        mode = "isolated"
        dev = None
    else:
        mode = fwd.attrib.get("mode", "nat")
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
            else:
                ipv4.append(IPv4Interface(f"{address}/{prefix or netmask or 24}"))
        except ValueError:
            raise InputError(f"{what}: bad <ip address={shown(address)}>") from None
        version = 6 if family == "ipv6" else 4
        for host in ip_el.findall("dhcp/host"):
            host_ip = host.get("ip")
            if not host_ip:
                continue
            # libvirt matches an IPv6 reservation by name or DUID, never by MAC
            mac = _mac(host.get("mac"), f"{what}: dhcp host mac") if version == 4 else None
            hosts.append(DhcpHost(mac=mac, ip=_ip(host_ip, f"{what}: dhcp host ip", version),
                                  name=host.get("name")))
    forwards = parse_forwards(el.find("metadata"), what, NETWORK_ATTRS)
    nat_el = fwd.find("nat") if fwd is not None else None
    nat_ipv6 = nat_el is not None and (nat_el.get("ipv6") or "").strip() == "yes"
    return Network(name=name, uuid=_text(el, "uuid"), mode=mode, bridge=bridge, dev=dev,
                   ipv4=tuple(ipv4), ipv6=tuple(ipv6), hosts=tuple(hosts),
                   forwards=forwards, nat_ports=nat_ports, nat_ipv6=nat_ipv6)


def parse_networkport(el: Tree) -> NetworkPort:
    plug = el.find("plug")
    mac_el = el.find("mac")
    return NetworkPort(
        owner_name=_exact_text(el, "owner/name"),
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

def parse_domain(el: Tree) -> Domain:
    name, what = _named(el, "domain")
    nics: list[Nic] = []
    for iface in el.findall("devices/interface"):
        kind = iface.attrib.get("type", "")
        if kind not in ("network", "bridge"):
            continue
        source = iface.find("source")
        mac_el = iface.find("mac")
        target_el = iface.find("target")
        nics.append(Nic(
            mac=_mac(mac_el.get("address") if mac_el is not None else None, f"{what}: NIC mac"),
            network=source.get("network") if source is not None and kind == "network" else None,
            bridge=_ifname(source.get("bridge") if source is not None else None,
                           f"{what}: NIC bridge"),
            type=kind,
            target=_ifname(target_el.get("dev") if target_el is not None else None,
                           f"{what}: NIC target"),
        ))
    forwards = parse_forwards(el.find("metadata"), what, DOMAIN_ATTRS)
    return Domain(name=name, uuid=_text(el, "uuid"), nics=tuple(nics), forwards=forwards)


_WRAPPERS = {"networkstatus": "network", "hookData": "network", "domstatus": "domain"}


def _unwrap(root: Tree, what: str) -> Tree:
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
        return _exact_text(root, "name") if _local(root) in ("network", "domain") else None
    except InputError:
        return None


def parse_override(data: bytes | str, what: str) -> tuple[ForwardSpec, ...]:
    """The forwards ``forward add --network`` gave a running network: our ``<forwards>``
    element, or (as earlier versions kept it) a whole network holding one. Only the
    forwards: everything else of the network is libvirt's live XML, ``net-update``s
    included."""
    root = load(data, what)
    if _local(root) == "forwards" and _namespace(root.tag) == NAMESPACE:
        holder = Node("metadata")
        holder.append(root)
        return parse_forwards(holder, what, NETWORK_ATTRS)
    return parse_network(_unwrap(root, what)).forwards
