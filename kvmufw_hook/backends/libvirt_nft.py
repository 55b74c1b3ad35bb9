"""libvirt's own firewall: which backend libvirt uses, and our accepts inside its nftables
table, the one place where our rules live in a table that is not ours.

Since libvirt 10.4 the network driver can keep its rules in nftables, in ``table ip
libvirt_network`` (for IPv6 subnets ``table ip6 libvirt_network``, the same chains). Its
chain ``guest_input`` ends in ``oif BRIDGE reject`` (``guest_output`` in ``iif BRIDGE
reject`` for isolated networks). In nftables an accept in one table does not
stop another table's base chain on the same hook, so no iptables rule of ours can let a
DNAT'd connection past that reject: each forward also needs an accept inside libvirt's chain,
ahead of the reject.

Promises:
- Inside libvirt's table we only ever insert accepts carrying our owner tag as their nft
  comment (``comment "kvmufw:d=web1,b=virbr1,s=10.0.0.0/24"``), in ``guest_input`` for
  the forwarded (bridge, guest address, protocol, guest port) with ``ct status dnat``, and
  in ``guest_output`` for its replies. Only rules with our tag are ever deleted, by handle.
  Nothing of libvirt's is touched.
- Our accepts sit at the top of each chain, ahead of every rule of libvirt's. libvirt
  inserts its rules at the top when it rebuilds them (daemon restart, network restart), so
  any change moves ours that ended up behind a rule of libvirt's back to the top.
- One ``nft -a list table`` read and at most one ``nft -f`` write per change, the write one
  transaction. Where libvirt's table is not in the kernel, no process at all: whether it is
  there is asked with one netlink request.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import ApplyError
from ..intents import Forward, Intent
from ..model import PortRange
from ..names import Tag
from ..process import run
from . import LibvirtFirewall
from .iptables import SEARCH_PATH, ip_text
from .nftprobe import IPV4, IPV6, TABLE, table_in_kernel
from .tags import comment as tag_comment
from .tags import parse_comment

TYPE_CHECKING = False
if TYPE_CHECKING:  # a guest's start imports this module where libvirt uses nftables
    from .base import Owners

FAMILY = "ip"  # libvirt's IPv4 table; its IPv6 rules live in ``ip6 libvirt_network``
NFT_FAMILY = {4: "ip", 6: "ip6"}
PROBE_FAMILY = {"ip": IPV4, "ip6": IPV6}
NFT_COMMENT_MAX = 128  # bytes nft keeps of a rule's comment
INPUT, OUTPUT = "guest_input", "guest_output"  # into the bridge, out of the bridge
CHAINS = (INPUT, OUTPUT)
NETWORK_CONF = "/etc/libvirt/network.conf"
BACKENDS = ("nftables", "iptables")
TOOLS = {"nftables": "nft", "iptables": "iptables"}
NFT_SECTION = f"# nft -f: our accepts in libvirt's tables (ip and ip6 {TABLE})\n"

_HANDLE = re.compile(r"^(.*) # handle (\d+)$")
_COMMENT = re.compile(r' comment "((?:[^"\\]|\\.)*)"$')
_PRIORITY = re.compile(r"^#\s*\[\s*([a-z]+(?:\s*,\s*[a-z]+)*)\s*\]\s*$", re.MULTILINE)


# --------------------------------------------------------------------------- the kernel

def build_order(conf_text: str | None) -> tuple[str, ...]:
    """The backends in the order this libvirt build tries them: libvirt >= 10.4 ships a
    network.conf whose comments list them (``#     [iptables, nftables]`` on Debian,
    nftables first upstream). Without that list libvirt predates the nftables backend."""
    match = _PRIORITY.search(conf_text or "")
    if not match:
        return ("iptables",)
    order = tuple(b.strip() for b in match.group(1).split(","))
    return tuple(b for b in order if b in BACKENDS) or ("iptables",)


def configured(conf_text: str | None) -> str | None:
    """``firewall_backend = "…"`` from network.conf, if set."""
    for line in (conf_text or "").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "firewall_backend":
            return value.strip().strip('"').strip("'") or None
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def libvirt_firewall(seen: str | None = None, nft: LibvirtNft | None = None,
                     conf: str = NETWORK_CONF) -> LibvirtFirewall:
    """The backend libvirt really uses, from the running host first: its nftables table in
    the kernel, else its LIBVIRT_* chains in iptables, else ``firewall_backend`` in
    network.conf, else the first backend of the build's order whose tool is installed.
    Hooks, replay, status and doctor all decide through this one function."""
    if seen == "nftables" or (nft or LibvirtNft()).table_present():
        return LibvirtFirewall("nftables", f"kernel: table {FAMILY} {TABLE}", True)
    if seen == "iptables":
        return LibvirtFirewall("iptables", "kernel: libvirt's LIBVIRT_* iptables chains", False)
    text = _read(conf)
    chosen = configured(text)
    if chosen in BACKENDS:
        return LibvirtFirewall(chosen, f'{conf}: firewall_backend = "{chosen}"', False)
    order = build_order(text)
    for backend in order:
        if shutil.which(TOOLS[backend], path=SEARCH_PATH):
            return LibvirtFirewall(backend, "the build's order (" + ", ".join(order)
                                   + "), first installed", False)
    return LibvirtFirewall(order[0], "the build's order (" + ", ".join(order) + ")", False)


# --------------------------------------------------------------------------- render

def _ports(ports: PortRange) -> str:
    return str(ports.first) if ports.first == ports.last else f"{ports.first}-{ports.last}"


def render_accepts(forward: Forward) -> tuple[tuple[str, str], tuple[str, str]]:
    """(chain, rule text as ``nft list`` prints it) of a forward's two accepts of its
    translated connections: into the bridge to the guest port, and the replies out of it.
    Bridge names are interface names, checked by the parser ([A-Za-z0-9_.:@+-])."""
    family = NFT_FAMILY[forward.family]  # ip daddr / ip6 daddr, in the table of that family
    guest, ports, proto = ip_text(forward.guest), _ports(forward.guest_ports), forward.proto
    comment = tag_comment(forward.tag)
    if len(comment.encode()) > NFT_COMMENT_MAX:  # a long name and an IPv6 subnet
        comment = tag_comment(Tag(forward.owner, forward.bridge, ""))  # owner and bridge decide
    tail = f'ct status dnat accept comment "{comment}"'
    return ((INPUT, f'oif "{forward.bridge}" {family} daddr {guest} {proto} dport {ports} {tail}'),
            (OUTPUT, f'iif "{forward.bridge}" {family} saddr {guest} {proto} sport {ports} {tail}'))


def _accepts(intents: Iterable[Intent], family: str) -> Iterable[tuple[str, str]]:
    """The accepts of the forwards among ``intents`` in the table of ``family``."""
    for intent in intents:
        if isinstance(intent, Forward) and NFT_FAMILY[intent.family] == family:
            yield from render_accepts(intent)


# --------------------------------------------------------------------------- snapshot

@dataclass(frozen=True)
class NftRule:
    """One rule of libvirt's table as listed, with its handle and our tag (None: not
    ours)."""

    handle: int
    text: str  # as ``nft list`` prints it, without the handle
    tag: Tag | None  # our owner tag, or None: not ours


@dataclass
class NftSnapshot:
    """libvirt's chains as ``nft -a list table ip libvirt_network`` (or ``ip6``, as
    ``family`` says) printed them."""

    table: bool = False
    chains: dict[str, list[NftRule]] = field(default_factory=dict)
    family: str = FAMILY

    @classmethod
    def parse(cls, text: str, family: str = FAMILY) -> NftSnapshot:
        snap = cls(table=False, family=family)
        chain = None
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith(f"table {family} {TABLE} "):
                snap.table = True
            elif line.startswith("chain "):
                chain = line.split()[1]
                snap.chains[chain] = []
            elif line == "}":
                chain = None
            elif chain is not None and (match := _HANDLE.match(line)):
                body, handle = match.group(1), int(match.group(2))
                comment = _COMMENT.search(body)
                snap.chains[chain].append(
                    NftRule(handle, body, parse_comment(comment.group(1)) if comment else None))
        return snap

    def ours(self, chain: str) -> list[tuple[NftRule, bool]]:
        """Our rules in ``chain``, each with whether it sits ahead of all of libvirt's."""
        out, ahead = [], True
        for rule in self.chains.get(chain, []):
            if rule.tag is None:
                ahead = False
            else:
                out.append((rule, ahead))
        return out


