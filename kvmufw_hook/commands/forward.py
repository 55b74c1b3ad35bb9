"""``kvmufw_hook forward add/remove/list``: edit the forwards metadata through libvirt and
apply the change at once, without restarting the guest or the network.

Everything is validated before anything is written: the new metadata must parse, every
forward must resolve to a guest address, and no host port may clash with another guest
or network. Then the metadata is written (a running guest: live and persistent; an
inactive one: persistent; a network: its persistent definition) and the rules applied.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from typing import Any
from xml.etree import ElementTree
from xml.etree.ElementTree import Element, SubElement, TreeBuilder

from .. import ops, state
from ..errors import InputError, shown
from ..log import log
from ..model import Domain, ForwardSpec, Network
from ..names import NAMESPACE
from ..parse import (
    DOMAIN_ATTRS,
    NETWORK_ATTRS,
    forward_attrs,
    forward_elements,
    load,
    load_into,
    parse_domain,
    parse_forward_attrs,
    parse_forwards,
    parse_network,
)
from ..plan import (
    check_conflicts,
    resolve_domain_forwards,
    resolve_network_forwards,
    same_host_port,
)
from ..virt import KEY, connect, libvirt_module, lookup
from . import add_connect, describe, write_json
from .table import shown_name, table

Attrs = dict[str, str]
_SPEC = re.compile(r"([0-9]+(?:-[0-9]+)?)(?::([0-9]+(?:-[0-9]+)?))?(?:/([A-Za-z]+))?")


def parse_spec(spec: str) -> Attrs:
    """``HOST_PORT[:GUEST_PORT][/PROTO]`` -> forward attributes."""
    match = _SPEC.fullmatch(spec.strip())
    if not match:
        raise InputError(f"{shown(spec)}: expected HOST_PORT[:GUEST_PORT][/PROTO], "
                         "e.g. 2222:22/tcp or 6000-6002:5000-5002/udp")
    attrs = {"host-port": match.group(1)}
    if match.group(2):
        attrs["guest-port"] = match.group(2)
    if match.group(3):
        attrs["proto"] = match.group(3).lower()
    return attrs


def _addresses(text: str) -> list[str]:
    """The addresses of an attribute that may hold several (``guest-ip="10.0.0.5,
    2001:db8::5"``, ``source``), as typed, without the spaces around each."""
    return [a.strip() for a in text.split(",") if a.strip()]


def endpoint(addresses: list[str], port: str) -> str:
    """``10.0.0.5:22``, ``[2001:db8::5]:22``, ``10.0.0.5,[2001:db8::5]:22``: an IPv6
    address in brackets, so the port after the last colon is every address's port."""
    shown_addresses = [f"[{a}]" if ":" in a and not a.startswith("[") else a
                       for a in addresses]
    return f"{','.join(shown_addresses)}:{port}"


# How the elements we write name their namespaces (ElementTree would write ns0:, ns1:):
# ours as libvirt writes it, and libvirt's dnsmasq options of a network definition.
ElementTree.register_namespace(KEY, NAMESPACE)
ElementTree.register_namespace("dnsmasq", "http://libvirt.org/schemas/network/dnsmasq/1.0")
_OURS = f"{{{NAMESPACE}}}"


def _xml(element: Element) -> str:
    """The element as text libvirt reads back the same. ElementTree writes a carriage
    return in text raw, which the next parse reads as a newline; in attribute values
    it writes ``&#13;``, so every raw one is text's (comments and processing
    instructions are dropped when read)."""
    return ElementTree.tostring(element, encoding="unicode").replace("\r", "&#13;")


def _tree(data: str | bytes, what: str) -> Element:
    """A document as ElementTree's elements, to edit and write back: read by the same
    bounded parser as every other document (``parse.load_into``)."""
    return load_into(data, what, TreeBuilder())


def _forwards_of(root: Element, what: str | None = None) -> list[Attrs]:
    """The attributes of each ``<forward>`` in our metadata, as written. With ``what``
    (an edit, which writes them back as ours), read as the hooks read them: what they
    refuse but a value (another element, an attribute of another namespace or given
    twice) is refused here, with their line, not rewritten into forwards nobody wrote;
    a broken value is kept (``forward remove`` removes it, the rest is refused later)."""
    metadata = root.find("metadata")
    if metadata is None:
        return []
    if what is not None:
        return [forward_attrs(el, f"{what}: forward #{index}", None)[1]
                for index, el in forward_elements(metadata, what)]
    return [{key.rpartition("}")[2]: value for key, value in fwd.attrib.items()}
            for el in metadata if el.tag.startswith(_OURS) for fwd in el]


def _forwards_element(forwards: list[Attrs]) -> Element:
    root = Element(f"{_OURS}forwards")
    for attrs in forwards:
        SubElement(root, f"{_OURS}forward", attrs)
    return root


def _plain_forwards(forwards: list[Attrs]) -> str:
    """The same without a namespace: what ``virDomainSetMetadata`` takes (libvirt puts
    the element in our namespace under the key itself, as ``virsh metadata`` does)."""
    root = Element("forwards")
    for attrs in forwards:
        SubElement(root, "forward", attrs)
    return _xml(root)


def _with_forwards(root: Element, forwards: list[Attrs]) -> Element:
    """A copy of a domain/network element whose metadata holds exactly ``forwards``."""
    copy = deepcopy(root)
    metadata = copy.find("metadata")
    if metadata is None:
        metadata = Element("metadata")
        anchor = copy.find("uuid") if copy.find("uuid") is not None else copy.find("name")
        copy.insert(0 if anchor is None else list(copy).index(anchor) + 1, metadata)
    for el in list(metadata):
        if el.tag.startswith(_OURS):
            metadata.remove(el)
    if forwards:
        metadata.append(_forwards_element(forwards))
    return copy


def _spec_of(attrs: Attrs, allowed: frozenset[str]) -> ForwardSpec | None:
    try:
        return parse_forward_attrs(attrs, "", allowed)
    except InputError:
        return None  # a broken entry: the new metadata as a whole is refused later


def _written_the_same(attrs: Attrs, spec: Attrs) -> bool:
    """A forward that does not parse is still matched by what was typed, so that
    ``forward remove`` can remove it."""
    return (attrs.get("host-port", "").strip() == spec["host-port"]
            and attrs.get("proto", "tcp").strip().lower() == spec.get("proto", "tcp"))


class _Unchanged(InputError):
    """This list of forwards already is as the change wants it (added, or removed)."""


def _change_each(change: Callable[[list[Attrs]], list[Attrs]],
                 lists: list[list[Attrs] | None]) -> list[list[Attrs] | None]:
    """The change made to each list of forwards there is (the running guest's, its next
    boot's): each keeps what only it has. Refused only if no list needs it."""
    out: list[list[Attrs] | None] = []
    unchanged: list[_Unchanged] = []
    for forwards in lists:
        try:
            out.append(None if forwards is None else change(forwards))
        except _Unchanged as exc:
            out.append(forwards)
            unchanged.append(exc)
    if len(unchanged) == sum(f is not None for f in lists):
        raise unchanged[0]
    return out


def _change(action: str, spec: Attrs, what: str,
            allowed: frozenset[str]) -> Callable[[list[Attrs]], list[Attrs]]:
    """What ``add``/``remove`` make of the forwards. "The same forward" is the planner's
    (``same_host_port``): the same proto, overlapping host ports, the same host-ip or
    either one on every address; ``remove`` picks one by ``host-ip`` when several match."""
    wanted = parse_forward_attrs(spec, what, allowed)
    typed = f"{wanted.proto} " + (endpoint([str(wanted.host_ip)], str(wanted.host_port))
                                  if wanted.host_ip else str(wanted.host_port))

    def matches(attrs: Attrs) -> bool:
        old = _spec_of(attrs, allowed)
        return same_host_port(old, wanted) if old else _written_the_same(attrs, spec)

    def change(forwards: list[Attrs]) -> list[Attrs]:
        found = [f for f in forwards if matches(f)]
        if action == "add":
            if found:
                old = _spec_of(found[0], allowed)
                raise _Unchanged(f"{what}: {typed} is already forwarded"
                                 + (f" ({old.label})" if old else "") + "; remove it first")
            return [*forwards, spec]
        if not found:
            raise _Unchanged(f"{what}: no forward of {typed}")
        if len(found) > 1:
            specs = [_spec_of(f, allowed) for f in found]
            labels = ", ".join(s.label for s in specs if s) or f"{len(found)} entries"
            raise InputError(f"{what}: {len(found)} forwards match {typed} ({labels}); "
                             "say which with --host-ip")
        return [f for f in forwards if f is not found[0]]
    return change


# --------------------------------------------------------------------------- live state

def _live(conn: Any) -> tuple[dict[str, Network], dict[str, Domain]]:
    libvirt = libvirt_module()
    networks: dict[str, Network] = {}
    for net in conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE):
        network = parse_network(load(net.XMLDesc(0), f"network {net.name()}"))
        networks[network.name] = state.with_override(network)
    domains: dict[str, Domain] = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            domain = parse_domain(load(dom.XMLDesc(0), f"domain {dom.name()}"))
        except InputError:
            continue  # a guest with broken metadata claims nothing we could check
        domains[domain.name] = domain
    return networks, domains


