"""Applying a change: one read and one write of the firewall, put back if the write fails.

A guest's stop runs through here on libvirt's critical path, so this module imports no
parser, planner or dataclasses: removing a guest's rules needs its name, not its XML.
``backend`` arguments are a ``backends.base.Backend``; None means the host's own.
"""

from __future__ import annotations

from . import state
from .backends import default_backend
from .backends.bridgeports import BridgePorts
from .errors import ApplyError, Stale, shown
from .names import domain_owner

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing and collections cost milliseconds to import
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, TypeVar

    from .backends.base import Backend, Ruleset
    from .intents import Intent
    from .names import Tag
    T = TypeVar("T")
    R = TypeVar("R", bound=Ruleset)


def _quiet(_msg: str) -> None:
    pass


# A write the kernel refuses is tried again on a fresh read, as kube-proxy and Calico
# resync: a ``ufw reload`` or another tool between our read and our write makes the
# payload stale (its ``-D`` lines miss, its chains are gone). A refusal for a real reason
# fails the same way each time and is reported after the last attempt. A reload is a
# dozen commands (each table flushed, then its chains deleted, then UFW's own rules):
# attempts are spaced out (BACKOFF, doubling) so that one reload cannot fail them all.
ATTEMPTS = 5
BACKOFF = 0.02


def retrying(nothing: Callable[[], T]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """An operation (its own read, check and write under the lock) run again while its
    write fails (``Stale``), at most ``ATTEMPTS`` times, the last failure raised as
    ApplyError; after ``uninstall`` (``state.Uninstalled``) it applies nothing and
    returns ``nothing()``."""
    def wrap(operation: Callable[..., T]) -> Callable[..., T]:
        def run(*args: Any, **kwargs: Any) -> T:
            for left in range(ATTEMPTS - 1, -1, -1):
                try:
                    return operation(*args, **kwargs)
                except state.Uninstalled:
                    return nothing()
                except Stale as exc:
                    if not left:
                        raise ApplyError(f"{exc} (tried {ATTEMPTS} times)") from None
                    import time  # only on this rare path: the hooks' start-up stays lean
                    time.sleep(BACKOFF * 2 ** (ATTEMPTS - 1 - left))
            raise AssertionError("unreachable")
        run.__doc__, run.__name__ = operation.__doc__, operation.__name__
        run.__wrapped__ = operation  # type: ignore[attr-defined]
        return run
    return wrap


class Applied:
    """What a change wrote: ``payload`` is empty when nothing changed; ``skipped``:
    the families whose rules were left out (family -> why: no IPv6 on this host)."""

    __slots__ = ("payload", "skipped")

    def __init__(self, payload: str, skipped: dict[int, str] | None = None):
        self.payload = payload
        self.skipped = skipped or {}

    def __repr__(self) -> str:
        return f"Applied({self.payload!r})"


def families_of(rules: Mapping[str, Sequence[Intent]]) -> set[int]:
    """The address families ``rules`` write to (the backend reads those, and those where
    rules of ours already are)."""
    return {rule.family for owned in rules.values() for rule in owned}


def covering(backend: Backend[R, Any], before: R, rules: Mapping[str, Sequence[Intent]]) -> R:
    """``before``, or a fresh read when it lacks a family ``rules`` write to (a ruleset
    read before planning holds IPv6 only where rules of ours already were)."""
    wanted = families_of(rules)
    if wanted <= set(before.families) | set(before.unavailable):
        return before
    return backend.read(wanted | set(before.families))


def apply_rules(rules: Mapping[str, Sequence[Intent]],
                drop: Callable[[Tag], bool] | None = None,
                backend: Backend[Any, Any] | None = None,
                log: Callable[[str], None] = _quiet, before: Any = None) -> Applied:
    """Replace the named owners' rules (and drop matching others) in one write per
    family; ``before``: the ruleset already read under the lock, if any (read with the
    families of ``rules``).

    The backend is one transaction across its participants (``backends.transaction``):
    where libvirt uses its nftables backend, the forwards' accepts inside libvirt's table
    follow in one ``nft -f`` after our rules, even when our rules have nothing to change
    (libvirt rebuilt its table: the hooks that run after that put them back). If the
    kernel refuses any write, every participant is put back as it was and ``Stale`` is
    raised (the operation runs again on a fresh read: ``retrying``); a change is applied
    whole or not at all.
    """
    backend = backend or default_backend()
    before = (backend.read(families_of(rules)) if before is None
              else covering(backend, before, rules))
    change = backend.change(before, rules, drop)
    for family, why in sorted(change.skipped.items()):
        log(f"IPv{family} rules left out: {why}")
    if not change:
        return Applied("", change.skipped)
    try:
        backend.write(change)
    except Stale:
        # refused whole, before anything of it was in (nf_tables: ERESTART); except a
        # table created in two steps, whose skeleton (the first) stays: the retry reads
        # it and adds the rest (nft.NftBackend._write_created)
        raise
    except ApplyError as exc:
        try:  # every participant and family back as it was, those written before too
            backend.write(backend.revert(backend.read(before.families), before))
        except ApplyError as rollback:
            log(f"rollback failed too: {rollback}")
        raise Stale(str(exc)) from None
    if change.ends_forwards():
        backend.end_flows(change, log)
    return Applied(change.text, change.skipped)


@retrying(lambda: Applied(""))
def domain_stopped(name: str, backend: Backend[Any, Any] | None = None,
                   log: Callable[[str], None] = _quiet) -> Applied:
    """Remove the guest's forwards (qemu stopped, release): found by their owner tag.
    The guest is gone whatever happens here: if the removal fails, its state goes all
    the same (``restore`` must never bring its forwards back) and a ``stopped`` marker
    makes ``restore`` (or ``release``, or the next start) remove what is left."""
    owner = domain_owner(name)
    with state.locked():
        try:
            applied = apply_rules({owner: ()}, backend=backend, log=log)
        except ApplyError:
            state.mark_stopped(owner)
            state.forget_domain(name)
            raise
        for line in BridgePorts.beside(backend).release(owner):
            log(line)  # most often the tap is gone already: then only its record goes
        state.forget_domain(name)
        state.forget_stopped(owner)
    if applied.payload:
        log(f"domain {shown(name)}: forwards removed")
    return applied
