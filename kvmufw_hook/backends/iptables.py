"""The iptables backend: render rules as ``iptables-save`` text, read the kernel's
ruleset back, and move it to a target state with one ``iptables-restore --noflush``.

Promises:
- We only ever write inside our own ``KVMUFW-*`` chains, plus one jump from each
  built-in chain at position 1. Nothing of UFW's or libvirt's is touched.
- One read (``iptables-save``) and at most one write (``iptables-restore``) per change,
  whatever the number of rules. A change that changes nothing writes nothing.
- Rules are rendered exactly as ``iptables-save`` prints them back, so what is in
  the kernel can be compared line by line with what we want.
- A change deletes and appends only the lines that differ; rules without our tag
  are never ours to delete.
"""

from __future__ import annotations

import os

from ..errors import ApplyError
from ..process import run
from .tags import PREFIX as TAG_PREFIX
from .tags import comment as tag_comment
from .tags import parse_comment

# A guest's stop imports this module and nothing heavier: no re, subprocess, shutil,
# dataclasses or planner (together more than the interpreter's own start-up).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import Protocol

    from ..conntrack import Flow
    from ..intents import Claim, Intent
    from ..model import IPAddress, IPNetwork, PortRange
    from ..names import Tag
    from .base import HostPort, Log, Owners
    from .rules import Rule

    class Kernel(Protocol):
        """What the backend reads and writes through (``Tools``, or iptables in memory)."""

        def save(self, family: int) -> str: ...
        def restore(self, family: int, payload: str) -> None: ...
        def unavailable(self, family: int) -> str | None: ...
        def ours_in(self, family: int) -> bool: ...
        def generation(self) -> int | None: ...
        def end_flows(self, ended: dict[int, list[str]], log: Log) -> None: ...

PREFIX = "KVMUFW-"
# (table, built-in chain, our chain). Each built-in chain gets exactly one jump to our
# chain, at position 1, ahead of libvirt's and UFW's own jumps. The same in both families.
JUMPS: tuple[tuple[str, str, str], ...] = (
    ("filter", "INPUT", "KVMUFW-INPUT"),
    ("filter", "FORWARD", "KVMUFW-FORWARD"),
    ("nat", "PREROUTING", "KVMUFW-PREROUTING"),
    ("nat", "OUTPUT", "KVMUFW-OUTPUT"),
    ("nat", "POSTROUTING", "KVMUFW-POSTROUTING"),
)
TABLES: tuple[str, ...] = ("filter", "nat")
STAGE_CHAIN = {hook.lower(): (table, ours) for table, hook, ours in JUMPS}
# libvirt's own chains, in each family, while its iptables backend runs a network
LIBVIRT_CHAINS = ("LIBVIRT_INP", "LIBVIRT_FWX", "LIBVIRT_FWI", "LIBVIRT_FWO")
FAMILIES = (4, 6)
TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
SEARCH_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
# how a payload of each family is shown with the others (dry runs, logs, ``plan``)
SECTION = {4: "", 6: "# ip6tables-restore\n"}


def our_chains(table: str) -> tuple[str, ...]:
    return tuple(ours for t, _, ours in JUMPS if t == table)


def _ports(ports: PortRange, sep: str) -> str:
    return str(ports.first) if ports.first == ports.last else f"{ports.first}{sep}{ports.last}"


def ip_text(addr: IPAddress) -> str:
    """An address as iptables prints it: IPv6 through inet_ntop, as ip6tables-save does
    (Python writes ``::a00:1`` where inet_ntop writes ``::10.0.0.1``)."""
    if addr.version == 4:
        return str(addr)
    from _socket import AF_INET6, inet_ntop
    return inet_ntop(AF_INET6, addr.packed)


def net_text(net: IPNetwork) -> str:
    return f"{ip_text(net.network_address)}/{net.prefixlen}"


def _address(addr: IPAddress) -> str:
    return f"[{ip_text(addr)}]" if addr.version == 6 else str(addr)