# --------------------------------------------------------------------------- commands

@contextmanager
def _editing(uri: str, kind: str, name: str) -> Iterator[tuple[Any, Any, Any]]:
    """(libvirt module, connection, object) for a change; libvirt's refusals become one
    line naming the object."""
    libvirt = libvirt_module()
    conn = connect(uri, readonly=False)
    try:
        yield libvirt, conn, lookup(conn, kind, name)
    except libvirt.libvirtError as exc:
        raise InputError(f"{kind} {shown(name)}: libvirt refused the change: {exc}") from None
    finally:
        conn.close()


def _done(what: str, action: str, spec: Attrs, now: bool, later: str) -> str:
    host = (endpoint(_addresses(spec["host-ip"]), spec["host-port"]) if spec.get("host-ip")
            else spec["host-port"])
    return (f"{what}: {action} {spec.get('proto', 'tcp')} {host}: "
            + ("applied" if now else f"saved; applied when {later}"))


def _resolve_if_networks_up(dom: Domain, conn: Any) -> None:
    """An inactive guest whose networks are all active: its addresses are checked now,
    through the same planner path as at its start (a ``guest-ip`` that is another
    guest's is refused now, not at the next boot)."""
    wanted = {nic.network for nic in dom.nics if nic.network}
    if not wanted:
        return
    networks, _domains = _live(conn)
    if wanted <= set(networks):
        resolve_domain_forwards(dom, networks)


