"""The nftables backend: our own ``table inet kvmufw`` (both families), where every
forward and every network is data, elements of sets and maps, and the rules are a fixed
skeleton that looks each packet up once.

Promises:
- Everything of ours lives in ``table inet kvmufw``, except a fixed number of glue rules
  (``GLUE``: one accept at the top of filter INPUT and FORWARD in each iptables family,
  and of libvirt's ``guest_input`` / ``guest_output`` where libvirt uses nftables),
  whatever the number of forwards. An accept in one table does not stop another table's
  base chain at the same hook, so our table marks what it accepts with ``MARK`` and the
  glue lets marked packets through UFW's DROP policy and libvirt's rejects.
- A forward is elements only: DNAT by host address . source . protocol . host port (a
  map to the guest address, or to address . port where the port changes), the FORWARD
  accept of DNAT'd packets by bridge . guest . protocol . guest port, and the hairpin
  masquerade. The common forward (any source, one port) is exact keys in hash maps, so
  that a new connection costs the same through thousands of forwards as through one; a
  source prefix or a port range goes to interval maps, looked up after the exact ones.
  A network is elements too (fences, egress, replies, masquerade, DHCP/DNS to the
  host), and its source-port range a chain that lives while an element jumps to it. A
  guest's start or stop is one transaction of element adds and deletes (a netlink batch
  in-process, ``nftwrite``; ``nft -f`` for what it does not write): never a rule walk,
  never a flush.
- Every element carries its owner tag as its comment (``backends/tags.py``), so that
  removal by owner is exact and derives from the kernel alone (after a crash, with our
  state files lost, ``nft list table inet kvmufw`` still says whose each element is);
  claims are read back from the DNAT maps the same way.
- Port ranges keep their offset. nftables has no offset DNAT (iptables'
  ``--to-destination G:5000-5002/6000``): a range whose guest ports equal its host ports
  is one interval element mapping only the address (the port is kept); a shifted range
  is one element per port. Measured cheaper than a rule per range (a rule needs a
  handle to be removed, so a read of the chain; elements are deleted by key).
- Isolation between networks is libvirt's: the fences (``RETURN`` in plan terms) leave
  our chain without the mark, before any accept, so libvirt's own rules decide.
"""

from __future__ import annotations

from ..errors import ApplyError
from ..names import Tag
from ..process import run
from .iptables import LIBVIRT_CHAINS as LIBVIRT_IPTABLES_CHAINS
from .iptables import TOOLS, far_test, find_tool, ip_text, net_text, nft_based
from .tags import comment as tag_comment
from .tags import parse_comment

# A guest's stop imports this module and nothing heavier (no dataclasses, typing,
# intents or planner): plain classes, and what only a start needs imported there.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

    from ..conntrack import Flow
    from ..intents import Claim, Forward, Intent
    from ..model import IPNetwork, PortRange
    from .base import Backend, HostPort, Log, Owners
    from .nftwrite import SetType
    from .rules import Rule

TABLE = "kvmufw"
# The packet mark bit our table sets on what it accepts (forward, input) and the glue
# matches: bit 24. Clear of kube-proxy (0x4000, 0x8000), Cilium (0x0f00), Docker swarm
# (small service numbers), Tailscale (0xff0000), wg-quick (0xca6c) and Istio (0x539);
# only Calico's default mask (0xffff0000) covers it. Only ever or-ed in, never cleared.
MARK = 0x01000000
MARKED = f"meta mark set meta mark | 0x{MARK:08x} accept"
GLUE_TAG = Tag("g=glue", "-", "-")  # owners are n=… or d=…: never this one
GLUE_COMMENT = tag_comment(GLUE_TAG)
ANY = {4: "0.0.0.0/0", 6: "::/0"}
LOOPBACK = {4: "127.0.0.0/8", 6: "::1"}
RANGE_CHAIN = "masq_"  # + "FIRST_LAST": masquerade to those source ports (tcp, udp)
NFPROTO = {4: "ipv4", 6: "ipv6"}
ADDR = {4: "ip", 6: "ip6"}
ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
IPT_GLUE = {  # (iptables chain) -> the glue line as iptables-save prints it
    chain: f'-A {chain} -m mark --mark 0x{MARK:x}/0x{MARK:x} -m comment '
           f'--comment "{GLUE_COMMENT}" -j ACCEPT' for chain in ("INPUT", "FORWARD")}
LIBVIRT_TABLE = "libvirt_network"
# the glue rule as nft writes and prints it: in libvirt's chains, and in iptables-nft's
# filter INPUT and FORWARD, where iptables-save prints it as ``IPT_GLUE`` exactly
LIBVIRT_GLUE = f'meta mark & 0x{MARK:08x} == 0x{MARK:08x} accept comment "{GLUE_COMMENT}"'
LIBVIRT_CHAINS = ("guest_input", "guest_output")


def _sets(f: int) -> dict[str, str]:
    """set or map name -> its type, in family ``f``. The common forward (any source, one
    port) is in the exact maps ``EXACT`` (a hash: one lookup whatever their size); a
    source prefix or a port range needs an interval one, which costs what it holds."""
    a = ADDR_TYPE[f]
    return {
        f"dnat{f}_any": f"inet_proto . inet_service : {a} . inet_service",
        f"dnat{f}_at": f"{a} . inet_proto . inet_service : {a} . inet_service",
        f"dnat{f}_addr": f"{a} . {a} . inet_proto . inet_service : {a}",
        f"dnat{f}_port": f"{a} . {a} . inet_proto . inet_service : {a} . inet_service",
        f"guestx{f}": f"ifname . {a} . inet_proto . inet_service",
        f"guest{f}": f"ifname . {a} . inet_proto . inet_service",
        f"hairpinx{f}": f"{a} . ifname . inet_proto . inet_service",
        f"hairnet{f}": f"ifname . {a}",
        f"hairpin{f}": f"{a} . {a} . ifname . inet_proto . inet_service",
        f"fence_out{f}": f"ifname . {a} . ifname",
        f"fence_in{f}": f"ifname . {a} . ifname",
        f"egress{f}": f"ifname . {a}",
        f"egress_dev{f}": f"ifname . {a} . ifname",
        f"replies{f}": f"ifname . {a}",
        f"replies_dev{f}": f"ifname . {a} . ifname",
        f"ingress{f}": f"ifname . {a}",
        f"ingress_dev{f}": f"ifname . {a} . ifname",
        f"b2b{f}": "ifname . ifname",
        f"host_in{f}": "ifname . inet_proto . inet_service",
        f"inside{f}": f"{a} . {a}",
        f"masq{f}": f"{a} . ifname",
        f"masq_any{f}": a,
        f"masqp{f}": f"{a} . ifname : verdict",
        f"masqp_any{f}": f"{a} : verdict",
    }


EXACT = {name for f in (4, 6)
         for name in (f"dnat{f}_any", f"dnat{f}_at", f"guestx{f}", f"hairpinx{f}")}
SETS: dict[str, str] = {**_sets(4), **_sets(6)}
PORTS = "meta l4proto { tcp, udp, sctp }"  # nft maps ports only after a protocol match


