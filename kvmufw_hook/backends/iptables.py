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
from ..names import JUMPS, TABLES, our_chains, parse_tag, tag
from ..process import communicate

# A guest's stop imports this module and nothing heavier: no re, subprocess, shutil,
# dataclasses or planner (together more than the interpreter's own start-up).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from ..model import ForwardSpec
    from ..plan import Rule

HOOK_CHAIN = {hook.lower(): (table, ours) for table, hook, ours in JUMPS}
SEARCH_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"


def _ports(ports, sep: str) -> str:
    return str(ports.first) if ports.first == ports.last else f"{ports.first}{sep}{ports.last}"


def render_rule(rule: Rule) -> tuple[str, str]:
    """(table, ``-A CHAIN …`` line) in ``iptables-save``'s canonical form."""
    table, chain = HOOK_CHAIN[rule.hook]
    out = ["-A", chain]
    if rule.src is not None:
        out += ["-s", str(rule.src)]
    if rule.dst is not None:
        out += ["-d", str(rule.dst)]
    if rule.not_dst is not None:
        out += ["!", "-d", str(rule.not_dst)]
    if rule.iif:
        out += ["-i", rule.iif]
    if rule.oif:
        out += ["-o", rule.oif]
    if rule.proto:
        out += ["-p", rule.proto]
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
    out += ["-m", "comment", "--comment", f'"{tag(rule.owner, rule.bridge, rule.subnet)}"']
    out += ["-j", rule.verdict]
    if rule.verdict == "DNAT":
        dest = f"{rule.to_addr}:{_ports(rule.to_ports, '-')}"
        if rule.to_base is not None:
            dest += f"/{rule.to_base}"
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


def line_tag(line: str) -> dict[str, str] | None:
    text = comment(line)
    return parse_tag(text) if text is not None else None


def line_owner(line: str) -> str | None:
    parsed = line_tag(line)
    return parsed["owner"] if parsed else None


# --------------------------------------------------------------------------- snapshot

class Table:
    """One table of a snapshot: its chains in order, and each chain's ``-A`` lines."""

    def __init__(self) -> None:
        self.chains: list[str] = []
        self.rules: dict[str, list[str]] = {}


class Snapshot:
    """What ``iptables-save`` printed, for the tables we use."""

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


Target = dict[str, dict[str, list[str]]]  # table -> our chain -> lines


def compose(snapshot: Snapshot, rules: Mapping[str, Sequence[Rule]],
            drop: Callable[[dict[str, str]], bool] | None = None) -> Target:
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
    target: Target = {}
    for table, chains in snapshot.ours().items():
        target[table] = {}
        for chain, lines in chains.items():
            new = rendered.get((table, chain), {})
            tagged = [(line, line_tag(line)) for line in lines]
            old: dict[str, list[str]] = {}
            for line, parsed in tagged:
                if parsed is not None:
                    old.setdefault(parsed["owner"], []).append(line)
            unchanged = {owner for owner, owned in new.items() if old.get(owner) == owned}
            kept = []
            for line, parsed in tagged:
                if parsed is None or parsed["owner"] in unchanged or (
                        parsed["owner"] not in rules and not (drop and drop(parsed))):
                    kept.append(line)
            target[table][chain] = kept + [line for owner, owned in new.items()
                                           if owner not in unchanged for line in owned]
    return target


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


def transition(snapshot: Snapshot, target: Target) -> str:
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


def run(argv: Sequence[str], stdin: str | None = None, timeout: float = 60,
        name: str | None = None) -> str:
    """The one place that runs a firewall command. ApplyError with one line on failure,
    naming the tool (``name``, when argv starts with a wrapper such as ``ip netns exec``)."""
    name = name or argv[0].rsplit("/", 1)[-1]
    data = stdin.encode("utf-8", "surrogateescape") if stdin is not None else None
    try:
        status, out, err = communicate(list(argv), data, timeout)
    except FileNotFoundError:
        raise ApplyError(f"{name} not found") from None
    except TimeoutError:
        raise ApplyError(f"{name} did not finish within {timeout:.0f}s") from None
    if status != 0:
        text = err.decode("utf-8", "replace")
        first = next((l for l in text.splitlines() if l.strip()), "").strip()
        raise ApplyError(f"{name} failed (exit {status})" + (f": {first}" if first else ""))
    return out.decode("utf-8", "surrogateescape")


