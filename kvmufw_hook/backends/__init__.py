"""Firewall backends, by name. A backend turns the planner's intents into its own rules,
reads the kernel's ruleset back and applies a change with one write per address family,
behind the one interface of ``base.Backend``. Nothing outside this package imports a
backend's module: callers ask ``get(name)`` (or ``default_backend()``).

Adding a backend is one module and one line in ``REGISTRY``; the contract suite
(``tests/test_backend_contract.py``) then runs against it too.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # the hooks' start-up path imports this package: no typing at run time
    from collections.abc import Iterable
    from typing import Any

    from .base import Backend

# name -> (module under backends/, class): imported only when chosen
REGISTRY: dict[str, tuple[str, str]] = {
    "iptables": ("iptables", "IptablesBackend"),
}
DEFAULT = "iptables"


class LibvirtFirewall:
    """Which firewall backend libvirt uses (``"nftables"`` or ``"iptables"``), how we know
    (``reason``), and whether its nftables table (where our accepts go) is in the kernel
    (``table``). A plain class: a guest's start may build one."""

    __slots__ = ("backend", "reason", "table")

    def __init__(self, backend: str, reason: str, table: bool) -> None:
        self.backend, self.reason, self.table = backend, reason, table

    def __repr__(self) -> str:
        return f"LibvirtFirewall({self.backend!r}, {self.reason!r}, {self.table!r})"


def names() -> tuple[str, ...]:
    """Every registered backend's name."""
    return tuple(REGISTRY)


def backend_only(name: str = DEFAULT, prefix: Iterable[str] = ()) -> Backend[Any, Any]:
    """The backend registered as ``name`` alone, without participants (the contract
    suite); ``prefix`` runs its tools elsewhere (e.g. ``ip netns exec NS``). KeyError for
    a name nobody registered."""
    module_name, class_name = REGISTRY[name]
    module = __import__(f"{__name__}.{module_name}", fromlist=[class_name])
    backend: Backend[Any, Any] = getattr(module, class_name)(prefix)
    return backend


def get(name: str = DEFAULT, prefix: Iterable[str] = ()) -> Backend[Any, Any]:
    """The backend registered as ``name`` in one transaction with the participants every
    forward needs (our accepts in libvirt's nftables table, where it is): what every
    operation uses. KeyError for a name nobody registered."""
    return with_participants(backend_only(name, prefix))


def with_participants(backend: Backend[Any, Any]) -> Backend[Any, Any]:
    """``backend`` in one transaction with our accepts in libvirt's nftables table."""
    from .accepts import LibvirtAccepts
    from .transaction import Transaction
    return Transaction((backend, LibvirtAccepts(backend.prefix)))


def default_backend() -> Backend[Any, Any]:
    """The backend for this host: iptables, whichever variant the host selects."""
    return get(DEFAULT)


def libvirt_firewall(backend: Backend[Any, Any], ruleset: Any | None) -> LibvirtFirewall:
    """Which firewall backend libvirt really uses and why (``status``, ``doctor``): what
    ``ruleset`` (read by ``backend``) shows first, else libvirt's configuration and build."""
    from .libvirt_nft import LibvirtNft
    from .libvirt_nft import libvirt_firewall as detect
    seen = backend.libvirt_backend(ruleset) if ruleset is not None else None
    return detect(seen, LibvirtNft(backend.prefix))