def edit_domain(uri: str, name: str, action: str, spec: Attrs,
                log: Callable[[str], None] = lambda m: None) -> str:
    """The running guest's forwards (live) and its next boot's (persistent) are changed
    each as they are: a forward prepared for the next boot (``virsh edit``, ``metadata
    --config``) is not lost by an add on the running guest, nor started early."""
    what = f"domain {shown(name)}"
    with _editing(uri, "domain", name) as (libvirt, conn, dom):
        running, persistent = bool(dom.isActive()), bool(dom.isPersistent())
        live_root = _tree(dom.XMLDesc(0), what) if running else None
        config_root = (_tree(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), what)
                       if persistent else None)
        live, config = _change_each(
            _change(action, spec, what, DOMAIN_ATTRS),
            [_forwards_of(r, what) if r is not None else None for r in (live_root, config_root)])
        if live_root is not None and live is not None:
            # the start hook's own checks, and nothing else: no state, no rule
            ops.domain_arriving(parse_domain(_with_forwards(live_root, live)))
        if config_root is not None and config is not None:
            later = parse_domain(_with_forwards(config_root, config))
            check_conflicts(what, later.forwards, ())
            if not running:
                _resolve_if_networks_up(later, conn)
        if config is not None:  # first: it changes no rule, and it is put back if live fails
            _set_forwards(libvirt, dom, config, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if live is not None:
            try:
                _set_forwards(libvirt, dom, live, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError:
                if config is not None and config_root is not None:
                    _set_forwards(libvirt, dom, _forwards_of(config_root, what),
                                  libvirt.VIR_DOMAIN_AFFECT_CONFIG)
                raise
            raw = dom.XMLDesc(0).encode()
            ops.domain_started(parse_domain(load(raw)), raw, log=log)
        return _done(what, action, spec, running, "the guest starts")


def _set_forwards(libvirt: Any, dom: Any, forwards: list[Attrs], flags: int) -> None:
    meta = _plain_forwards(forwards) if forwards else None
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, meta, KEY if meta else None,
                    NAMESPACE, flags)


def edit_network(uri: str, name: str, action: str, spec: Attrs,
                 log: Callable[[str], None] = lambda m: None) -> str:
    """The persistent definition and, for an active network, its running forwards (libvirt
    keeps the running XML until the network restarts: ours go in an override that the
    hooks, replay, status and doctor apply until then) are changed each as they are."""
    what = f"network {shown(name)}"
    with _editing(uri, "network", name) as (libvirt, conn, net):
        persistent = _tree(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE), what)
        live_root = _tree(net.XMLDesc(0), what) if net.isActive() else None
        live, config = _change_each(
            _change(action, spec, what, NETWORK_ATTRS),
            [_running_forwards(name, live_root, what) if live_root is not None else None,
             _forwards_of(persistent, what)])
        new_persistent = _with_forwards(persistent, config or [])
        resolve_network_forwards(parse_network(new_persistent))
        if live_root is not None and live is not None:
            # the start hook's own checks before anything is written
            live_model = parse_network(_with_forwards(live_root, live))
            ops.network_arriving(live_model)
            previous = state.network_override(name)
            state.save_network_override(name, _xml(_forwards_element(live)).encode())
            try:
                ops.network_started(live_model, _xml(live_root).encode(), log=log)
            except BaseException:  # refused or failed: no override, no definition
                if previous is None:
                    state.forget_network_override(name)
                else:
                    state.save_network_override(name, previous)
                raise
        conn.networkDefineXML(_xml(new_persistent))
        return _done(what, action, spec, live_root is not None, "the network starts")