def render_rule(rule: Rule) -> tuple[str, str]:
    """(table, ``-A CHAIN …`` line) in ``iptables-save``'s (or ``ip6tables-save``'s, for
    an IPv6 rule) canonical form."""
    table, chain = STAGE_CHAIN[rule.stage]
    out = ["-A", chain]
    if rule.src is not None:
        out += ["-s", net_text(rule.src)]
    if rule.dst is not None:
        out += ["-d", net_text(rule.dst)]
    if rule.not_dst is not None:
        out += ["!", "-d", net_text(rule.not_dst)]
    if rule.iif:
        out += ["-i", rule.iif]
    if rule.oif:
        out += ["-o", rule.oif]
    if rule.proto:
        out += ["-p", rule.proto]
    if rule.bridged:
        out += ["-m", "physdev", "--physdev-is-bridged"]
    if rule.dst_local:
        out += ["-m", "addrtype", "--dst-type", "LOCAL"]
    if rule.not_bcast_mcast:
        out += ["-m", "addrtype", "!", "--dst-type", "BROADCAST,MULTICAST"]
    if rule.sport or rule.dport:
        assert rule.proto, rule
        out += ["-m", rule.proto]
        if rule.sport:
            out += ["--sport", _ports(rule.sport, ":")]
        if rule.dport:
            out += ["--dport", _ports(rule.dport, ":")]
    if rule.ctstate:
        out += ["-m", "conntrack", "--ctstate", rule.ctstate]
    if rule.not_ctstate:
        out += ["-m", "conntrack", "!", "--ctstate", rule.not_ctstate]
    out += ["-m", "comment", "--comment", f'"{tag_comment(rule.tag)}"']
    out += ["-j", rule.verdict]
    if rule.verdict == "DNAT":
        assert rule.to_addr is not None and rule.to_ports is not None and rule.dport, rule
        dest = f"{_address(rule.to_addr)}:{_ports(rule.to_ports, '-')}"
        if rule.to_ports.width > 1 and rule.to_ports != rule.dport:
            dest += f"/{rule.dport.first}"  # a shifted range: the host port its offsets count from
        out += ["--to-destination", dest]
    elif rule.verdict == "MASQUERADE" and rule.to_ports is not None:
        out += ["--to-ports", _ports(rule.to_ports, "-")]
    return table, " ".join(out)


def comment(line: str) -> str | None:
    """The text of a saved rule's ``--comment``: quoted (backslash escapes kept as they
    are) or a bare word, as ``iptables-save`` prints it."""
    at = line.find("--comment ")
    while at >= 0:
        rest = line[at + len("--comment "):]
        if rest.startswith('"'):
            end = rest.find('"', 1)
            while end > 0 and (end - 1 - len(rest[:end].rstrip("\\"))) % 2 == 0:
                end = rest.find('"', end + 1)  # an escaped quote: the comment goes on
            return rest[1:end] if end > 0 else None
        word = rest.split(" ", 1)[0]
        if word:
            return word
        at = line.find("--comment ", at + 1)
    return None


def line_tag(line: str) -> Tag | None:
    text = comment(line)
    return parse_comment(text) if text is not None else None


def line_owner(line: str) -> str | None:
    parsed = line_tag(line)
    return parsed.owner if parsed else None


# --------------------------------------------------------------------------- snapshot

class Table:
    """One table of a snapshot: its chains in order, and each chain's ``-A`` lines."""

    def __init__(self) -> None:
        self.chains: list[str] = []
        self.rules: dict[str, list[str]] = {}


class Snapshot:
    """What ``iptables-save`` (or ``ip6tables-save``) printed, for the tables we use."""

    def __init__(self, tables: dict[str, Table]):
        self.tables = tables
        self._our_lines: frozenset[str] | None = None

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        tables: dict[str, Table] = {t: Table() for t in TABLES}
        current: Table | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("*"):
                current = tables.get(line[1:])
            elif current is None or not line or line.startswith("#"):
                continue
            elif line.startswith(":"):
                name = line[1:].split(None, 1)[0]
                current.chains.append(name)
                current.rules.setdefault(name, [])
            elif line.startswith("-A "):
                chain = line.split(None, 2)[1]
                current.rules.setdefault(chain, []).append(line)
        return cls(tables)

    def after(self, payload: str) -> Snapshot | None:
        """This snapshot as it is once ``payload`` (one of our own ``transition``
        payloads, written whole) is in: what ``iptables-save`` would print then. None
        when the payload holds a line it does not model (the caller reads again)."""
        tables = {name: Table() for name in self.tables}
        for name, table in self.tables.items():
            tables[name].chains = list(table.chains)
            tables[name].rules = {chain: list(lines) for chain, lines in table.rules.items()}
        current: Table | None = None
        try:
            for line in payload.splitlines():
                if line.startswith("*"):
                    current = tables[line[1:]]
                elif not line or line == "COMMIT" or line.startswith("#"):
                    continue
                elif current is None:
                    return None
                elif line.startswith(":"):
                    name = line[1:].split(None, 1)[0]
                    if name not in current.chains:
                        current.chains.append(name)
                    current.rules[name] = []  # created, or flushed
                elif line.startswith(("-A ", "-D ", "-I ")) and line.split(None, 2)[1] \
                        not in current.chains:  # iptables-nft adds a table's built-in
                    return None                 # chains with its first rule: not modelled
                elif line.startswith(("-A ", "-D ")):
                    chain = line.split(None, 2)[1]
                    if line[1] == "A":
                        current.rules.setdefault(chain, []).append(line)
                    else:
                        current.rules[chain].remove("-A" + line[2:])
                elif line.startswith("-I "):
                    _flag, chain, position, rest = line.split(None, 3)
                    current.rules.setdefault(chain, []).insert(int(position) - 1,
                                                               f"-A {chain} {rest}")
                elif line.startswith("-X "):
                    chain = line.split()[1]
                    current.chains.remove(chain)
                    current.rules.pop(chain, None)
                else:
                    return None
        except (KeyError, ValueError):
            return None
        return Snapshot(tables)

    def ours(self) -> dict[str, dict[str, list[str]]]:
        """Our chains' content per table (absent chains as empty)."""
        return {t: {c: list(self.tables[t].rules.get(c, [])) for c in our_chains(t)}
                for t in TABLES}

    def our_lines(self) -> frozenset[str]:
        """Every line in our chains, built once per snapshot (``status`` asks per forward)."""
        if self._our_lines is None:
            self._our_lines = frozenset(line for table in TABLES for chain in our_chains(table)
                                        for line in self.tables[table].rules.get(chain, ()))
        return self._our_lines

    def owners(self) -> set[str]:
        return {o for chains in self.ours().values() for lines in chains.values()
                for o in map(line_owner, lines) if o}

    def bad_jumps(self, table: str) -> list[str]:
        """The built-in chains of ``table`` whose jump to ours is not there exactly
        once at position 1."""
        tab = self.tables[table]
        bad = []
        for t, builtin, ours in JUMPS:
            if t != table:
                continue
            rules = tab.rules.get(builtin, [])
            jump = f"-A {builtin} -j {ours}"
            if not rules or rules[0] != jump or rules.count(jump) != 1:
                bad.append(builtin)
        return bad

    def jumps_ok(self, table: str) -> bool:
        return not self.bad_jumps(table)


