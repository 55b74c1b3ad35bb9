"""Applying a change: one read and one write of the firewall, put back if the write fails.

A guest's stop runs through here on libvirt's critical path, so this module imports no
parser, planner or dataclasses: removing a guest's rules needs its name, not its XML.
``backend`` arguments are a ``backends.base.Backend``; None means the host's own.
"""

from __future__ import annotations

from . import state
from .backends import default_backend
from .errors import ApplyError, shown
from .names import domain_owner

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing and collections cost milliseconds to import
    from collections.abc import Callable, Mapping, Sequence

    from .plan import Rule


def _quiet(_msg: str) -> None:
    pass


class Applied:
    """What a change wrote: ``payload`` is empty when nothing changed."""

    __slots__ = ("payload",)

    def __init__(self, payload: str):
        self.payload = payload

    def __repr__(self) -> str:
        return f"Applied({self.payload!r})"


def apply_rules(rules: Mapping[str, Sequence[Rule]], drop=None, backend=None,
                log: Callable[[str], None] = _quiet, before=None) -> Applied:
    """Replace the named owners' rules (and drop matching others) in one write;
    ``before``: the snapshot already read under the lock, if any.

    If the kernel refuses the write, our chains are put back as they were and
    ApplyError is raised: a change is applied whole or not at all.
    """
    backend = backend or default_backend()
    if before is None:
        before = backend.read()
    payload = backend.change(before, rules, drop)
    if not payload:
        return Applied("")
    try:
        backend.write(payload)
    except ApplyError:
        try:
            backend.write(backend.revert(backend.read(), before))
        except ApplyError as exc:
            log(f"rollback failed too: {exc}")
        raise
    return Applied(payload)


def domain_stopped(name: str, backend=None, log: Callable[[str], None] = _quiet) -> Applied:
    """Remove the guest's forwards (qemu stopped, release): found by their owner tag."""
    with state.locked():
        applied = apply_rules({domain_owner(name): ()}, backend=backend, log=log)
        state.forget_domain(name)  # after the rules: a failed removal keeps the state
    if applied.payload:
        log(f"domain {shown(name)}: forwards removed")
    return applied
