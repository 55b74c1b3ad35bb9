"""iptables in memory, for the fast tier (``pytest -m unit``): the ruleset as
``iptables-save`` text, changed by the very payloads ``iptables-restore --noflush`` takes,
with its rules: a table is committed whole or not at all, tables before it stay committed,
``-D`` of a rule that is not there and ``-A`` to a chain that does not exist fail.

It stands in for the kernel only where the kernel is not what a test is about (ops,
compose/transition, the revert path); the kernel tests prove the same payloads against a
real iptables-restore.
"""

from __future__ import annotations

from kvmufw_hook.backends.iptables import IptablesBackend
from kvmufw_hook.errors import ApplyError

BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"),
           "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}


class FakeBackend(IptablesBackend):
    """Both families in memory (``tables`` is IPv4's, ``families[6]`` IPv6's); the
    backend's own read/change/write/revert run on top of them unchanged."""

    def __init__(self, fail_tables: tuple[str, ...] = (), fail_family: int | None = None,
                 ipv6: bool = True) -> None:
        super().__init__()
        self.fail_tables = set(fail_tables)
        self.fail_family = fail_family  # with fail_tables: fail only in that family
        self.families: dict[int, dict[str, dict[str, list[str]]]] = {
            f: {t: {c: [] for c in chains} for t, chains in BUILTIN.items()}
            for f in ((4, 6) if ipv6 else (4,))}
        self.writes: list[str] = []

    @property
    def tables(self) -> dict[str, dict[str, list[str]]]:
        return self.families[4]

    def end_flows(self, change, log) -> None:
        """Conntrack is the kernel's: only remembered here (never this host's flows)."""
        self.ended = [*getattr(self, "ended", []), *(line for lines in change.ended.values()
                                                     for line in lines)]

    def _unavailable(self, family: int) -> str | None:
        return None if family in self.families else "IPv6 is disabled in the kernel"

    def _ours_in(self, family: int) -> bool:
        return True

    def _save(self, family: int) -> str:
        return self.save(family)

    def save(self, family: int = 4) -> str:
        out = []
        for table, chains in self.families[family].items():
            out.append(f"*{table}")
            out += [f":{c} {'ACCEPT' if c in BUILTIN[table] else '-'} [0:0]" for c in chains]
            out += [line for lines in chains.values() for line in lines]
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    def _restore(self, family: int, payload: str) -> None:
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