Chains = dict[str, dict[str, list[str]]]  # table -> our chain -> lines


def compose(snapshot: Snapshot, rules: Mapping[str, Sequence[Rule]],
            drop: Callable[[Tag], bool] | None = None) -> Chains:
    """The target content of our chains: ``rules`` replaces each named owner's rules
    (an empty sequence removes the owner); ``drop`` removes any other tagged line it
    accepts (e.g. everything on a bridge). Other owners' lines are kept as they are.

    Lines that stay keep their place and new lines go at the end (new owners in sorted
    order), so that a change is a few deletions and appends: flushing a chain costs the
    kernel an RCU grace period, appending does not. Order between owners carries no
    meaning: each owner's rules match only its own bridge, subnet and ports.
    """
    rendered: dict[tuple[str, str], dict[str, list[str]]] = {}
    for owner in sorted(rules):
        for rule in rules[owner]:
            table, line = render_rule(rule)
            rendered.setdefault((table, line.split(" ", 2)[1]), {}).setdefault(
                owner, []).append(line)
    target: Chains = {}
    owner_of = _owner_finder(rules) if drop is None else line_tag
    # where lines are told apart by their owners' marks alone (``_owner_finder``), a
    # chain with no mark of a changed owner keeps every line as it is
    marks = [f"{TAG_PREFIX}{owner}," for owner in rules] if (
        drop is None and len(rules) <= QUICK_OWNERS) else None
    for table, chains in snapshot.ours().items():
        target[table] = {}
        for chain, lines in chains.items():
            new = rendered.get((table, chain), {})
            if marks is not None and not _holds_any(lines, marks):
                # none of the changed owners has a line here (a start amid thousands of
                # rules): everything stays, the new lines go at the end
                target[table][chain] = [*lines, *(line for owned in new.values()
                                                  for line in owned)]
                continue
            tagged = [(line, owner_of(line)) for line in lines]
            old: dict[str, list[str]] = {}
            for line, parsed in tagged:
                if parsed is not None:
                    old.setdefault(parsed.owner, []).append(line)
            unchanged = {owner for owner, owned in new.items() if old.get(owner) == owned}
            kept = []
            for line, parsed in tagged:
                if parsed is None or parsed.owner in unchanged or (
                        parsed.owner not in rules and not (drop and drop(parsed))):
                    kept.append(line)
            target[table][chain] = kept + [line for owner, owned in new.items()
                                           if owner not in unchanged for line in owned]
    return target


QUICK_OWNERS = 4  # a change of up to this many owners finds their lines by a search


def _holds_any(lines: list[str], marks: list[str]) -> bool:
    """Whether a line holds one of ``marks`` (``kvmufw:OWNER,``, what ``_owner_finder``
    looks for), with one search of the whole chain per owner. Joined with NUL, which
    neither a line nor a mark holds: no match spans two lines."""
    if not lines:
        return False
    joined = "\0".join(lines)
    return any(mark in joined for mark in marks)


def _owner_finder(rules: Mapping[str, Sequence[Rule]]) -> Callable[[str], Tag | None]:
    """How ``compose`` tells whose a line is when only the owners of ``rules`` matter (no
    ``drop``; the tag's bridge and subnet are left empty): a search for ``kvmufw:OWNER,``
    (owners never hold a comma) instead of parsing every comment, for a change of a few
    owners amid thousands of rules; the full parse otherwise."""
    if len(rules) > QUICK_OWNERS:
        return line_tag
    from ..names import Tag
    marks = [(f"{TAG_PREFIX}{owner},", Tag(owner, "", "")) for owner in rules]
    other = Tag("", "", "")  # a tagged line of an owner not being changed

    def owner_of(line: str) -> Tag | None:
        for mark, found in marks:
            if mark in line:
                return found
        return other if TAG_PREFIX in line else None

    return owner_of


