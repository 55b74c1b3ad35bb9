"""One change across participants: our own rules (the backend chosen by name) and
whatever else a forward needs elsewhere (our accepts inside libvirt's nftables table,
``accepts.py``), behind the one ``Backend`` interface, so that callers see a single
backend and never a side path.

Reading reads every participant; a change is each participant's part; writing writes
them in order, ours first and each other's last (one ``nft -f``: if it fails nothing of
it is in), and ``revert`` takes every participant back, so that a change is whole or not
at all across them.

A guest's stop imports this module: plain classes, no dataclasses or typing at run time.
"""

from __future__ import annotations

from ..errors import ApplyError, Stale

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

    from ..intents import Claim, Intent
    from ..names import Tag
    from .base import Backend, HostPort, Log, Owners


class Rulesets:
    """Every participant's ruleset, in participant order; the first is our rules'."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[Any, ...]) -> None:
        self.parts = parts

    @property
    def unavailable(self) -> dict[int, str]:
        return self.parts[0].unavailable  # type: ignore[no-any-return]

    @property
    def families(self) -> set[int]:
        return set(self.parts[0].families)


class Changes:
    """Every participant's change, in participant order; false when none changes."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[Any, ...]) -> None:
        self.parts = parts

    def __bool__(self) -> bool:
        return any(self.parts)

    @property
    def skipped(self) -> dict[int, str]:
        return self.parts[0].skipped  # type: ignore[no-any-return]

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts)

    def ends_forwards(self) -> bool:
        return any(part.ends_forwards() for part in self.parts)


class Transaction:
    """``members[0]``, the backend that holds our rules, and the participants after it."""

    def __init__(self, members: Sequence[Backend[Any, Any]]) -> None:
        self.members = tuple(members)

    def _each(self, parts: Rulesets | Changes) -> Iterable[tuple[Backend[Any, Any], Any]]:
        """Each participant with its part of ``parts``."""
        return zip(self.members, parts.parts, strict=True)

    @property
    def name(self) -> str:
        return self.members[0].name

    @property
    def prefix(self) -> Sequence[str]:
        return self.members[0].prefix

    def read(self, families: Iterable[int] = ()) -> Rulesets:
        wanted = tuple(families)
        return Rulesets(tuple(m.read(wanted) for m in self.members))

    def write(self, change: Changes) -> None:
        """Each participant's part in order; ApplyError from the first that fails (those
        before it stay written: ``revert``)."""
        wrote = False
        for member, part in self._each(change):
            if part:
                try:
                    member.write(part)
                except Stale as exc:
                    if wrote:  # those before it are in: not stale, to be reverted
                        raise ApplyError(str(exc)) from None
                    raise
                wrote = True

    def change(self, ruleset: Rulesets, intents: Owners,
               drop: Callable[[Tag], bool] | None = None) -> Changes:
        return Changes(tuple(m.change(r, intents, drop)
                             for m, r in self._each(ruleset)))

    def revert(self, now: Rulesets, before: Rulesets) -> Changes:
        return Changes(tuple(m.revert(n, b) for m, n, b in
                             zip(self.members, now.parts, before.parts, strict=True)))

    def clear(self, ruleset: Rulesets) -> Changes:
        return Changes(tuple(m.clear(r) for m, r in self._each(ruleset)))

    def render(self, intents: Owners) -> str:
        return "".join(m.render(intents) for m in self.members)

    def present(self, ruleset: Rulesets, intents: Iterable[Intent]) -> bool:
        wanted = tuple(intents)
        return all(m.present(r, wanted) for m, r in self._each(ruleset))

    def claims(self, ruleset: Rulesets, near: Iterable[HostPort] | None = None,
               mine: str | None = None) -> dict[str, list[Claim]]:
        near = None if near is None else tuple(near)
        out: dict[str, list[Claim]] = {}
        for member, part in self._each(ruleset):
            for owner, claims in member.claims(part, near, mine).items():
                out.setdefault(owner, []).extend(claims)
        return out

    def end_flows(self, change: Changes, log: Log) -> None:
        for member, part in self._each(change):
            if part.ends_forwards():
                member.end_flows(part, log)

    def owners(self, ruleset: Rulesets) -> set[str]:
        return {o for m, r in self._each(ruleset) for o in m.owners(r)}

    def has_rules(self, ruleset: Rulesets) -> bool:
        return any(m.has_rules(r) for m, r in self._each(ruleset))

    def entry_problems(self, ruleset: Rulesets) -> list[str]:
        return [p for m, r in self._each(ruleset) for p in m.entry_problems(r)]

    def libvirt_backend(self, ruleset: Rulesets) -> str | None:
        """What the participants see first (libvirt's nftables table, where it is, wins
        over chains of its iptables backend left behind), then our rules' backend."""
        pairs = list(self._each(ruleset))
        for member, part in pairs[1:] + pairs[:1]:
            seen = member.libvirt_backend(part)
            if seen is not None:
                return seen
        return None

    def libvirt_missing(self, ruleset: Rulesets) -> list[str]:
        return [p for m, r in self._each(ruleset) for p in m.libvirt_missing(r)]


if TYPE_CHECKING:  # the compiler checks that this is a backend
    _IS_A_BACKEND: Backend[Rulesets, Changes] = Transaction(())
