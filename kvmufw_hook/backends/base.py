"""The interface every firewall backend implements. Nothing above ``backends/`` knows a
backend's vocabulary (chains, tables, tag syntax, tools): it plans ``plan.Rule`` objects,
each of one address family, and hands them here.

A change is one read (``read``) and at most one write (``write``) per address family,
whatever the number of rules; ``revert`` puts every family back if any write fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from ..model import ForwardSpec
from ..names import Tag
from ..plan import Rule


class Ruleset(Protocol):
    """What ``read`` returned: the kernel's ruleset, per family read."""

    unavailable: dict[int, str]  # family -> why it could not be read (no IPv6 here)


class Change(Protocol):
    """What ``change``, ``revert`` and ``clear`` return; false when nothing changes."""

    skipped: dict[int, str]  # family -> why its rules were left out

    def __bool__(self) -> bool: ...

    @property
    def text(self) -> str:
        """The change as shown to people (dry runs, ``plan``, logs)."""

    def ends_forwards(self) -> bool:
        """Whether it may remove forwards (their conntrack flows are then ended)."""


class Backend(Protocol):
    def read(self, families: Iterable[int] = ()) -> Ruleset:
        """The kernel's ruleset: each family in ``families``, and every family where
        rules of ours may be."""

    def write(self, change: Change) -> None:
        """Write every family's part of ``change``; ApplyError if the kernel refuses one
        (those written before it stay: ``revert``)."""

    def change(self, ruleset: Ruleset, rules: Mapping[str, Sequence[Rule]],
               drop: Callable[[Tag], bool] | None = None) -> Change:
        """What replaces the named owners' rules (an empty sequence removes the owner)
        and drops the tagged rules of others that ``drop`` accepts."""

    def revert(self, now: Ruleset, before: Ruleset) -> Change:
        """What puts our rules back as they were in ``before``, in every family."""

    def clear(self, ruleset: Ruleset) -> Change:
        """What removes all our rules, chains and jumps."""

    def render(self, rules: Mapping[str, Sequence[Rule]]) -> str:
        """The rules as written to a host with none of ours (``plan``)."""

    def present(self, ruleset: Ruleset, rules: Iterable[Rule]) -> bool:
        """Whether every one of ``rules`` is in the ruleset."""

    def claims(self, ruleset: Ruleset, near: Iterable[ForwardSpec] | None = None,
               mine: str | None = None) -> dict[str, list[ForwardSpec]]:
        """owner -> the host ports its rules in the kernel hold (each claim carries its
        family: a guest address of that family). ``near``: only claims that could
        overlap these (and all of ``mine``'s); every owner is a key all the same."""

    def end_flows(self, change: Change, log: Callable[[str], None]) -> None:
        """End the conntrack flows of the forwards ``change`` (just written) took out; a
        failure is logged, never raised (the rules are gone already)."""

    def owners(self, ruleset: Ruleset) -> set[str]:
        """Every owner with a rule in the kernel."""

    def has_rules(self, ruleset: Ruleset) -> bool:
        """Whether any rule of ours is in the kernel."""

    def bad_jumps(self, ruleset: Ruleset) -> list[str]:
        """Where the way into our rules is missing, repeated or not first."""

    def libvirt_chains(self, ruleset: Ruleset) -> set[str]:
        """libvirt's own chains in this firewall (how libvirt's backend is detected)."""