# Deleting a rule costs iptables-nft a comparison with each rule of its chain; writing
# a rule costs about 15 such comparisons (measured with our rules, 2,000 to 10,000 in a
# chain): rewrite a chain when that is cheaper.
REWRITE_FACTOR = 15


def _edit(chain: str, current: list[str], wanted: list[str]) -> list[str]:
    """Deletions and appends that turn ``current`` into ``wanted`` (``compose`` keeps
    what stays in order and appends the rest, so this is exact, not a heuristic)."""
    deletes: list[str] = []
    j = 0
    for line in current:
        if j < len(wanted) and line == wanted[j]:
            j += 1
        else:
            deletes.append("-D" + line[2:])
    if deletes and len(deletes) * len(current) > REWRITE_FACTOR * len(wanted):
        # iptables finds each rule to delete by comparing it with every rule of the
        # chain: many deletions in a long chain cost more than writing it again
        return [f":{chain} - [0:0]", *wanted]
    return deletes + wanted[j:]


def transition(snapshot: Snapshot, target: Chains) -> str:
    """The ``iptables-restore --noflush`` payload that takes ``snapshot`` to ``target``;
    empty when there is nothing to do."""
    current = snapshot.ours()
    out: list[str] = []
    for table in TABLES:
        tab = snapshot.tables[table]
        wanted = target.get(table, {})
        body: list[str] = []
        if any(wanted.get(c) for c in our_chains(table)):
            for chain in our_chains(table):
                if chain not in tab.chains:
                    body.append(f":{chain} - [0:0]")
                body.extend(_edit(chain, current[table][chain], wanted.get(chain, [])))
            if not snapshot.jumps_ok(table):
                for t, builtin, ours in JUMPS:
                    if t != table:
                        continue
                    jump = f"-A {builtin} -j {ours}"
                    count = tab.rules.get(builtin, []).count(jump)
                    body.extend([f"-D {builtin} -j {ours}"] * count)
                    body.append(f"-I {builtin} 1 -j {ours}")
        else:  # nothing of ours left in this table: no jumps, no chains
            present = [c for c in our_chains(table) if c in tab.chains]
            for t, builtin, ours in JUMPS:
                if t == table:
                    count = tab.rules.get(builtin, []).count(f"-A {builtin} -j {ours}")
                    body.extend([f"-D {builtin} -j {ours}"] * count)
            body.extend(f":{c} - [0:0]" for c in present if current[table][c])
            body.extend(f"-X {c}" for c in present)
        if body:
            out.append(f"*{table}")
            out.extend(body)
            out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


# --------------------------------------------------------------------------- kernel

def find_tool(name: str) -> str:
    for directory in SEARCH_PATH.split(":"):
        path = f"{directory}/{name}"
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise ApplyError(f"{name} not found: install the iptables package")


def nft_based(family: int) -> bool:
    """Whether this host's iptables of ``family`` is iptables-nft (its rules are in
    nf_tables, where nft and netlink requests reach them too; legacy iptables' are not)."""
    try:
        return "nft" in os.path.basename(os.path.realpath(find_tool(TOOLS[family][0])))
    except ApplyError:
        return False


def ipv6_unavailable() -> str | None:
    """Why this host has no IPv6 firewall to write to, or None when it has one."""
    if not os.path.exists("/proc/sys/net/ipv6"):
        return "IPv6 is disabled in the kernel"
    try:
        find_tool(TOOLS[6][1])
    except ApplyError:
        return "ip6tables-restore not found"
    return None


class Ruleset:
    """The kernel's ruleset as read: one ``Snapshot`` per family read, and why a family
    was not (``unavailable``: no IPv6 on this host)."""

    def __init__(self, snapshots: dict[int, Snapshot],
                 unavailable: dict[int, str] | None = None,
                 generation: int | None = None) -> None:
        self.snapshots = snapshots
        self.unavailable = unavailable or {}
        self.generation = generation  # nf_tables' generation it was read at, if known

    @classmethod
    def empty(cls, families: Iterable[int] = FAMILIES) -> Ruleset:
        return cls({f: Snapshot.parse("") for f in families})

    def __getitem__(self, family: int) -> Snapshot:
        return self.snapshots[family]

    @property
    def families(self) -> set[int]:
        return set(self.snapshots)