def _chains() -> dict[str, tuple[str, list[str]]]:
    """chain -> (its hook line, its rules as ``nft list`` prints them)."""
    out: dict[str, tuple[str, list[str]]] = {
        "prerouting": ("type nat hook prerouting priority dstnat - 5; policy accept;", []),
        "output": ("type nat hook output priority -105; policy accept;", []),
        "forward": ("type filter hook forward priority filter - 5; policy accept;", []),
        "input": ("type filter hook input priority filter - 5; policy accept;", []),
        "postrouting": ("type nat hook postrouting priority srcnat - 5; policy accept;", []),
    }
    for f in (4, 6):
        a = ADDR[f]
        key = f"{a} daddr . {a} saddr . meta l4proto . th dport"
        dnat = [f"{PORTS} dnat {a} to {a} daddr . meta l4proto . th dport map @dnat{f}_at",
                f"meta nfproto {NFPROTO[f]} {PORTS} dnat {a} to meta l4proto . th dport "
                f"map @dnat{f}_any",
                f"dnat {a} to {key} map @dnat{f}_addr",
                f"{PORTS} dnat {a} to {key} map @dnat{f}_port"]
        out["prerouting"][1].extend(f"fib daddr type local {d}" for d in dnat)
        out["output"][1].extend(f"{a} daddr != {LOOPBACK[f]} fib daddr type local {d}"
                                for d in dnat)
        out["forward"][1][:0] = [  # fences first: before any accept of any family
            f"ct status ! dnat iifname . {a} saddr . oifname @fence_out{f} return",
            f"ct status ! dnat iifname . {a} daddr . oifname @fence_in{f} return"]
        out["forward"][1].extend([
            *(f"ct status dnat oifname . {a} daddr . meta l4proto . th dport @{s} {MARKED}"
              for s in (f"guestx{f}", f"guest{f}")),
            *(f"ct status dnat iifname . {a} saddr . meta l4proto . th sport @{s} {MARKED}"
              for s in (f"guestx{f}", f"guest{f}")),
            f"iifname . {a} saddr @egress{f} {MARKED}",
            f"iifname . {a} saddr . oifname @egress_dev{f} {MARKED}",
            f"ct state established,related oifname . {a} daddr @replies{f} {MARKED}",
            f"ct state established,related iifname . {a} daddr . oifname @replies_dev{f} "
            f"{MARKED}",
            f"oifname . {a} daddr @ingress{f} {MARKED}",
            f"iifname . {a} daddr . oifname @ingress_dev{f} {MARKED}",
            f"meta nfproto {NFPROTO[f]} iifname . oifname @b2b{f} {MARKED}"])
        out["input"][1].append(
            f"meta nfproto {NFPROTO[f]} iifname . meta l4proto . th dport @host_in{f} {MARKED}")
        post = [f"ct status dnat {a} daddr . oifname . meta l4proto . th dport "
                f"@hairpinx{f} oifname . {a} saddr @hairnet{f} masquerade",
                f"ct status dnat {a} saddr . {a} daddr . oifname . meta l4proto . th dport "
                f"@hairpin{f} masquerade",
                f"{a} saddr . {a} daddr @inside{f} return"]
        if f == 4:  # IPv6 has no broadcast; its multicast is masqueraded as libvirt does
            post.append("meta nfproto ipv4 fib daddr type { broadcast, multicast } return")
        # a network's own source ports (nft 1.0.6 takes no port range as a map value): a
        # verdict map to a chain per distinct range (``range_chain``), then the rest
        for match, name in ((f"{a} saddr . oifname", f"masq{f}"), (f"{a} saddr", f"masq_any{f}")):
            post += [f"meta l4proto {{ tcp, udp }} {match} vmap @{name.replace('masq', 'masqp')}",
                     f"{match} @{name} masquerade"]
        out["postrouting"][1].extend(post)
    return out


CHAINS = _chains()


# --------------------------------------------------------------------------- render

def _addr(net: IPNetwork) -> str:
    """An address or network as nft prints it: a host without its /32 or /128."""
    if net.prefixlen == net.max_prefixlen:
        return ip_text(net.network_address)
    return net_text(net)


def _ports(ports: PortRange) -> str:
    return str(ports.first) if ports.first == ports.last else f"{ports.first}-{ports.last}"


def _if(name: str | None) -> str:
    return f'"{name}"'


def range_chain(ports: PortRange) -> str:
    """The chain that masquerades tcp and udp to these source ports (one per distinct
    range of the networks that run: there while an element of ``masqpF`` jumps to it)."""
    return f"{RANGE_CHAIN}{ports.first}_{ports.last}"


def _range_rule(chain: str) -> str:
    first, last = chain[len(RANGE_CHAIN):].split("_")
    return f"meta l4proto {{ tcp, udp }} masquerade to :{first}-{last}"


def _range_chains(items: Iterable[Element]) -> set[str]:
    """The range chains these elements jump to."""
    return {e[2].split()[1] for e in items  # (set, key, value, …): thousands, no property
            if e[0].startswith("masqp") and e[2] is not None}


class Element(tuple):  # type: ignore[type-arg]
    """One element of one of our sets or maps, as ``nft list`` prints it: (set, key,
    value or None, comment), compared and hashed as that tuple."""

    __slots__ = ()

    def __new__(cls, set: str, key: str, value: str | None, comment: str) -> Element:
        return tuple.__new__(cls, (set, key, value, comment))

    @property
    def set(self) -> str:
        return self[0]  # type: ignore[no-any-return]

    @property
    def key(self) -> str:
        return self[1]  # type: ignore[no-any-return]

    @property
    def value(self) -> str | None:
        return self[2]  # type: ignore[no-any-return]

    @property
    def comment(self) -> str:
        return self[3]  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"Element{tuple.__repr__(self)}"

    @property
    def text(self) -> str:
        out = f'{self.key} comment "{self.comment}"'
        return out + (f" : {self.value}" if self.value is not None else "")

    @property
    def tag(self) -> Tag | None:
        return parse_comment(self.comment)


def elements(rule: Rule) -> list[Element]:
    """The elements that stand for one planned rule (several for a shifted range, one
    per port; none for a rule the skeleton holds whole)."""
    f, comment = rule.family, tag_comment(rule.tag)

    def el(name: str, key: str, value: str | None = None) -> Element:
        return Element(f"{name}{f}" if not name.startswith("dnat") else name, key, value,
                       comment)

    if rule.verdict == "DNAT":
        assert rule.to_addr is not None and rule.to_ports is not None and rule.dport
        daddr = _addr(rule.dst) if rule.dst is not None else ANY[f]
        saddr = _addr(rule.src) if rule.src is not None else ANY[f]
        return _dnat(f, daddr, [saddr], rule.proto or "", rule.dport, ip_text(rule.to_addr),
                     rule.to_ports, comment)
    if rule.stage == "postrouting":  # MASQUERADE
        assert rule.src is not None
        if rule.ctstate == "DNAT":  # hairpin
            assert rule.dst is not None and rule.dport
            return _hairpin(f, _if(rule.oif), _addr(rule.dst), rule.proto or "", rule.dport,
                            _addr(rule.src), comment)
        out = []
        if rule.not_dst is not None:
            out.append(el("inside", f"{_addr(rule.src)} . {_addr(rule.not_dst)}"))
        # tcp and udp (to_ports) through the chain of their source port range, the rest
        name, jump = ("masqp", f"jump {range_chain(rule.to_ports)}") \
            if rule.to_ports is not None else ("masq", None)
        if rule.oif:
            out.append(el(name, f"{_addr(rule.src)} . {_if(rule.oif)}", jump))
        else:
            out.append(el(f"{name}_any", _addr(rule.src), jump))
        return out
    if rule.stage == "input":
        assert rule.dport
        return [el("host_in", f"{_if(rule.iif)} . {rule.proto} . {_ports(rule.dport)}")]
    assert rule.stage == "forward", rule
    if rule.ctstate == "DNAT":
        if rule.oif:
            assert rule.dst is not None and rule.dport
            return [_accept(f, _if(rule.oif), _addr(rule.dst), rule.proto or "", rule.dport,
                            comment)]
        assert rule.src is not None and rule.sport
        return [_accept(f, _if(rule.iif), _addr(rule.src), rule.proto or "", rule.sport,
                        comment)]
    if rule.verdict == "RETURN":
        if rule.src is not None:
            return [el("fence_out", f"{_if(rule.iif)} . {_addr(rule.src)} . {_if(rule.oif)}")]
        assert rule.dst is not None
        return [el("fence_in", f"{_if(rule.iif)} . {_addr(rule.dst)} . {_if(rule.oif)}")]
    if rule.ctstate == "RELATED,ESTABLISHED":
        assert rule.dst is not None
        if rule.iif:
            return [el("replies_dev", f"{_if(rule.iif)} . {_addr(rule.dst)} . "
                                      f"{_if(rule.oif)}")]
        return [el("replies", f"{_if(rule.oif)} . {_addr(rule.dst)}")]
    if rule.src is not None:
        if rule.oif:
            return [el("egress_dev", f"{_if(rule.iif)} . {_addr(rule.src)} . {_if(rule.oif)}")]
        return [el("egress", f"{_if(rule.iif)} . {_addr(rule.src)}")]
    if rule.dst is not None:
        if rule.iif:
            return [el("ingress_dev", f"{_if(rule.iif)} . {_addr(rule.dst)} . "
                                      f"{_if(rule.oif)}")]
        return [el("ingress", f"{_if(rule.oif)} . {_addr(rule.dst)}")]
    # bridge to bridge; a bridge network's crossing frames too (nft has no
    # --physdev-is-bridged: in and out of the same bridge, as libvirt's LIBVIRT_FWX)
    return [el("b2b", f"{_if(rule.iif)} . {_if(rule.oif)}")]