def _running_forwards(name: str, live_root: Element, what: str) -> list[Attrs]:
    """The running network's forwards: the override's, if ``forward add`` left one."""
    data = state.network_override(name)
    if data is None:
        return _forwards_of(live_root, what)
    root = _tree(data, f"network {shown(name)}: override")
    if root.tag.rpartition("}")[2] == "forwards":
        holder = Element("network")
        SubElement(holder, "metadata").append(root)
        root = holder
    return _forwards_of(root, what)


def validate_spec(spec: Attrs, network: bool, label: str) -> None:
    """The attributes alone, before libvirt is asked anything."""
    allowed = NETWORK_ATTRS if network else DOMAIN_ATTRS
    element = Element("metadata")
    element.append(_forwards_element([spec]))
    parse_forwards(element, label, allowed)


def list_forwards(uri: str, domain: str | None, network: str | None) -> list[dict[str, Any]]:
    libvirt = libvirt_module()
    conn = connect(uri)
    try:
        rows = []
        if network:
            objs = [("network", lookup(conn, "network", network))]
        elif domain:
            objs = [("domain", lookup(conn, "domain", domain))]
        else:
            objs = [("network", n) for n in conn.listAllNetworks()] + \
                   [("domain", d) for d in conn.listAllDomains()]
        for kind, obj in objs:
            inactive = (libvirt.VIR_NETWORK_XML_INACTIVE if kind == "network"
                        else libvirt.VIR_DOMAIN_XML_INACTIVE)
            xml = obj.XMLDesc(0 if obj.isActive() and kind == "domain" else inactive)
            for attrs in _forwards_of(_tree(xml, f"{kind} {obj.name()}")):
                rows.append({"owner": f"{kind} {obj.name()}", "active": bool(obj.isActive()),
                             **attrs})
        return rows
    finally:
        conn.close()