class Change:
    """The payloads that take a ruleset to a target, one per family (written with one
    ``iptables-restore`` and one ``ip6tables-restore``), and the families whose rules had
    to be left out (``skipped``: family -> why). False when nothing changes."""

    __slots__ = ("base", "ended", "parts", "skipped")

    def __init__(self, parts: dict[int, str], skipped: dict[int, str] | None = None,
                 ended: dict[int, list[str]] | None = None, base: Ruleset | None = None) -> None:
        self.base = base  # the ruleset the payloads were made from
        self.parts = {f: p for f, p in parts.items() if p}
        self.skipped = skipped or {}
        self.ended = {f: lines for f, lines in (ended or {}).items() if lines}

    def __bool__(self) -> bool:
        return bool(self.parts)

    @property
    def text(self) -> str:
        """Every payload, IPv4 first, each family's under its own heading."""
        return "".join(SECTION[f] + self.parts[f] for f in sorted(self.parts))

    def ends_forwards(self) -> bool:
        """Whether it takes DNAT rules out for good (not put back as they were)."""
        return bool(self.ended)


def _ended(snapshot: Snapshot, target: Chains) -> list[str]:
    """The DNAT rules of ours in ``snapshot`` that ``target`` no longer has."""
    chain = STAGE_CHAIN["prerouting"][1]
    current = snapshot.ours()["nat"][chain]
    if not current:
        return []
    kept = set(target.get("nat", {}).get(chain, ()))
    return [line for line in current if line not in kept and " -j DNAT " in line]


def split_by_family(rules: Mapping[str, Sequence[Rule]]) -> dict[int, dict[str, list[Rule]]]:
    """family -> owner -> that owner's rules of the family; every owner appears in every
    family (an owner with no rule left in a family is removed from it)."""
    out: dict[int, dict[str, list[Rule]]] = {f: {} for f in FAMILIES}
    for owner, owned in rules.items():
        for family in FAMILIES:
            out[family][owner] = []
        for rule in owned:
            out[rule.family][owner].append(rule)
    return out


class Record:
    """The ruleset as our own last write left it, and nf_tables' generation right after
    that write (a file beside the state, written under the state lock): a read while the
    generation is still that one needs no ``iptables-save`` (amid 10,000 rules, most of
    a guest's start). Any change by anyone (UFW, libvirt, an admin, a rule of ours put
    in by hand) moves the generation on: then the kernel is read again, as always."""

    NAME = "ruleset"

    @classmethod
    def load(cls, generation: int, families: set[int]) -> Ruleset | None:
        from .. import state
        data = state.read_recorded(cls.NAME, generation)
        try:
            unavailable, snapshots = data
        except (ValueError, TypeError):
            return None
        if not families <= set(snapshots) | set(unavailable):
            return None
        out = {}
        for family, tables in snapshots.items():
            snap = Snapshot({t: Table() for t in TABLES})
            for name, (chains, rules) in tables.items():
                snap.tables[name].chains, snap.tables[name].rules = chains, rules
            out[family] = snap
        return Ruleset(out, unavailable, generation)

    @classmethod
    def save(cls, ruleset: Ruleset) -> None:
        from .. import state
        if ruleset.generation is None:  # nothing to prove it by
            state.forget_recorded(cls.NAME)
            return
        state.write_recorded(cls.NAME, ruleset.generation, (
            ruleset.unavailable,
            {f: {name: (t.chains, t.rules) for name, t in snap.tables.items()}
             for f, snap in ruleset.snapshots.items()}))

    @classmethod
    def forget(cls) -> None:
        from .. import state
        state.forget_recorded(cls.NAME)


