"""Firewall backends, by name. A backend renders the planner's rules in its own terms,
reads the kernel's ruleset back and applies a change with one write per address family,
behind ``base.Backend``. Callers ask ``selected()`` (the one root's configuration names)
or ``get(name)``; nothing else picks a backend.

Adding a backend is one module and one line in ``REGISTRY``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # the hooks' start-up path imports this package: no typing at run time
    from collections.abc import Iterable
    from typing import Any

# name (as root's configuration spells it) -> (module under backends/, class): imported
# only when chosen
REGISTRY: dict[str, tuple[str, str]] = {
    "iptables": ("iptables", "IptablesBackend"),
    "nftables": ("nft", "NftBackend"),
}
DEFAULT = "iptables"


def names() -> tuple[str, ...]:
    """Every registered backend's name."""
    return tuple(REGISTRY)


def get(name: str = DEFAULT, prefix: Iterable[str] = ()) -> Any:
    """The backend registered as ``name``; ``prefix`` runs its tools elsewhere (e.g.
    ``ip netns exec NS``). KeyError for a name nobody registered."""
    return _class(name)(prefix)


def _class(name: str) -> type:
    module_name, class_name = REGISTRY[name]
    module = __import__(f"{__name__}.{module_name}", fromlist=[class_name])
    cls: type = getattr(module, class_name)
    return cls


def others(backend: Any) -> list[tuple[str, Any]]:
    """(name, backend) of every registered backend but ``backend``'s, running where it
    runs (its ``prefix``): where rules of ours may be left from before a switch of
    ``firewall_backend``. None for a backend the registry does not hold (a test's
    stand-in): nothing else of ours is its business."""
    names_of = {name: _class(name) for name in REGISTRY}
    if type(backend) not in names_of.values():
        return []
    prefix = getattr(backend, "prefix", ())
    return [(name, cls(prefix)) for name, cls in names_of.items()
            if cls is not type(backend)]


def selected(prefix: Iterable[str] = ()) -> Any:
    """The backend ``firewall_backend`` names in root's configuration (iptables when the
    file or the key is missing); ConfigError, one line naming the file, when the file is
    wrong or names a backend this build lacks."""
    from .. import config
    from ..errors import ConfigError
    from ..names import config_path
    name = config.load().firewall_backend
    if name not in REGISTRY:
        raise ConfigError(f'{config_path()}: firewall_backend "{name}" has no backend in '
                          "this build of kvmufw_hook")
    return get(name, prefix)


def default_backend() -> Any:
    """The backend for this host: the one root's configuration selects."""
    return selected()
