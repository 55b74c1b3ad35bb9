"""The interface every firewall backend implements, and the only one callers see.

Nothing above ``backends/`` knows a backend's vocabulary (chains, tables, maps, tag
syntax, tools): it plans intents (``intents.py``), each of one address family, and hands
them to a ``Backend`` chosen by name from the registry (``backends/__init__.py``).

A backend's ruleset and change are its own types, opaque to callers (the interface is
generic in them): a caller only passes back what the same backend gave it.

Promises every backend keeps (``tests/test_backend_contract.py`` checks them all):
- A change is one read (``read``) and at most one write (``write``) per address family or
  table of its own, whatever the number of intents; a change that changes nothing writes
  nothing, so applying twice adds nothing.
- Removal is exact: only rules (elements) tagged with the owner being changed go.
- ``revert`` puts every family back if a write fails: a change is whole or not at all.
- ``claims`` reads back which host ports each owner holds; ``owners`` who has rules.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from ..intents import Claim, Intent
from ..model import PortRange
from ..names import Tag

Log = Callable[[str], None]
Owners = Mapping[str, Sequence[Intent]]  # owner -> its intents (empty: remove the owner)


class Ruleset(Protocol):
    """What ``read`` returned: the kernel's ruleset, per family read."""

    @property
    def unavailable(self) -> dict[int, str]:
        """family -> why it could not be read (no IPv6 on this host)."""

    @property
    def families(self) -> Collection[int]:
        """The families read."""


class Change(Protocol):
    """What ``change``, ``revert`` and ``clear`` return; false when nothing changes."""

    @property
    def skipped(self) -> dict[int, str]:
        """family -> why its intents were left out."""

    def __bool__(self) -> bool: ...

    @property
    def text(self) -> str:
        """The change as shown to people (dry runs, ``plan``, logs)."""

    def ends_forwards(self) -> bool:
        """Whether it may remove forwards (their conntrack flows are then ended)."""


class HostPort(Protocol):
    """What a claim is looked up by: a forward (``model.ForwardSpec``) or a claim."""

    @property
    def proto(self) -> str: ...

    @property
    def host_port(self) -> PortRange: ...


R = TypeVar("R", bound=Ruleset)
C = TypeVar("C", bound=Change)


class Backend(Protocol[R, C]):
    """A firewall backend; ``R`` and ``C`` are its ruleset and change types."""

    @property
    def name(self) -> str:
        """Its name in the registry and in root's configuration (``firewall_backend``)."""

    @property
    def prefix(self) -> Sequence[str]:
        """The command prefix its tools run under (e.g. ``ip netns exec NS``): the host's
        facts are read in the same place. Empty on the host itself."""

    def read(self, families: Iterable[int] = ()) -> R:
        """The kernel's ruleset: each family in ``families``, and every family where
        rules of ours may be."""

    def write(self, change: C) -> None:
        """Write every family's part of ``change``; ApplyError if the kernel refuses one
        (those written before it stay: ``revert``)."""

    def change(self, ruleset: R, intents: Owners,
               drop: Callable[[Tag], bool] | None = None) -> C:
        """What replaces the named owners' intents (an empty sequence removes the owner)
        and drops the tagged rules of others that ``drop`` accepts."""

    def revert(self, now: R, before: R) -> C:
        """What puts our rules back as they were in ``before``, in every family."""

    def clear(self, ruleset: R) -> C:
        """What removes all our rules, chains and jumps."""

    def render(self, intents: Owners) -> str:
        """The intents as written to a host with none of ours (``plan``)."""

    def present(self, ruleset: R, intents: Iterable[Intent]) -> bool:
        """Whether everything ``intents`` need is in the ruleset."""

    def claims(self, ruleset: R, near: Iterable[HostPort] | None = None,
               mine: str | None = None) -> dict[str, list[Claim]]:
        """owner -> the host ports its rules in the kernel hold. ``near``: only claims
        that could overlap these (and all of ``mine``'s); every owner is a key all the
        same."""

    def end_flows(self, change: C, log: Log) -> None:
        """End the conntrack flows of the forwards ``change`` (just written) took out; a
        failure is logged, never raised (the rules are gone already)."""

    def owners(self, ruleset: R) -> set[str]:
        """Every owner with a rule in the kernel."""

    def has_rules(self, ruleset: R) -> bool:
        """Whether any rule of ours is in the kernel."""

    def entry_problems(self, ruleset: R) -> list[str]:
        """Where the way into our rules is missing, repeated or not first (one line
        each, for ``doctor`` and ``restore --jumps-only``)."""

    def libvirt_backend(self, ruleset: R) -> str | None:
        """Which firewall backend libvirt's own rules in this ruleset show (e.g.
        ``"iptables"`` where its chains are there), None when they show none."""

    def libvirt_missing(self, ruleset: R) -> list[str]:
        """What of libvirt's own rules (its iptables backend's chains) is not in this
        ruleset: meaningful only where libvirt uses the iptables backend."""


AnyBackend = Backend[Any, Any]  # a backend parameter: whichever backend, its own types