class Tools:
    """The kernel as the iptables backend reaches it: the host's ``iptables-save`` and
    ``iptables-restore`` (and ip6tables'), nf_tables' generation, conntrack. ``prefix``
    runs the commands elsewhere, e.g. ``ip netns exec NS``. (The unit tier puts iptables
    in memory here: ``tests/fakebackend.py``.)"""

    def __init__(self, prefix: Iterable[str] = ()) -> None:
        self.prefix = list(prefix)

    def tool(self, name: str) -> str:
        return name if self.prefix or "/" in name else find_tool(name)

    def save(self, family: int) -> str:
        save = TOOLS[family][0]
        return run([*self.prefix, self.tool(save)], name=save)

    def restore(self, family: int, payload: str) -> None:
        restore = TOOLS[family][1]
        run([*self.prefix, self.tool(restore), "--noflush", "-w"], stdin=payload,
            name=restore)

    def unavailable(self, family: int) -> str | None:
        """Why ``family`` cannot be read or written here (None: it can)."""
        if family == 4:
            return None
        if self.prefix:  # elsewhere: ask that namespace's ip6tables itself
            try:
                self.save(6)
            except ApplyError as exc:
                return str(exc)
            return None
        return ipv6_unavailable()

    def ours_in(self, family: int) -> bool:
        """Whether we may have rules in ``family`` (IPv4: always read)."""
        if family == 4 or self.prefix:
            return True
        try:
            save = os.path.realpath(find_tool(TOOLS[family][0]))
        except ApplyError:
            return False
        if "legacy" in os.path.basename(save):  # no nf_tables to ask: loaded tables tell
            try:
                with open("/proc/net/ip6_tables_names") as fh:
                    return bool(fh.read().strip())
            except OSError:
                return False
        from .nftprobe import IPV6, chain_in_kernel
        return (chain_in_kernel(IPV6, "filter", "KVMUFW-FORWARD")
                or chain_in_kernel(IPV6, "nat", "KVMUFW-PREROUTING"))

    def generation(self) -> int | None:
        """nf_tables' ruleset generation, where our reads and writes go to this
        namespace's nf_tables (never through ``prefix``, nor with legacy iptables)."""
        if self.prefix:
            return None
        try:
            if "legacy" in os.path.basename(os.path.realpath(find_tool(TOOLS[4][0]))):
                return None
        except ApplyError:
            return None
        from .nftprobe import generation
        return generation()

    def end_flows(self, ended: dict[int, list[str]], log: Log) -> None:
        """End the conntrack flows of the DNAT lines ``ended`` (per family) took out
        (``conntrack.py``): in this process, or in one child in the namespace ``prefix``
        runs in."""
        from ..conntrack import end_flows
        flows = [flow for family, lines in ended.items() for line in lines
                 if (flow := _flow(family, line)) is not None]
        if not flows:
            return
        if not self.prefix:
            try:
                end_flows(flows)
            except OSError as exc:
                log(f"conntrack flows of removed forwards not ended: {exc}")
            return
        import json
        import subprocess
        import sys
        package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (f"import sys; sys.path.insert(0, {package!r}); "
                "from kvmufw_hook.conntrack import main; main()")
        data = json.dumps([[f, p, a, b, g.hex(), h.hex() if h else ""]
                           for f, p, a, b, g, h in flows])
        try:
            subprocess.run([*self.prefix, sys.executable, "-c", code], input=data, text=True,
                           capture_output=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"conntrack flows of removed forwards not ended: {exc}")