LIST_HEADER = ("OWNER", "PROTO", "HOST", "GUEST", "SOURCE", "COMMENT")


def list_row(row: dict[str, Any]) -> tuple[str, ...]:
    """One row of ``forward list``, as typed but readable in both families: HOST
    ``*:8080`` or ``[2001:db8::1]:8080``; GUEST the guest-ip addresses joined by ","
    (``10.0.0.5,[2001:db8::5]:22``), else the NIC or reservation it names."""
    port = row.get("host-port", "?")
    guest_port = row.get("guest-port", port)
    host = endpoint(_addresses(row["host-ip"]), port) if "host-ip" in row else f"*:{port}"
    if "guest-ip" in row:
        guest = endpoint(_addresses(row["guest-ip"]), guest_port)
    else:  # a MAC is no address: no brackets
        guest = f"{row.get('guest-mac') or row.get('mac') or '(reservation)'}:{guest_port}"
    kind, _, name = row["owner"].partition(" ")
    owner = f"{kind} {shown_name(name)}" + ("" if row["active"] else " (inactive)")
    source = ",".join(_addresses(row["source"])) if "source" in row else "any"
    return (owner, row.get("proto", "tcp"), host, guest, source, row.get("comment", ""))


def format_list(rows: list[dict[str, Any]]) -> str:
    """The ``forward list`` table (``--json`` keeps the exact text)."""
    return table([LIST_HEADER, *(list_row(r) for r in rows)])


# --------------------------------------------------------------------------- command line

SPEC_HELP = "HOST_PORT[:GUEST_PORT][/PROTO]"


def register(parser: argparse.ArgumentParser, name: str) -> None:
    describe(parser, "Edit the forwards metadata through libvirt and apply it at once: a "
             "running guest keeps running; a network's persistent definition is updated and "
             "its rules applied now. Everything is checked before anything is written.",
             "examples:\n"
             "  kvmufw_hook forward add web1 2222:22\n"
             "  kvmufw_hook forward add web1 6000-6002:5000-5002/udp --source 198.51.100.0/24\n"
             "  kvmufw_hook forward add --network lab 8080:80 --guest-mac 52:54:00:00:00:20\n"
             "  kvmufw_hook forward remove web1 2222/tcp [--host-ip IP]\n"
             "  kvmufw_hook forward list web1")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser("add", help="add a forward and apply it")
    describe(add, "Add a forward to a domain (DOMAIN SPEC) or a network (--network NAME "
             f"SPEC), SPEC being {SPEC_HELP}, and apply it at once.",
             "examples:\n"
             "  kvmufw_hook forward add web1 2222:22\n"
             "  kvmufw_hook forward add web1 6000-6002:5000-5002/udp --source 198.51.100.0/24\n"
             "  kvmufw_hook forward add --network lab 8080:80 --guest-mac 52:54:00:00:00:20")
    _target(add)
    add.add_argument("--source", metavar="CIDR[,CIDR…]", help="only from these addresses")
    add.add_argument("--host-ip", metavar="IP", help="only to this host address")
    add.add_argument("--mac", metavar="MAC", help="domain: which NIC")
    add.add_argument("--guest-ip", metavar="IP", help="the guest's address")
    add.add_argument("--guest-mac", metavar="MAC",
                     help="network: resolve the guest through <dhcp><host>")
    add.add_argument("--comment", metavar="TEXT", help="shown by status and list")
    add.add_argument("--allow-host-service", action="store_true",
                     help="set allow-host-service=yes (grants nothing by itself: root "
                     "allows host services in /etc/kvmufw_hook/kvmufw_hook.conf)")
    add.set_defaults(func=add_command)

    remove = actions.add_parser("remove", help="remove a forward and apply that")
    describe(remove, "Remove a domain's (DOMAIN SPEC) or a network's (--network NAME SPEC) "
             "forward, SPEC being HOST_PORT[/PROTO]; --host-ip picks one where several "
             "forwards share the port.",
             "examples:\n  kvmufw_hook forward remove web1 2222/tcp\n"
             "  kvmufw_hook forward remove --network lab 8080")
    _target(remove)
    remove.add_argument("--host-ip", metavar="IP", help="the forward to this host address")
    remove.set_defaults(func=remove_command)

    listing = actions.add_parser("list", help="list forwards as the metadata has them")
    describe(listing, "The forwards of one domain, one network (--network NAME), or all, as "
             "their metadata says (status says whether their rules are in).",
             "examples:\n  kvmufw_hook forward list web1\n  kvmufw_hook forward list --json")
    listing.add_argument("domain", nargs="?", metavar="DOMAIN", help="only this domain's")
    listing.add_argument("--network", metavar="NAME", help="only this network's")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    add_connect(listing)
    listing.set_defaults(func=list_command, needs_root=False)