def forward_elements(fw: Forward, texts: dict[Any, Any] | None = None) -> list[Element]:
    """A forward's elements, straight from its intent (the same as ``elements`` gives for
    its rules, measured twice as fast: a replay of thousands renders these): DNAT per
    source, the accept of its DNAT'd packets both ways, its hairpin masquerade. Sources
    are collapsed first (overlapping intervals cannot share a set). ``texts``: the text
    of each owner's tag and of each address object already written, kept across the
    forwards of one rendering (a guest's forwards share the objects: keyed by identity,
    which only holds while they all live, as the intents of one ``wanted`` do)."""
    known = {} if texts is None else texts
    f, owned = fw.family, (fw.owner, fw.bridge, id(fw.subnet))
    shared = known.get(owned)  # what all of an owner's forwards on one subnet share
    if shared is None:
        assert fw.subnet is not None
        subnet = known.get(id(fw.subnet)) or known.setdefault(id(fw.subnet),
                                                              _addr(fw.subnet))
        shared = known[owned] = (tag_comment(fw.tag), f'"{fw.bridge}"', subnet)
    comment, bridge, subnet = shared
    guest = known.get(id(fw.guest)) or known.setdefault(id(fw.guest), ip_text(fw.guest))
    proto, hp, gp = fw.proto, fw.host_ports, fw.guest_ports
    if (not fw.sources and fw.host_ip is None and hp.first == hp.last
            and gp.first == gp.last):  # the common forward, written out: as below
        port, names, new = gp.first, _NAMES[f], tuple.__new__
        return [new(Element, (names[0], f"{proto} . {hp.first}", f"{guest} . {port}",
                              comment)),
                new(Element, (names[1], f"{bridge} . {guest} . {proto} . {port}", None,
                              comment)),
                new(Element, (names[2], f"{guest} . {bridge} . {proto} . {port}", None,
                              comment)),
                new(Element, (names[3], f"{bridge} . {subnet}", None, comment))]
    host = ip_text(fw.host_ip) if fw.host_ip is not None else ANY[f]
    if not fw.sources or any(s.prefixlen == 0 for s in fw.sources):
        sources = [ANY[f]]
    elif len(fw.sources) == 1:
        sources = [_addr(fw.sources[0])]
    else:
        from ipaddress import collapse_addresses
        sources = [_addr(s) for s in collapse_addresses(fw.sources)]  # type: ignore[type-var]
    return [*_dnat(f, host, sources, proto, hp, guest, gp, comment),
            _accept(f, bridge, guest, proto, gp, comment),
            *_hairpin(f, bridge, guest, proto, gp, subnet, comment)]


# per family: the sets of the common forward (its DNAT, accept, hairpin and hairpin net),
# whose elements are built by ``tuple.__new__`` without the call through
# ``Element.__new__``: thousands per replay
_NAMES = {f: (f"dnat{f}_any", f"guestx{f}", f"hairpinx{f}", f"hairnet{f}") for f in (4, 6)}


def _dnat(f: int, host: str, sources: Iterable[str], proto: str, hp: PortRange, guest: str,
          gp: PortRange, comment: str) -> list[Element]:
    """A forward's DNAT elements, per source: the common one (any source, one port) in an
    exact map (``dnatF_any``, or ``dnatF_at`` for a host address); a range whose guest
    ports equal its host ports one interval element mapping only the address (the port
    is kept); a shifted range one element per port."""
    out = []
    for src in sources:
        if src == ANY[f] and hp.first == hp.last:
            value = f"{guest} . {gp.first}"
            if host == ANY[f]:
                out.append(Element(f"dnat{f}_any", f"{proto} . {hp.first}", value, comment))
            else:
                out.append(Element(f"dnat{f}_at", f"{host} . {proto} . {hp.first}", value,
                                   comment))
        elif gp == hp:
            out.append(Element(f"dnat{f}_addr", f"{host} . {src} . {proto} . {_ports(hp)}",
                               guest, comment))
        else:
            shift = gp.first - hp.first
            out += [Element(f"dnat{f}_port", f"{host} . {src} . {proto} . {port}",
                            f"{guest} . {port + shift}", comment)
                    for port in range(hp.first, hp.last + 1)]
    return out


def _accept(f: int, bridge: str, guest: str, proto: str, gp: PortRange,
            comment: str) -> Element:
    """The accept of a forward's DNAT'd packets (both ways): exact for one guest port."""
    if gp.first == gp.last:
        return Element(f"guestx{f}", f"{bridge} . {guest} . {proto} . {gp.first}", None,
                       comment)
    return Element(f"guest{f}", f"{bridge} . {guest} . {proto} . {_ports(gp)}", None, comment)


def _hairpin(f: int, bridge: str, guest: str, proto: str, gp: PortRange, subnet: str,
             comment: str) -> list[Element]:
    """The hairpin masquerade: for one guest port an exact key, and the subnet behind the
    bridge (``hairnetF``, one element per network that any of its forwards holds); for a
    range one interval element with the subnet in its key."""
    if gp.first == gp.last:
        return [Element(f"hairpinx{f}", f"{guest} . {bridge} . {proto} . {gp.first}", None,
                        comment),
                Element(f"hairnet{f}", f"{bridge} . {subnet}", None, comment)]
    return [Element(f"hairpin{f}", f"{subnet} . {guest} . {bridge} . {proto} . {_ports(gp)}",
                    None, comment)]


