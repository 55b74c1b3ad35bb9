"""The interface every firewall backend implements."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from ..model import ForwardSpec
from ..plan import Rule


class Backend(Protocol):
    family: int

    def read(self): ...  # a snapshot of the kernel's ruleset

    def write(self, payload: str) -> None: ...

    def change(self, snapshot, rules: Mapping[str, Sequence[Rule]],
               drop: Callable[[dict[str, str]], bool] | None = None) -> str:
        """The payload that replaces the named owners' rules (and drops matching
        tagged rules of others); empty when nothing would change."""

    def revert(self, now, before) -> str:
        """The payload that puts our rules back as they were in ``before``."""

    def clear(self, snapshot) -> str:
        """The payload that removes all our rules, chains and jumps."""

    def present(self, snapshot, rules: Iterable[Rule]) -> bool:
        """Whether every one of ``rules`` is in the snapshot."""

    def claims(self, snapshot) -> dict[str, list[ForwardSpec]]:
        """owner -> the host ports its rules in the kernel hold."""

    def bad_jumps(self, snapshot) -> list[str]:
        """The built-in chains whose jump to ours is missing, repeated or not first."""