Target = dict[str, list[str]]  # chain -> our rule texts


def compose(snapshot: NftSnapshot, intents: Owners,
            drop: Callable[[Tag], bool] | None = None) -> Target:
    """Our accepts as they should be: ``rules`` replaces each named owner's (an empty
    sequence removes the owner), ``drop`` removes any other owner's it accepts; the rest
    stay. Mirrors ``iptables.compose``."""
    target: Target = {chain: [] for chain in CHAINS}
    for chain in CHAINS:
        for ours, _ahead in snapshot.ours(chain):
            tagged = ours.tag
            assert tagged is not None  # ours() yields tagged rules only
            if tagged.owner not in intents and not (drop and drop(tagged)):
                target[chain].append(ours.text)
    seen: set[tuple[str, str]] = set()  # two forwards to one guest port need one accept
    for owner in sorted(intents):
        for rendered in _accepts(intents[owner], snapshot.family):
            if rendered not in seen:
                seen.add(rendered)
                target[rendered[0]].append(rendered[1])
    return target


def transition(snapshot: NftSnapshot, target: Target) -> str:
    """The ``nft -f`` script that takes our accepts in ``snapshot`` to ``target``: deletes
    (by handle, only rules with our tag) what is not wanted, duplicated or behind a rule of
    libvirt's, and inserts at the top what is missing. Empty when nothing changes, or when
    libvirt's table is not there (then it rejects nothing either)."""
    if not snapshot.table:
        return ""
    out: list[str] = []
    for chain in CHAINS:
        if chain not in snapshot.chains:
            continue
        wanted = Counter(target.get(chain, []))
        for rule, ahead in snapshot.ours(chain):
            if ahead and wanted[rule.text] > 0:
                wanted[rule.text] -= 1
            else:
                out.append(f"delete rule {snapshot.family} {TABLE} {chain} handle {rule.handle}")
        missing = []
        for text in target.get(chain, []):
            if wanted[text] > 0:  # not in place yet
                wanted[text] -= 1
                missing.append(text)
        # insert puts each rule first: reversed, they end up in target order
        out.extend(f"insert rule {snapshot.family} {TABLE} {chain} {text}"
                   for text in reversed(missing))
    return "\n".join(out) + "\n" if out else ""