def wanted(intents: Owners) -> dict[Element, None]:
    """Every element the owners' intents stand for, once each, in order (a guest's stop
    names its owner with no intent: nothing of the planner is imported then; a guest's
    start has forwards only: nothing of the rules a network's intents expand to)."""
    if not any(intents.values()):
        return {}
    from ..intents import Forward
    out: list[Element] = []  # in order, with repeats: the first of each is kept
    texts: dict[Any, Any] = {}
    for owner in sorted(intents):
        for intent in intents[owner]:
            if isinstance(intent, Forward):
                out += forward_elements(intent, texts)
            else:
                from .rules import expand
                for rule in expand(intent):
                    out += elements(rule)
    return dict.fromkeys(out)


# --------------------------------------------------------------------------- read back

_PARTS = None  # the regular expression below, compiled on first use (not on a stop's path)


def _split_elements(body: str) -> list[str]:
    """The elements of an ``elements = { … }`` body: split at commas outside double
    quotes (our comments hold commas; nothing we write holds a quote)."""
    global _PARTS
    if _PARTS is None:
        import re
        _PARTS = re.compile(r'(?:"[^"]*"|[^",])+')
    return [m.strip() for m in _PARTS.findall(body) if m.strip()]


def _parse_element(name: str, text: str) -> Element:
    """One element as ``nft list`` prints it: key, ``comment "…"``, `` : value``."""
    at = text.find(' comment "')
    if at < 0:
        key, sep, value = text.partition(" : ")
        return Element(name, key.strip(), value.strip() if sep else None, "")
    end = text.find('"', at + len(' comment "'))
    rest = text[end + 1:].strip()
    mapped = rest[1:].strip() if rest.startswith(":") else None
    return Element(name, text[:at].strip(), mapped, text[at + len(' comment "'):end])


class Table:
    """``nft list table inet kvmufw`` as printed: whether it is there, each chain's
    rules, each set's elements."""

    def __init__(self, present: bool = False, chains: dict[str, list[str]] | None = None,
                 elements: list[Element] | None = None) -> None:
        self.present = present
        self.chains = chains or {}
        self.elements = elements or []

    @classmethod
    def parse(cls, text: str) -> Table:
        table = cls(present=bool(text.strip()))
        current: str | None = None
        kind = ""
        buffer: list[str] | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if buffer is not None:
                buffer.append(line)
                if line.endswith("}"):
                    table._elements(current or "", " ".join(buffer))
                    buffer = None
                continue
            if line.startswith(("set ", "map ", "chain ")):
                kind, current = line.split()[0], line.split()[1]
                if kind == "chain":
                    table.chains[current] = []
            elif line == "}":
                current = None
            elif current and line.startswith("elements = {"):
                if line.endswith("}"):
                    table._elements(current, line)
                else:
                    buffer = [line]
            elif (kind == "chain" and current and line
                  and not line.startswith(("type ", "policy "))):
                table.chains[current].append(line)
        return table

    def _elements(self, name: str, text: str) -> None:
        body = text[text.index("{") + 1:text.rindex("}")].strip()
        self.elements += [_parse_element(name, part) for part in _split_elements(body)]

    def skeleton_ok(self) -> bool:
        return self.present and all(self.chains.get(c) == rules
                                    for c, (_hook, rules) in CHAINS.items())


class Glue:
    """The glue rules outside our table as read: per iptables family, the filter table's
    INPUT and FORWARD rules (and libvirt's chains); per libvirt nft family
    (``ip``/``ip6``), libvirt's table as ``nft -a list`` printed it. ``nft_families``:
    the iptables families whose filter INPUT and FORWARD are iptables-nft's (in
    nf_tables), where glue can be inserted by the ``nft -f`` that writes our table;
    ``nft_chains``: which of their INPUT and FORWARD chains are in nf_tables (iptables-nft
    adds a built-in chain only once a rule or policy needs it, iptables-save prints it
    all the same); None where that was not asked (``prefix``)."""

    def __init__(self) -> None:
        self.iptables: dict[int, dict[str, list[str]]] = {}
        self.nft_families: set[int] = set()
        self.nft_chains: dict[int, set[str]] | None = None
        self.libvirt_chains: set[str] = set()
        self.libvirt: dict[str, dict[str, list[tuple[int, str]]]] = {}
        self.other: dict[int, Any] = {}  # family -> iptables Snapshot


class Ruleset:
    """Our table as read, and the glue outside it, read when first asked for."""

    def __init__(self, table: Table, generation: int | None = None,
                 glue_reader: Callable[[], Glue] | None = None) -> None:
        self.table = table
        self.unavailable: dict[int, str] = {}  # one inet table: no family is left out
        self.generation = generation  # nf_tables' generation it was read at, if known
        self.glue_reader = glue_reader
        self._glue: Glue | None = None
        self._keys: set[tuple[str, str, str | None]] | None = None

    def keys(self) -> set[tuple[str, str, str | None]]:
        """(set, key, value) of every element, built once per reading (``present`` is
        asked once per owner: ``status`` of 2,000 forwards asks 2,000 times)."""
        if self._keys is None:
            self._keys = {(e.set, e.key, e.value) for e in self.table.elements}
        return self._keys

    @property
    def families(self) -> set[int]:
        """Both, always: one table holds them."""
        return {4, 6}

    @property
    def glue(self) -> Glue:
        if self._glue is None:
            self._glue = self.glue_reader() if self.glue_reader else Glue()
        return self._glue


class Change:
    """One ``nft -f`` script on our table (and its element changes alone where that is
    all it is), the glue payloads ("4"/"6": iptables-restore, "nft": libvirt's tables),
    the DNAT elements it deletes (their flows end), what it was made from and our
    elements once it is written."""

    def __init__(self, script: str = "", ended: list[Element] | None = None,
                 base: Ruleset | None = None, after: list[Element] | None = None,
                 elements: tuple[list[Element], list[Element]] | None = None) -> None:
        self.script = script
        # (deletes, adds) where the script is those element changes and nothing else:
        # what ``nftwrite`` may write in-process instead
        self.elements = elements
        # the netlink socket of the batch that wrote it, kept for ``end_flows``
        self.held: Any = None
        self.glue: dict[str, str] = {}
        self.ended = ended or []
        self.skipped: dict[int, str] = {}
        self.base = base
        self.after = after

    def __repr__(self) -> str:
        return f"Change({self.text!r})"

    def __bool__(self) -> bool:
        return bool(self.script or any(self.glue.values()))

    @property
    def text(self) -> str:
        out = f"# nft -f: table inet {TABLE}\n{self.script}" if self.script else ""
        for where, payload in sorted(self.glue.items()):
            if payload:
                out += f"# glue ({where})\n{payload}"
        return out

    def ends_forwards(self) -> bool:
        return bool(self.ended)


# --------------------------------------------------------------------------- scripts

def skeleton() -> str:
    """The table, its sets and maps, and its chains with their rules: added where the
    table is missing or its chains are not as they should be (the sets keep their
    elements: only the chains are flushed)."""
    out = [f"add table inet {TABLE}"]
    for name, kind in SETS.items():
        word = "map" if ":" in kind else "set"
        flags = "" if name in EXACT else " flags interval;"
        out.append(f"add {word} inet {TABLE} {name} {{ type {kind};{flags} }}")
    for chain, (hook, rules) in CHAINS.items():
        out.append(f"add chain inet {TABLE} {chain} {{ {hook} }}")
        out.append(f"flush chain inet {TABLE} {chain}")
        out += [f"add rule inet {TABLE} {chain} {rule}" for rule in rules]
    return "\n".join(out) + "\n"


