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


def names() -> tuple[str, ...]:
    """Every registered backend's name."""
    return tuple(REGISTRY)


def get(name: str = DEFAULT, prefix: Iterable[str] = ()) -> Backend[Any, Any]:
    """The backend registered as ``name``; ``prefix`` runs its tools elsewhere (e.g.
    ``ip netns exec NS``). KeyError for a name nobody registered."""
    module_name, class_name = REGISTRY[name]
    module = __import__(f"{__name__}.{module_name}", fromlist=[class_name])
    backend: Backend[Any, Any] = getattr(module, class_name)(prefix)
    return backend


def default_backend() -> Backend[Any, Any]:
    """The backend for this host: iptables, whichever variant the host selects."""
    return get(DEFAULT)