# --------------------------------------------------------------------------- backend

class LibvirtNft:
    """Our accepts in libvirt's nftables table. ``prefix`` runs the commands elsewhere,
    e.g. ``ip netns exec NS`` (then whether the table exists is asked with ``nft`` too)."""

    @staticmethod
    def change(snapshot: NftSnapshot, intents: Owners,
               drop: Callable[[Tag], bool] | None = None) -> str:
        return transition(snapshot, compose(snapshot, intents, drop))

    @staticmethod
    def clear(snapshot: NftSnapshot) -> str:
        return transition(snapshot, {})

    @staticmethod
    def present(snapshot: NftSnapshot, intents: Iterable[Intent]) -> bool:
        """Every accept ``intents`` need in the snapshot's table is in, ahead of libvirt's
        rules."""
        placed = {(c, r.text) for c in CHAINS for r, ahead in snapshot.ours(c) if ahead}
        return all(r in placed for r in _accepts(intents, snapshot.family))

    def __init__(self, prefix: Iterable[str] = (), family: str = FAMILY):
        self.prefix = list(prefix)
        self.family = family

    def _nft(self) -> str:
        if self.prefix:
            return "nft"
        found = shutil.which("nft", path=SEARCH_PATH)
        if found is None:
            raise ApplyError("nft not found: install the nftables package")
        return found

    def table_present(self) -> bool:
        if not self.prefix:
            return table_in_kernel(PROBE_FAMILY[self.family])
        try:
            run([*self.prefix, "nft", "list", "table", self.family, TABLE], name="nft")
        except ApplyError:
            return False
        return True

    def read(self, table: bool = True) -> NftSnapshot:
        """libvirt's table (``table``: whether it is there, as ``table_present`` said)."""
        if not table:
            return NftSnapshot(family=self.family)
        try:
            text = run([*self.prefix, self._nft(), "-a", "list", "table", self.family, TABLE],
                       name="nft")
        except ApplyError:
            if not self.table_present():  # libvirt removed it meanwhile
                return NftSnapshot(family=self.family)
            raise
        return NftSnapshot.parse(text, self.family)

    def write(self, script: str) -> None:
        if script:
            run([*self.prefix, self._nft(), "-f", "-"], stdin=script, name="nft")


# --------------------------------------------------------------------------- one change

def held(snapshot: NftSnapshot | None) -> Target:
    """Our accepts in ``snapshot`` as a target (``revert``: back to what was there)."""
    if snapshot is None:
        return {}
    return {chain: [r.text for r, _ahead in snapshot.ours(chain)] for chain in CHAINS}


def tables_present(snapshots: Mapping[str, NftSnapshot], intents: Iterable[Intent]) -> bool:
    """Every accept ``intents`` need is in, in each of libvirt's tables that is there (a
    family without libvirt's table has no reject to pass)."""
    intents = tuple(intents)
    return all(LibvirtNft.present(snap, intents) for snap in snapshots.values())