def _by_set(items: Iterable[Element], verb: str) -> list[str]:
    grouped: dict[str, list[str]] = {}
    for name, key, value, comment in items:  # ``Element.text`` inline: thousands
        text = key if verb != "add" else f'{key} comment "{comment}"' if value is None \
            else f'{key} comment "{comment}" : {value}'
        found = grouped.get(name)
        if found is None:
            grouped[name] = [text]
        else:
            found.append(text)
    return [f"{verb} element inet {TABLE} {name} {{ {', '.join(texts)} }}"
            for name, texts in grouped.items()]


def diff(have: Iterable[Element], want: Iterable[Element]) -> tuple[list[Element],
                                                                    list[Element]]:
    """(deletes, adds) that take ``have`` to ``want``: a key the kernel keeps (under
    another owner's comment) is not added again, and each key is added once."""
    have_set, want_set = dict.fromkeys(have), dict.fromkeys(want)
    deletes = [e for e in have_set if e not in want_set]
    taken = {e[:2] for e in have_set if e in want_set}  # (set, key): thousands, no property
    adds = []
    for e in want_set:
        if e not in have_set:
            key = e[:2]
            if key not in taken:
                taken.add(key)
                adds.append(e)
    return deletes, adds


def _dnat_key(e: Element) -> tuple[str, str, str, str]:
    """(host address, source, protocol, host ports) of a DNAT element, whichever map."""
    parts = [p.strip() for p in e.key.split(" . ")]
    any_ = ANY[int(e.set[4])]
    if e.set.endswith("_any"):
        return any_, any_, parts[0], parts[1]
    if e.set.endswith("_at"):
        return parts[0], any_, parts[1], parts[2]
    return parts[0], parts[1], parts[2], parts[3]


def _guest_of(e: Element) -> tuple[str, str, str, int, int] | None:
    """(family, guest, protocol, first, last guest port) a guest or hairpin element
    serves, or a DNAT element leads to."""
    parts = [p.strip() for p in e.key.split(" . ")]
    if e.set.startswith(("guest", "hairpin")):
        first, _, last = parts[-1].partition("-")
        # "bridge" . guest …, subnet . guest …, or guest . "bridge" … (hairpinx)
        guest = parts[0] if e.set.startswith("hairpinx") else parts[1]
        return e.set[-1], guest, parts[-2], int(first), int(last or first)
    if e.set.startswith("dnat") and e.value is not None:
        address, _, port = e.value.partition(" . ")
        _host, _src, proto, ports = _dnat_key(e)
        first, _, last = ports.partition("-")
        if port:
            return e.set[4], address.strip(), proto, int(port), int(port)
        return e.set[4], address.strip(), proto, int(first), int(last or first)
    return None


def adopted(deletes: Sequence[Element], remaining: Sequence[Element]) -> list[Element]:
    """Two owners' forwards to one guest port share its accept and hairpin elements (a
    key is in a set once, under the comment of whoever added it first). When that owner
    goes, another whose DNAT still leads there takes the element over (deleted and added
    again in the same transaction, under its comment), so that removal by owner never
    takes what someone else still needs."""
    shared = [e for e in deletes if e.set.startswith(("guest", "hairpin", "hairnet"))]
    if not shared:
        return []
    shared.sort(key=lambda e: e.set.startswith("hairnet"))  # after the hairpins' heirs
    leading: dict[tuple[str, str, str], list[tuple[int, int, str]]] = {}
    for e in remaining:
        if e.set.startswith("dnat") and (found := _guest_of(e)) is not None:
            family, guest, proto, first, last = found
            leading.setdefault((family, guest, proto), []).append((first, last, e.comment))
    taken = {(e.set, e.key) for e in remaining}
    out: list[Element] = []
    for e in shared:
        if (e.set, e.key) in taken:
            continue
        if e.set.startswith("hairnet"):  # held for the network's exact hairpins
            network = e.tag
            heir_of = next((h.comment for h in [*remaining, *out]
                            if h.set == f"hairpinx{e.set[-1]}" and (t := h.tag) is not None
                            and network is not None and (t.bridge, t.subnet)
                            == (network.bridge, network.subnet)), None)
            if heir_of is not None:
                out.append(Element(e.set, e.key, None, heir_of))
                taken.add((e.set, e.key))
            continue
        found = _guest_of(e)
        if found is None:
            continue
        family, guest, proto, first, last = found
        heir = next((c for a, b, c in leading.get((family, guest, proto), ()) if a <= last
                     and first <= b), None)
        if heir is not None:
            out.append(Element(e.set, e.key, None, heir))
            taken.add((e.set, e.key))
    return out


def _range_chains_change(table: Table, deletes: Sequence[Element],
                         adds: Sequence[Element]) -> tuple[set[str], set[str]]:
    """(the range chains needed after these changes, those there now)."""
    gone = set(deletes)
    needed = _range_chains([*(e for e in table.elements if e not in gone), *adds])
    return needed, {c for c in table.chains if c.startswith(RANGE_CHAIN)}


def element_changes(table: Table, deletes: list[Element], adds: list[Element],
                    chains: tuple[set[str], set[str]]
                    ) -> tuple[list[Element], list[Element]] | None:
    """(deletes, adds) where they are the whole change (the skeleton as it should be, no
    range chain added or deleted: ``chains``, as ``_range_chains_change`` gives them):
    what ``nftwrite`` may write; else None."""
    if not (deletes or adds) or not table.skeleton_ok():
        return None
    needed, have = chains
    return (deletes, adds) if needed == have else None


def script(table: Table, deletes: Sequence[Element], adds: Sequence[Element],
           chains: tuple[set[str], set[str]] | None = None) -> str:
    """One ``nft -f`` transaction: the skeleton where needed, deletes, then adds
    (``chains``: the range chains needed and there, if known)."""
    if not deletes and not adds and table.skeleton_ok():
        return ""
    needed, have = chains or _range_chains_change(table, deletes, adds)
    lines = []
    # a range chain goes ahead of the maps (a verdict map new in the same transaction
    # cannot jump to a chain added after it), and away once nothing jumps to it
    for chain in sorted(needed - have):
        lines += [f"add table inet {TABLE}", f"add chain inet {TABLE} {chain}",
                  f"add rule inet {TABLE} {chain} {_range_rule(chain)}"]
    out = "".join(line + "\n" for line in lines)
    out += "" if table.skeleton_ok() else skeleton()
    lines = _by_set(deletes, "delete") + _by_set(adds, "add")
    lines += [f"delete chain inet {TABLE} {chain}" for chain in sorted(have - needed)]
    return out + "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------- record

class Record:
    """Our table as our own last write left it, and nf_tables' generation right after
    that write (a file of the state's cache, written under the state lock): a guest's
    start or stop while the generation is still that one reads no table (one netlink
    request instead of an ``nft`` process). Any change by anyone moves the generation
    on: then the kernel is read again."""

    NAME = "nft-table"

    @classmethod
    def load(cls, generation: int) -> Table | None:
        from .. import state
        items = state.read_recorded(cls.NAME, generation)
        try:
            elements = [Element(*item) for item in items]
        except TypeError:  # None (not recorded at this generation), or not a record
            return None
        chains = {c: list(rules) for c, (_hook, rules) in CHAINS.items()}
        chains.update({c: [_range_rule(c)] for c in _range_chains(elements)})
        return Table(True, chains, elements)

    @classmethod
    def save(cls, generation: int, elements: list[Element]) -> None:
        from .. import state
        # plain tuples (marshal takes no subclass), each (set, key, value, comment)
        state.write_recorded(cls.NAME, generation, list(map(tuple, elements)))

    @classmethod
    def forget(cls) -> None:
        from .. import state
        state.forget_recorded(cls.NAME)