class IptablesBackend:
    """IPv4 and IPv6 through whichever ``iptables`` and ``ip6tables`` the host selects
    (nf_tables or legacy), the ones UFW uses. ``prefix`` runs the commands elsewhere,
    e.g. ``ip netns exec NS``; ``kernel``: what reads and writes (``Tools`` by default).

    Reading IPv6 costs a process: a ruleset holds IPv6 only when asked for
    (``read(families)``) or when rules of ours are there (one netlink request says so,
    or the legacy tables are loaded), so that an IPv4-only host pays nothing for it."""

    name = "iptables"

    def __init__(self, prefix: Iterable[str] = (), kernel: Kernel | None = None) -> None:
        self.prefix = list(prefix)
        self.kernel = kernel if kernel is not None else Tools(self.prefix)

    # ------------------------------------------------------------------ the kernel

    def _save(self, family: int) -> str:
        return self.kernel.save(family)

    def _restore(self, family: int, payload: str) -> None:
        self.kernel.restore(family, payload)

    def _unavailable(self, family: int) -> str | None:
        return self.kernel.unavailable(family)

    def _ours_in(self, family: int) -> bool:
        return self.kernel.ours_in(family)

    def _generation(self) -> int | None:
        return self.kernel.generation()

    def read(self, families: Iterable[int] = ()) -> Ruleset:
        """IPv4, and each other family in ``families`` or holding rules of ours: from
        our record of the ruleset after our own last write while nf_tables' generation
        says nothing changed since (``Record``), else with ``iptables-save``."""
        wanted = set(families)
        generation = self._generation()
        if generation is not None:
            known = Record.load(generation, wanted)
            if known is not None:
                return known
        snapshots: dict[int, Snapshot] = {}
        unavailable: dict[int, str] = {}
        for family in FAMILIES:
            if family != 4 and family not in wanted and not self._ours_in(family):
                continue
            why = self._unavailable(family)
            if why is not None:
                unavailable[family] = why
                continue
            snapshots[family] = Snapshot.parse(self._save(family))
        if generation is not None and self._generation() != generation:
            generation = None  # changed while being read: not a reading of one generation
        return Ruleset(snapshots, unavailable, generation)

    def write(self, change: Change) -> None:
        """One restore per family. If one fails, those before it stay written: the
        caller puts them back (``revert``), so a change is whole or not at all.
        Afterwards the ruleset as written is recorded (``Record``) when nf_tables'
        generation proves that nobody else changed anything between its reading and
        the end of the write; else (and on a failure) the record goes."""
        if not change:
            return
        base = change.base
        start = base.generation if base is not None else None
        if start is not None and self._generation() != start:
            start = None
        try:
            for family in sorted(change.parts):
                self._restore(family, change.parts[family])
        except ApplyError:
            Record.forget()
            raise
        if start is None or base is None:
            Record.forget()
            return
        commits = sum(part.count("\nCOMMIT") for part in change.parts.values())
        after = {f: snap.after(change.parts[f]) if f in change.parts else snap
                 for f, snap in base.snapshots.items()}
        if self._generation() != start + commits or None in after.values():
            Record.forget()
            return
        Record.save(Ruleset({f: s for f, s in after.items() if s is not None},
                            base.unavailable, start + commits))

    # ------------------------------------------------------------------ changes

    @staticmethod
    def change(ruleset: Ruleset, intents: Owners,
               drop: Callable[[Tag], bool] | None = None) -> Change:
        """What replaces the named owners' rules in every family (and drops matching
        tagged rules of others). Rules of a family the ruleset does not hold are left
        out and said so (``Change.skipped``)."""
        parts, skipped, ended = {}, {}, {}
        for family, owned in split_by_family(as_rules(intents)).items():
            snapshot = ruleset.snapshots.get(family)
            if snapshot is not None:
                target = compose(snapshot, owned, drop)
                parts[family] = transition(snapshot, target)
                ended[family] = _ended(snapshot, target)
            elif any(owned.values()):
                skipped[family] = ruleset.unavailable.get(family, "not read")
        return Change(parts, skipped, ended, ruleset)

    @staticmethod
    def revert(now: Ruleset, before: Ruleset) -> Change:
        """What puts our chains back as they were in ``before``, in every family."""
        return Change({f: transition(now[f], before[f].ours())
                       for f in before.snapshots if f in now.snapshots}, base=now)

    @staticmethod
    def clear(ruleset: Ruleset) -> Change:
        """What removes all our rules, chains and jumps."""
        return Change({f: transition(snap, {}) for f, snap in ruleset.snapshots.items()},
                      base=ruleset)

    @staticmethod
    def render(intents: Owners) -> str:
        """The rules as they would be written to empty tables (``plan``)."""
        return IptablesBackend.change(Ruleset.empty(), intents).text

    # ------------------------------------------------------------------ readings

    def end_flows(self, change: Change, log: Log) -> None:
        """End the conntrack flows of the DNAT rules ``change`` took out."""
        if change.ended:
            self.kernel.end_flows(change.ended, log)

    @staticmethod
    def claims(ruleset: Ruleset, near: Iterable[HostPort] | None = None,
               mine: str | None = None) -> dict[str, list[Claim]]:
        """owner -> the host ports its rules hold, in every family read. ``near``: only
        the claims that could overlap these forwards (and every claim of ``mine``); the
        other owners are still keys, with no claim."""
        out: dict[str, list[Claim]] = {}
        for snapshot in ruleset.snapshots.values():
            for owner, specs in kernel_claims(snapshot, near, mine).items():
                out.setdefault(owner, []).extend(specs)
        return out

    @staticmethod
    def present(ruleset: Ruleset, intents: Iterable[Intent]) -> bool:
        """Whether every rule of ``intents`` is in the kernel."""
        from .rules import netfilter_rules
        for rule in netfilter_rules(intents):
            snapshot = ruleset.snapshots.get(rule.family)
            if snapshot is None or render_rule(rule)[1] not in snapshot.our_lines():
                return False
        return True

    @staticmethod
    def owners(ruleset: Ruleset) -> set[str]:
        """Every owner with a rule in the kernel."""
        return {o for snap in ruleset.snapshots.values() for o in snap.owners()}

    @staticmethod
    def has_rules(ruleset: Ruleset) -> bool:
        return any(lines for snap in ruleset.snapshots.values()
                   for chains in snap.ours().values() for lines in chains.values())

    @staticmethod
    def entry_problems(ruleset: Ruleset) -> list[str]:
        """``FORWARD (filter)`` (``FORWARD (filter, IPv6)``) for each built-in chain whose
        jump is wrong, in tables where we have rules (elsewhere no jump is expected)."""
        out = []
        for family, snap in sorted(ruleset.snapshots.items()):
            ours = snap.ours()
            where = "" if family == 4 else f", IPv{family}"
            out += [f"{chain} ({table}{where})" for table in TABLES if any(ours[table].values())
                    for chain in snap.bad_jumps(table)]
        return out

    @staticmethod
    def libvirt_backend(ruleset: Ruleset) -> str | None:
        """``iptables`` where libvirt's own chains (``LIBVIRT_*``) are in the IPv4
        tables."""
        return "iptables" if _libvirt_chains(ruleset) else None

    @staticmethod
    def libvirt_missing(ruleset: Ruleset) -> list[str]:
        """libvirt's chains its iptables backend keeps that are not there."""
        present = _libvirt_chains(ruleset)
        return [c for c in LIBVIRT_CHAINS if c not in present]


def _libvirt_chains(ruleset: Ruleset) -> set[str]:
    snap = ruleset.snapshots.get(4)
    if snap is None:
        return set()
    return {c for t in snap.tables.values() for c in t.chains if c.startswith("LIBVIRT_")}