def _target(parser: argparse.ArgumentParser) -> None:
    """``DOMAIN SPEC`` or ``--network NAME SPEC``."""
    parser.add_argument("domain", nargs="?", metavar="DOMAIN",
                        help="the domain (leave out with --network)")
    parser.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    parser.add_argument("--network", metavar="NAME",
                        help="a network's forward instead of a domain's")
    add_connect(parser)


def _target_of(args: argparse.Namespace) -> tuple[str, str]:
    """The domain or network a change is for, and its SPEC."""
    if bool(args.network) == bool(args.domain):
        raise InputError(f"usage: kvmufw_hook forward {args.action} "
                         "DOMAIN SPEC | --network NAME SPEC"
                         f"  (SPEC: {SPEC_HELP})")
    return args.network or args.domain, args.spec


def _apply(args: argparse.Namespace, target: str, spec: Attrs) -> int:
    change = edit_network if args.network else edit_domain
    message = change(args.connect, target, args.action, spec, log=log)
    log(message)
    print(message)
    return 0


def add_command(args: argparse.Namespace) -> int:
    target, spec_text = _target_of(args)
    spec = parse_spec(spec_text)
    # `is not None`: an empty value (--source '') is checked, and refused, as typed
    for option, attr in (("source", "source"), ("host_ip", "host-ip"),
                         ("comment", "comment"), ("mac", "mac"),
                         ("guest_ip", "guest-ip"), ("guest_mac", "guest-mac")):
        if getattr(args, option) is not None:
            spec[attr] = getattr(args, option)
    if args.allow_host_service:
        spec["allow-host-service"] = "yes"
    if args.network and not (args.guest_ip or args.guest_mac):
        raise InputError("a network forward needs --guest-ip or --guest-mac")
    if args.network and args.mac:
        raise InputError("--mac picks a domain's NIC; with --network use --guest-mac")
    if not args.network and args.guest_mac:
        raise InputError("--guest-mac is for --network forwards; a domain forward "
                         "picks its NIC with --mac")
    validate_spec(spec, bool(args.network),
                  f"{'network' if args.network else 'domain'} '{target}'")
    return _apply(args, target, spec)


def remove_command(args: argparse.Namespace) -> int:
    target, spec_text = _target_of(args)
    if ":" in spec_text:
        raise InputError("forward remove takes only DOMAIN (or --network NAME), "
                         "HOST_PORT[/PROTO] and --host-ip")
    spec = parse_spec(spec_text)
    if args.host_ip is not None:
        spec["host-ip"] = args.host_ip
    return _apply(args, target, spec)


def list_command(args: argparse.Namespace) -> int:
    if args.network and args.domain:
        raise InputError("usage: kvmufw_hook forward list [DOMAIN | --network NAME]")
    rows = list_forwards(args.connect, args.domain, args.network)
    if args.json:
        write_json(rows)
    else:
        sys.stdout.write(format_list(rows))
    return 0