# --------------------------------------------------------------------------- backend

_TYPES: dict[str, SetType] = {}  # nftwrite.set_types(SETS, EXACT), made on first use


def _set_types() -> dict[str, SetType]:
    """The sets and maps ``nftwrite`` writes (by their types: ``nftwrite.SetType``)."""
    if not _TYPES:
        from . import nftwrite
        _TYPES.update(nftwrite.set_types(SETS, EXACT))
    return _TYPES


class NftBackend:
    """Our ``table inet kvmufw``. ``prefix`` runs the commands elsewhere, e.g. ``ip netns
    exec NS``."""

    name = "nftables"

    def __init__(self, prefix: Iterable[str] = ()) -> None:
        self.prefix = list(prefix)

    # ------------------------------------------------------------------ the kernel

    def _nft(self) -> str:
        if self.prefix:
            return "nft"
        try:
            return find_tool("nft")  # no shutil: a guest's stop runs this
        except ApplyError:
            raise ApplyError("nft not found: install the nftables package") from None

    def _run(self, argv: list[str], stdin: str | None = None, name: str = "nft") -> str:
        return run([*self.prefix, *argv], stdin=stdin, name=name)

    def _table_present(self) -> bool:
        if not self.prefix:
            from .nftprobe import table_in_kernel
            return table_in_kernel(1, TABLE)  # NFPROTO_INET
        listed = self._run([self._nft(), "list", "tables", "inet"])  # not their content
        return f"table inet {TABLE}\n" in listed + "\n"

    def read(self, families: Iterable[int] = ()) -> Ruleset:
        """Our table: from our record of it after our own last write while nf_tables'
        generation says nobody changed anything since (``Record``: no process at all),
        else with one ``nft`` process (none where the table is not there). The glue
        outside it is read only when a change needs it (a network's, a clear, a missing
        table)."""
        generation = self._generation()
        if generation is not None:
            known = Record.load(generation)
            if known is not None:
                return Ruleset(known, generation=generation, glue_reader=self._read_glue)
        text = ""
        if self._table_present():
            text = self._run([self._nft(), "list", "table", "inet", TABLE])
        if generation is not None and self._generation() != generation:
            generation = None  # changed while being read
        return Ruleset(Table.parse(text), generation=generation, glue_reader=self._read_glue)

    def _generation(self) -> int | None:
        if self.prefix:
            return None
        from .nftprobe import generation
        return generation()

    def _tool(self, name: str) -> str:
        return name if self.prefix else find_tool(name)

    def _read_glue(self) -> Glue:
        """The filter table's INPUT and FORWARD per iptables family (our glue, libvirt's
        chains) and whatever the iptables backend left of ours (switching backends: it
        goes with our next glue write), and libvirt's nftables tables."""
        from .iptables import Snapshot
        glue = Glue()
        for family in (4, 6):
            if not self.prefix and nft_based(family) and _glue_by_netlink(glue, family):
                continue
            try:
                text = self._run([self._tool(TOOLS[family][0])], name=TOOLS[family][0])
            except ApplyError:
                continue
            snap = Snapshot.parse(text)
            table = snap.tables["filter"]
            glue.iptables[family] = {c: list(table.rules.get(c, [])) for c in IPT_GLUE}
            glue.other[family] = snap
            if nft_based(family):
                glue.nft_families.add(family)
                if not self.prefix:
                    from .nftprobe import chain_in_kernel
                    number = 2 if family == 4 else 10  # NFPROTO_IPV4, NFPROTO_IPV6
                    chains = {c for c in IPT_GLUE if chain_in_kernel(number, "filter", c)}
                    glue.nft_chains = {**(glue.nft_chains or {}), family: chains}
            if family == 4:
                glue.libvirt_chains = {c for t in snap.tables.values() for c in t.chains
                                       if c.startswith("LIBVIRT_")}
        for fam in self._libvirt_tables():
            try:
                text = self._run([self._nft(), "-a", "list", "table", fam, LIBVIRT_TABLE])
            except ApplyError:
                continue
            glue.libvirt[fam] = _libvirt_chains(text)
        return glue

    def _libvirt_tables(self) -> list[str]:
        """The families (``ip``, ``ip6``) in which libvirt's table is there: one netlink
        request each (most hosts have none: no process then), or one ``nft list
        tables`` elsewhere (``prefix``). nft 1.0.6 lists one table per process."""
        if self.prefix:
            listed = self._run([self._nft(), "list", "tables"]).splitlines()
            return [fam for fam in ("ip", "ip6") if f"table {fam} {LIBVIRT_TABLE}" in listed]
        from .nftprobe import IPV4, IPV6, table_in_kernel
        return [fam for fam, number in (("ip", IPV4), ("ip6", IPV6))
                if table_in_kernel(number, LIBVIRT_TABLE)]

    def write(self, change: Change) -> None:
        """Element changes alone in one netlink batch in-process (``_write_elements``);
        a change that creates our table in two steps (``_write_created``: its skeleton
        by ``nft -f``, then its elements by netlink); else our table and the glue nft
        can write (in libvirt's tables, in iptables-nft's filter chains) in one ``nft
        -f`` (one transaction: all of it or nothing), then one ``iptables-restore
        --noflush`` per family whose glue nft cannot write (legacy iptables; a glue rule
        to move or remove; the iptables backend's rules to take out). Afterwards our
        table as written is recorded (``Record``) when nf_tables' generation proves
        nobody else changed anything meanwhile."""
        base = change.base
        start = base.generation if base is not None else None
        transaction = change.script + change.glue.get("nft", "")
        restores = {w: p for w, p in sorted(change.glue.items()) if w != "nft" and p}
        if (change.elements is not None and start is not None and not self.prefix
                and transaction == change.script and not restores
                and self._write_elements(start, change)):
            return
        if start is not None and self._generation() != start:
            start = None
        if (start is not None and base is not None and not base.table.present
                and change.after and not self.prefix and not restores
                and self._write_created(start, change)):
            return
        try:
            if transaction:
                self._run([self._nft(), "-f", "-"], stdin=transaction)
            for where, payload in restores.items():
                restore = TOOLS[int(where)][1]
                self._run([self._tool(restore), "--noflush", "-w"], stdin=payload,
                          name=restore)
        except ApplyError:
            Record.forget()
            raise
        if (start is None or change.after is None or restores or not transaction
                or self._generation() != start + 1):
            if change:
                Record.forget()
            return
        Record.save(start + 1, change.after)

    def _write_created(self, start: int, change: Change) -> bool:
        """A change that creates our table (a replay after a boot or a ``flush``, the
        first start on a host), read at generation ``start``, still current: nft's own
        parsing of thousands of element lines costs more than their netlink batch. So
        two transactions: T1, one ``nft -f`` of all but the elements ``nftwrite``
        encodes (the range chains, the skeleton, the glue nft writes, the others'
        elements); T2, those elements in one batch that the kernel takes only at the
        generation T1 left. Refused with ERESTART (someone wrote in between): ``Stale``,
        and the operation's retry, reading our table there, writes the elements alone
        by netlink. Refused otherwise: ApplyError, and ``apply_rules``' revert deletes
        the table and the glue (``clear``). Killed in between: the skeleton holds none of
        the elements T2 had (nothing is marked for the glue to accept but what T1 wrote)
        until the next write of their owners (``replay``, ``restore``, their start)
        completes it. False, with nothing written, where there is nothing to encode."""
        from . import nftwrite
        assert change.after is not None
        groups, rest = nftwrite.separate(_set_types(), change.after)
        if not groups:
            return False
        chains = _range_chains_change(Table(), [], change.after)
        first = script(Table(), [], rest, chains) + change.glue.get("nft", "")
        try:
            self._run([self._nft(), "-f", "-"], stdin=first)
            at = self._generation()
            if at is None:
                raise ApplyError("nf_tables' generation cannot be read after nft -f")
            nftwrite.release(nftwrite.send(*nftwrite.framed(TABLE, at, groups), TABLE),
                             deleted=False)
        except ApplyError:
            Record.forget()
            raise
        if at == start + 1:  # T1 was the only change since our read
            Record.save(at + 1, change.after)
        else:
            Record.forget()
        return True

    @staticmethod
    def _write_elements(start: int, change: Change) -> bool:
        """The change, element adds and deletes only, in one netlink batch that the
        kernel takes only at generation ``start`` (``nftwrite``); then nf_tables'
        generation is ``start + 1`` (recorded). False, with nothing sent, where it
        cannot be written exactly as nft would (``nft -f`` writes it then)."""
        from . import nftwrite
        assert change.elements is not None
        try:
            payload, sets = nftwrite.batch(TABLE, _set_types(), start, *change.elements)
        except nftwrite.Unencodable:
            return False
        try:
            sock = nftwrite.send(payload, sets, TABLE)
        except ApplyError:
            Record.forget()
            raise
        if change.after is not None:
            Record.save(start + 1, change.after)
        else:
            Record.forget()
        if change.ended:  # ``end_flows`` asks ctnetlink through it, then releases it
            change.held = sock
        else:
            nftwrite.release(sock, deleted=bool(change.elements[0]))
        return True

    # ------------------------------------------------------------------ changes

    def change(self, ruleset: Ruleset, intents: Owners,
               drop: Callable[[Tag], bool] | None = None) -> Change:
        """The owners' elements replaced (and others' that ``drop`` accepts removed) in
        one transaction; the glue checked and put back where a network's owner changes,
        on a drop, where no owner is named (the way in repaired alone) or where our table
        is not as it should be. A guest's start or stop reads no glue: the glue is per
        host, not per forward."""
        have = ruleset.table.elements
        judged: dict[str, bool] = {}  # comment -> replaced: thousands share a few hundred

        def replaced(e: Element) -> bool:
            found = judged.get(e.comment)
            if found is None:
                tag = e.tag
                found = judged[e.comment] = tag is not None and (
                    tag.owner in intents or bool(drop and drop(tag)))
            return found

        kept = [e for e in have if not replaced(e)]
        deletes, adds = diff(have, kept + list(wanted(intents)))
        adds += adopted(deletes, kept + adds)
        gone = set(deletes)
        after = [e for e in have if e not in gone] + adds
        chains = _range_chains_change(ruleset.table, deletes, adds)
        out = Change(script(ruleset.table, deletes, adds, chains),
                     ended=[e for e in deletes if e.set.startswith("dnat")], base=ruleset,
                     after=after, elements=element_changes(ruleset.table, deletes, adds, chains))
        networks = any(o.startswith("n=") for o in intents)
        repair = not intents  # nothing to replace: ``restore --jumps-only`` (UFW's reload)
        if networks or repair or drop is not None or not ruleset.table.skeleton_ok():
            out.glue = _glue_change(ruleset.glue, keep=bool(after))
        return out

    def revert(self, now: Ruleset, before: Ruleset) -> Change:
        deletes, adds = diff(now.table.elements, before.table.elements)
        if not before.table.present:
            return self.clear(now)
        return Change(script(now.table, deletes, adds))

    def clear(self, ruleset: Ruleset) -> Change:
        out = Change(f"delete table inet {TABLE}\n" if ruleset.table.present else "",
                     ended=[e for e in ruleset.table.elements if e.set.startswith("dnat")])
        out.glue = _glue_change(ruleset.glue, keep=False)
        return out

    def render(self, intents: Owners) -> str:
        return Change(script(Table(), [], list(wanted(intents)))).text

    # ------------------------------------------------------------------ readings

    @staticmethod
    def present(ruleset: Ruleset, intents: Iterable[Intent]) -> bool:
        have = ruleset.keys()
        return all((e.set, e.key, e.value) in have for e in wanted({"": tuple(intents)}))

    @staticmethod
    def owners(ruleset: Ruleset) -> set[str]:
        return {t.owner for e in ruleset.table.elements if (t := e.tag) is not None}

    @staticmethod
    def has_rules(ruleset: Ruleset) -> bool:
        return ruleset.table.present

    def entry_problems(self, ruleset: Ruleset) -> list[str]:
        """Where a glue rule is missing, repeated or not first (while our table holds
        elements), and our table's chains if they are not as they should be."""
        if not ruleset.table.elements:
            return []
        bad = [] if ruleset.table.skeleton_ok() else [f"table inet {TABLE} (its chains)"]
        return bad + _glue_bad(ruleset.glue)

    @staticmethod
    def libvirt_backend(ruleset: Ruleset) -> str | None:
        """``nftables`` where libvirt's table is there, ``iptables`` where its
        ``LIBVIRT_*`` chains are."""
        if ruleset.glue.libvirt:
            return "nftables"
        return "iptables" if ruleset.glue.libvirt_chains else None

    @staticmethod
    def libvirt_missing(ruleset: Ruleset) -> list[str]:
        present = ruleset.glue.libvirt_chains
        return [c for c in LIBVIRT_IPTABLES_CHAINS if c not in present]

    @staticmethod
    def claims(ruleset: Ruleset, near: Iterable[HostPort] | None = None,
               mine: str | None = None) -> dict[str, list[Claim]]:
        """owner -> the host ports its DNAT elements hold, read from the kernel's maps: a
        shifted range (one element per port) is one claim again, as declared."""
        from ipaddress import ip_address, ip_network

        from ..intents import Claim
        from ..model import PortRange
        far_from = None if near is None else far_test(near)
        # (owner, proto, host, guest, shift) -> runs of ports
        runs: dict[tuple[str, str, str, str, int], list[list[int]]] = {}
        out: dict[str, dict[Claim, None]] = {}
        tags: dict[str, Tag | None] = {}  # an owner's elements share one comment
        for e in ruleset.table.elements:
            if e.value is None or not e.set.startswith("dnat"):
                continue
            tag = tags[e.comment] if e.comment in tags else tags.setdefault(
                e.comment, parse_comment(e.comment))
            if tag is None:
                continue
            out.setdefault(tag.owner, {})
            daddr, _saddr, proto, ports = _dnat_key(e)
            first_text, _, last_text = ports.partition("-")
            first, last = int(first_text), int(last_text or first_text)
            if far_from is not None and tag.owner != mine and far_from(proto, first, last):
                continue
            guest, _, port = e.value.partition(" . ")
            shift = int(port) - first if port else 0
            key = (tag.owner, proto, daddr, guest.strip(), shift)
            spans = runs.setdefault(key, [])
            if spans and spans[-1][1] + 1 == first:
                spans[-1][1] = last  # the next port of a shifted range
            elif [first, last] not in spans:  # the same ports from another source
                spans.append([first, last])
        for (owner, proto, daddr, guest, _shift), spans in runs.items():
            net = ip_network(daddr, strict=False)
            host = None if net.prefixlen == 0 else net.network_address
            for first, last in spans:
                out[owner][Claim(proto=proto, host_port=PortRange(first, last),
                                 guest=ip_address(guest), host_ip=host)] = None
        return {owner: list(claims) for owner, claims in out.items()}

    def end_flows(self, change: Change, log: Log) -> None:
        """End the conntrack flows of the DNAT elements ``change`` deleted."""
        from _socket import AF_INET, AF_INET6, inet_pton

        from ..conntrack import PROTOCOLS, end_flows
        flows = []
        for e in change.ended:
            if e.value is None:
                continue
            daddr, _saddr, proto, ports = _dnat_key(e)
            family = 4 if e.set.startswith("dnat4") else 6
            af = AF_INET if family == 4 else AF_INET6
            first, _, last = ports.partition("-")
            host = None if daddr == ANY[family] else inet_pton(af, daddr.split("/")[0])
            flows.append((family, PROTOCOLS[proto], int(first), int(last or first),
                          inet_pton(af, e.value.split(" . ")[0]), host))
        if not flows:
            return
        held, change.held = change.held, None
        if self.prefix:
            _end_elsewhere(self.prefix, flows, log)
            return
        try:
            end_flows(flows, held)
        except OSError as exc:
            log(f"conntrack flows of removed forwards not ended: {exc}")
        finally:
            if held is not None:  # after every request on it: see nftwrite.release
                from .nftwrite import release
                release(held, deleted=True)


