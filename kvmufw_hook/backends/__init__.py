"""Firewall backends. A backend reads the kernel's ruleset back and writes a change in
one process per address family. The iptables backend (``iptables.py``) is the one UFW
uses; it also renders the planner's rules, since rendering is backend-specific.
"""

from __future__ import annotations

from typing import Protocol


class Backend(Protocol):
    family: int

    def read(self): ...  # a Snapshot of the kernel's ruleset

    def write(self, payload: str) -> None: ...


def default_backend() -> Backend:
    from .iptables import IptablesBackend
    return IptablesBackend()