class IptablesBackend:
    """IPv4 through whichever ``iptables`` the host selects (nf_tables or legacy) —
    the one UFW uses. ``prefix`` runs the commands elsewhere, e.g. ``ip netns exec NS``."""

    family = 4

    # what a change is, in this backend's terms
    @staticmethod
    def change(snapshot: Snapshot, rules: Mapping[str, Sequence[Rule]],
               drop: Callable[[dict[str, str]], bool] | None = None) -> str:
        return transition(snapshot, compose(snapshot, rules, drop))

    @staticmethod
    def revert(now: Snapshot, before: Snapshot) -> str:
        return transition(now, before.ours())

    @staticmethod
    def clear(snapshot: Snapshot) -> str:
        return transition(snapshot, {})

    @staticmethod
    def claims(snapshot: Snapshot) -> dict[str, list[ForwardSpec]]:
        return kernel_claims(snapshot)

    @staticmethod
    def bad_jumps(snapshot: Snapshot) -> list[str]:
        """``FORWARD (filter)`` for each built-in chain whose jump is wrong, in tables
        where we have rules (elsewhere no jump is expected)."""
        ours = snapshot.ours()
        return [f"{chain} ({table})" for table in TABLES if any(ours[table].values())
                for chain in snapshot.bad_jumps(table)]

    @staticmethod
    def present(snapshot: Snapshot, rules: Iterable[Rule]) -> bool:
        lines = snapshot.our_lines()
        return all(render_rule(rule)[1] in lines for rule in rules)

    def __init__(self, prefix: Iterable[str] = (), save: str = "iptables-save",
                 restore: str = "iptables-restore"):
        self.prefix = list(prefix)
        self.save_cmd = save
        self.restore_cmd = restore

    def _tool(self, name: str) -> str:
        return name if self.prefix or "/" in name else find_tool(name)

    def read(self) -> Snapshot:
        return Snapshot.parse(run([*self.prefix, self._tool(self.save_cmd)],
                                  name=self.save_cmd))

    def write(self, payload: str) -> None:
        if payload:
            run([*self.prefix, self._tool(self.restore_cmd), "--noflush", "-w"], stdin=payload,
                name=self.restore_cmd)



# --------------------------------------------------------------------------- readings

def _tokens_after(tokens: list[str], flag: str) -> str | None:
    try:
        return tokens[tokens.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def kernel_claims(snapshot: Snapshot) -> dict[str, list[ForwardSpec]]:
    """owner -> the host ports its DNAT rules in the kernel hold right now (proto, port
    range, host address): who holds a port is what the kernel says, whatever our state
    files say (they can be lost or corrupt)."""
    from ipaddress import IPv4Address  # here: a guest's stop never needs them

    from ..model import ForwardSpec, PortRange
    out: dict[str, list[ForwardSpec]] = {}
    for line in snapshot.tables["nat"].rules.get(HOOK_CHAIN["prerouting"][1], []):
        if " -j DNAT " not in line:
            continue
        owner = line_owner(line)
        tokens = line.split()
        proto, dport = _tokens_after(tokens, "-p"), _tokens_after(tokens, "--dport")
        if owner is None or proto is None or dport is None:
            continue
        first, _, last = dport.partition(":")
        ports = PortRange(int(first), int(last or first))
        dst = _tokens_after(tokens, "-d")
        host_ip = IPv4Address(dst.split("/")[0]) if dst else None
        spec = ForwardSpec(proto=proto, host_port=ports, guest_port=ports, host_ip=host_ip)
        if spec not in out.setdefault(owner, []):
            out[owner].append(spec)
    return out