def _end_elsewhere(prefix: list[str], flows: list[Flow], log: Callable[[str], None]) -> None:
    import json
    import os
    import subprocess
    import sys
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {package!r}); "
            "from kvmufw_hook.conntrack import main; main()")
    data = json.dumps([[f, p, a, b, g.hex(), h.hex() if h else ""]
                       for f, p, a, b, g, h in flows])
    try:
        subprocess.run([*prefix, sys.executable, "-c", code], input=data, text=True,
                       capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"conntrack flows of removed forwards not ended: {exc}")


# --------------------------------------------------------------------------- glue

def _libvirt_chains(text: str) -> dict[str, list[tuple[int, str]]]:
    """libvirt's guest chains: (handle, rule text) in order."""
    out: dict[str, list[tuple[int, str]]] = {}
    chain = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("chain "):
            chain = line.split()[1]
            out[chain] = []
        elif line == "}":
            chain = None
        elif chain is not None and " # handle " in line:
            body, _, handle = line.rpartition(" # handle ")
            if not body.startswith(("type ", "policy ")):
                out[chain].append((int(handle), body))
    return out


def _glue_by_netlink(glue: Glue, family: int) -> bool:
    """iptables-nft's filter INPUT and FORWARD of ``family`` (and, for IPv4, whether
    libvirt's iptables chains are there) read in-process with two netlink dumps instead
    of an ``iptables-save``: each glue rule as iptables-save prints it, any other rule
    as a line it never prints. False, with ``glue`` untouched, where that is not sure
    (nf_tables cannot be asked, a reply or a rule with our glue's comment not read for
    sure) or the iptables backend's chains are there (switching backends: they go with
    the glue, through iptables-save and iptables-restore)."""
    from . import nftrules
    from .iptables import PREFIX, TABLES
    try:
        chains, rules = nftrules.read(2 if family == 4 else 10)  # NFPROTO_IPV4, _IPV6
        read = {c: [IPT_GLUE[c] if nftrules.is_glue(r, GLUE_COMMENT) else f"# {r.handle}"
                    for r in rules if r.table == "filter" and r.chain == c]
                for c in IPT_GLUE}
    except nftrules.Doubt:
        return False
    if any(c.startswith(PREFIX) for _t, c in chains):
        return False
    glue.iptables[family] = read
    glue.nft_families.add(family)
    glue.nft_chains = {**(glue.nft_chains or {}),
                       family: {c for c in IPT_GLUE if ("filter", c) in chains}}
    if family == 4:
        glue.libvirt_chains = {c for t, c in chains if t in TABLES and c.startswith("LIBVIRT_")}
    return True


