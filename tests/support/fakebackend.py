"""iptables in memory, for the fast tier (``pytest -m unit``): the ruleset as
``iptables-save`` text, changed by the very payloads ``iptables-restore --noflush`` takes,
with its rules: a table is committed whole or not at all, tables before it stay committed,
``-D`` of a rule that is not there and ``-A`` to a chain that does not exist fail.

``MemoryIptables`` is the kernel the real iptables backend reads and writes through (its
``kernel``); ``FakeBackend`` is that backend on it, a ``backends.base.Backend`` by
composition (no subclass of the iptables backend): the backend's own read, change,
write and revert run unchanged. It stands in for the kernel only where the kernel is not
what a test is about (ops, compose/transition, the revert path); the kernel tests prove
the same payloads against a real iptables-restore.
"""

from __future__ import annotations

from kvmufw_hook.backends import backend_only
from kvmufw_hook.errors import ApplyError

BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"),
           "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}


class MemoryIptables:
    """Both families in memory (``tables`` is IPv4's, ``families[6]`` IPv6's)."""

    def __init__(self, fail_tables: tuple[str, ...] = (), fail_family: int | None = None,
                 ipv6: bool = True) -> None:
        self.fail_tables = set(fail_tables)
        self.fail_family = fail_family  # with fail_tables: fail only in that family
        self.families: dict[int, dict[str, dict[str, list[str]]]] = {
            f: {t: {c: [] for c in chains} for t, chains in BUILTIN.items()}
            for f in ((4, 6) if ipv6 else (4,))}
        self.writes: list[str] = []
        self.ended: list[str] = []

    @property
    def tables(self) -> dict[str, dict[str, list[str]]]:
        return self.families[4]

    def end_flows(self, ended, log) -> None:
        """Conntrack is the kernel's: only remembered here (never this host's flows)."""
        self.ended += [line for lines in ended.values() for line in lines]

    def unavailable(self, family: int) -> str | None:
        return None if family in self.families else "IPv6 is disabled in the kernel"

    def ours_in(self, family: int) -> bool:
        return True

    def generation(self) -> int | None:
        return None  # no nf_tables generation: every read reads

    def save(self, family: int = 4) -> str:
        out = []
        for table, chains in self.families[family].items():
            out.append(f"*{table}")
            out += [f":{c} {'ACCEPT' if c in BUILTIN[table] else '-'} [0:0]" for c in chains]
            out += [line for lines in chains.values() for line in lines]
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    def restore(self, family: int, payload: str) -> None:
        if not payload:
            return
        self.writes.append(payload)
        tables = self.families[family]
        table, work = None, None
        for line in payload.splitlines():
            if line.startswith("*"):
                table = line[1:]
                work = {c: list(ls) for c, ls in tables[table].items()}
            elif line == "COMMIT":
                if table in self.fail_tables and self.fail_family in (None, family):
                    raise ApplyError(f"iptables-restore failed (exit 1): line COMMIT of {table}")
                tables[table] = work
            else:
                self._apply(work, line)

    @staticmethod
    def _apply(chains: dict[str, list[str]], line: str) -> None:
        op, chain, *rest = line.split(" ", 2)
        if op.startswith(":"):
            chains[op[1:]] = []  # declared: created, or flushed if it exists
            return
        if chain not in chains:
            raise ApplyError(f"iptables-restore failed (exit 1): {line}: no chain {chain}")
        text = rest[0] if rest else ""
        if op == "-A":
            chains[chain].append(f"-A {chain} {text}")
        elif op == "-D":
            try:
                chains[chain].remove(f"-A {chain} {text}")
            except ValueError:
                raise ApplyError(f"iptables-restore failed (exit 1): {line}: no such rule") \
                    from None
        elif op == "-I":
            position, _, rule = text.partition(" ")
            chains[chain].insert(int(position) - 1, f"-A {chain} {rule}")
        elif op == "-X":
            if chains[chain] or any(l.endswith(f" -j {chain}") for ls in chains.values()
                                    for l in ls):
                raise ApplyError(f"iptables-restore failed (exit 1): {line}: not empty")
            del chains[chain]
        else:
            raise ApplyError(f"iptables-restore failed (exit 1): {line}: unknown")


class FakeBackend:
    """The iptables backend (from the registry) on ``MemoryIptables``: every method of the
    backend interface goes to the backend, the memory's state (``tables``, ``save``,
    ``writes``, ``fail_tables``, ``ended``) is the kernel's."""

    def __init__(self, fail_tables: tuple[str, ...] = (), fail_family: int | None = None,
                 ipv6: bool = True) -> None:
        self.kernel = MemoryIptables(fail_tables, fail_family, ipv6)
        self.backend = backend_only("iptables")
        self.backend.kernel = self.kernel  # type: ignore[attr-defined]

    # the backend interface
    name = "fake"
    prefix: tuple[str, ...] = ()

    def read(self, families=()):
        return self.backend.read(families)

    def write(self, change) -> None:
        self.backend.write(change)

    def change(self, ruleset, intents, drop=None):
        return self.backend.change(ruleset, intents, drop)

    def revert(self, now, before):
        return self.backend.revert(now, before)

    def clear(self, ruleset):
        return self.backend.clear(ruleset)

    def render(self, intents) -> str:
        return self.backend.render(intents)

    def present(self, ruleset, intents) -> bool:
        return self.backend.present(ruleset, intents)

    def claims(self, ruleset, near=None, mine=None):
        return self.backend.claims(ruleset, near, mine)

    def end_flows(self, change, log) -> None:
        self.backend.end_flows(change, log)

    def owners(self, ruleset) -> set[str]:
        return self.backend.owners(ruleset)

    def has_rules(self, ruleset) -> bool:
        return self.backend.has_rules(ruleset)

    def entry_problems(self, ruleset) -> list[str]:
        return self.backend.entry_problems(ruleset)

    def libvirt_backend(self, ruleset) -> str | None:
        return self.backend.libvirt_backend(ruleset)

    def libvirt_missing(self, ruleset) -> list[str]:
        return self.backend.libvirt_missing(ruleset)

    # the kernel's state, as tests look at and break it
    @property
    def tables(self) -> dict[str, dict[str, list[str]]]:
        return self.kernel.tables

    @property
    def families(self) -> dict[int, dict[str, dict[str, list[str]]]]:
        return self.kernel.families

    @property
    def writes(self) -> list[str]:
        return self.kernel.writes

    @property
    def ended(self) -> list[str]:
        return self.kernel.ended

    @property
    def fail_tables(self) -> set[str]:
        return self.kernel.fail_tables

    @fail_tables.setter
    def fail_tables(self, tables) -> None:
        self.kernel.fail_tables = set(tables)

    def save(self, family: int = 4) -> str:
        return self.kernel.save(family)