def as_rules(intents: Owners) -> dict[str, Sequence[Rule]]:
    """owner -> the rules of its intents (``rules.py``, imported only when an owner has
    any: a guest's stop removes an owner and expands nothing)."""
    if not any(intents.values()):
        return {owner: () for owner in intents}
    from .rules import netfilter_rules
    return {owner: netfilter_rules(owned) for owner, owned in intents.items()}


# --------------------------------------------------------------------------- readings

def _tokens_after(tokens: list[str], flag: str) -> str | None:
    try:
        return tokens[tokens.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def _flow(family: int, line: str) -> Flow | None:
    """``conntrack.Flow`` of one of our DNAT lines: what connections it translated."""
    from _socket import AF_INET, AF_INET6, inet_pton

    from ..conntrack import PROTOCOLS
    tokens = line.split()
    proto, dport = _tokens_after(tokens, "-p"), _tokens_after(tokens, "--dport")
    to = _tokens_after(tokens, "--to-destination") or ""
    dst = _tokens_after(tokens, "-d")
    guest = to[1:].split("]")[0] if to.startswith("[") else to.split(":")[0]
    if proto not in PROTOCOLS or dport is None or not guest:
        return None
    af = AF_INET if family == 4 else AF_INET6
    first, _, last = dport.partition(":")
    try:
        return (family, PROTOCOLS[proto], int(first), int(last or first), inet_pton(af, guest),
                inet_pton(af, dst.split("/")[0]) if dst else None)
    except (OSError, ValueError):
        return None


_QUICK = f'--comment "{TAG_PREFIX}'


def _quick_owner(line: str) -> str | None:
    """The owner of one of our rules, found without parsing its comment: the text
    between ``kvmufw:`` and the tag's first comma; None when the line is not that
    plain (then ``line_owner`` decides)."""
    at = line.find(_QUICK)
    if at < 0:
        return None
    start = at + len(_QUICK)
    end = line.find(",", start)
    owner = line[start:end] if end > 0 else ""
    return owner if "=" in owner and '"' not in owner and " " not in owner else None


def far_test(near: Iterable[HostPort]) -> Callable[[str, int, int], bool]:
    """Whether (protocol, first port, last port) overlaps none of ``near``'s host ports:
    asked of each of thousands of DNAT entries on a start amid many guests, so a single
    port is one set lookup while ``near`` holds single ports only (as it mostly does)."""
    wanted = [(spec.proto, spec.host_port.first, spec.host_port.last) for spec in near]
    singles = {(p, a) for p, a, b in wanted if a == b}
    ranged = len(singles) < len(wanted)

    def far(proto: str, first: int, last: int) -> bool:
        if first == last and not ranged:
            return (proto, first) not in singles
        return not any(p == proto and a <= last and first <= b for p, a, b in wanted)
    return far


def kernel_claims(snapshot: Snapshot, near: Iterable[HostPort] | None = None,
                  mine: str | None = None) -> dict[str, list[Claim]]:
    """owner -> the host ports its DNAT rules in the kernel hold right now (proto, port
    range, host address): who holds a port is what the kernel says, whatever our state
    files say (they can be lost or corrupt)."""
    from ipaddress import ip_address  # here: a guest's stop never needs it

    from ..intents import Claim
    from ..model import PortRange
    seen: dict[str, dict[Claim, None]] = {}
    far_from = None if near is None else far_test(near)
    for line in snapshot.tables["nat"].rules.get(STAGE_CHAIN["prerouting"][1], []):
        if " -j DNAT " not in line:
            continue
        tokens = line.split()
        proto, dport = _tokens_after(tokens, "-p"), _tokens_after(tokens, "--dport")
        if proto is None or dport is None:
            continue
        first_text, _, last_text = dport.partition(":")
        first, last = int(first_text), int(last_text or first_text)
        far = far_from is not None and far_from(proto, first, last)
        owner = (_quick_owner(line) if far else None) or line_owner(line)
        if owner is None:
            continue
        if far and owner != mine:
            seen.setdefault(owner, {})  # an owner all the same, with no claim in the way
            continue
        ports = PortRange(first, last)
        dst = _tokens_after(tokens, "-d")
        host_ip = ip_address(dst.split("/")[0]) if dst else None
        to = _tokens_after(tokens, "--to-destination") or ""
        # the guest address gives the claim its family: [fd00::5]:22 or 10.0.0.5:22
        guest = to[1:].split("]")[0] if to.startswith("[") else to.split(":")[0]
        try:
            to_guest = ip_address(guest) if guest else None
        except ValueError:
            to_guest = None
        claim = Claim(proto=proto, host_port=ports, guest=to_guest, host_ip=host_ip)
        seen.setdefault(owner, {})[claim] = None  # ordered, and linear: one per source
    return {owner: list(claims) for owner, claims in seen.items()}


if TYPE_CHECKING:  # the compiler checks that this is a backend (as Calico's ``var _ Table``)
    from .base import Backend
    _IS_A_BACKEND: Backend[Ruleset, Change] = IptablesBackend()