def _glue_bad(glue: Glue) -> list[str]:
    out = []
    for family, chains in sorted(glue.iptables.items()):
        where = "" if family == 4 else f", IPv{family}"
        for chain, line in IPT_GLUE.items():
            rules = chains.get(chain, [])
            if not rules or rules[0] != line or rules.count(line) != 1:
                out.append(f"{chain} (filter{where})")
    for fam, guest_chains in sorted(glue.libvirt.items()):
        for chain in LIBVIRT_CHAINS:
            rules = [text for _h, text in guest_chains.get(chain, [])]
            if chain in guest_chains and (not rules or rules[0] != LIBVIRT_GLUE
                                    or rules.count(LIBVIRT_GLUE) != 1):
                out.append(f"{chain} ({fam} {LIBVIRT_TABLE})")
    return out


def _glue_change(glue: Glue, keep: bool) -> dict[str, str]:
    """The payloads that put each glue rule exactly once at the top of its chain and take
    out what the iptables backend left of ours (``keep``: switching backends with guests
    running loses nothing, the next network change or replay leaves nothing of the
    other), or take every glue rule out (and nothing of the iptables backend's: a switch
    the other way clears this backend first, then writes its own). A glue rule that is
    only missing from iptables-nft's chain is inserted by nft (``"nft"``: in the same
    transaction as our table); the rest goes through iptables-restore ("4", "6"),
    which can delete a rule by its text."""
    from .iptables import transition
    out: dict[str, str] = {}
    nft = []
    for family, chains in glue.iptables.items():
        other = glue.other.get(family)  # the iptables backend's chains and jumps go
        cleared = transition(other, {}) if other is not None and keep else ""
        if cleared:
            out[str(family)] = cleared
        lines = []
        for chain, line in IPT_GLUE.items():
            rules = chains.get(chain, [])
            if keep and rules and rules[0] == line and rules.count(line) == 1:
                continue
            lines += ["-D" + line[2:]] * rules.count(line)
            if keep:
                lines.append(f"-I {chain} 1" + line[len(f"-A {chain}"):])
        if lines and not cleared and family in glue.nft_families and all(
                line.startswith("-I ") for line in lines):
            a = ADDR[family]
            for chain in (line.split()[1] for line in lines):
                if glue.nft_chains is None or chain not in glue.nft_chains.get(family, ()):
                    # added as iptables-nft adds it (one that is there stays as it is,
                    # its policy too; but that costs the kernel milliseconds)
                    nft += [f"add table {a} filter", f"add chain {a} filter {chain} "
                            f"{{ type filter hook {chain.lower()} priority filter; }}"]
                nft.append(f"insert rule {a} filter {chain} {LIBVIRT_GLUE}")
        elif lines:
            out[str(family)] = cleared + "*filter\n" + "\n".join(lines) + "\nCOMMIT\n"
    for fam, guest_chains in sorted(glue.libvirt.items()):
        for chain in LIBVIRT_CHAINS:
            if chain not in guest_chains:
                continue
            handles = guest_chains[chain]
            texts = [t for _h, t in handles]
            if keep and texts and texts[0] == LIBVIRT_GLUE and texts.count(LIBVIRT_GLUE) == 1:
                continue
            nft += [f"delete rule {fam} {LIBVIRT_TABLE} {chain} handle {h}"
                    for h, t in handles if t == LIBVIRT_GLUE]
            if keep:
                nft.append(f"insert rule {fam} {LIBVIRT_TABLE} {chain} {LIBVIRT_GLUE}")
    if nft:
        out["nft"] = "\n".join(nft) + "\n"
    return out


if TYPE_CHECKING:  # the compiler checks that this is a backend
    _IS_A_BACKEND: Backend[Ruleset, Change] = NftBackend()
