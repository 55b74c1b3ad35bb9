"""Firewall backends, by name. A backend turns the planner's intents into its own rules,
reads the kernel's ruleset back and applies a change with one write per address family,
behind the one interface of ``base.Backend``. Nothing outside this package imports a
backend's module: callers ask ``default_backend()`` (the one root's configuration names,
``selected``) or ``get(name)``.

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
    "nftables": ("nft", "NftBackend"),
}
# backends that pass libvirt's nftables rejects with their own glue: no accept per forward
OWN_GLUE = frozenset({"nftables"})
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
    if backend.name in OWN_GLUE:
        return backend
    from .accepts import LibvirtAccepts
    from .transaction import Transaction
    return Transaction((backend, LibvirtAccepts(backend.prefix)))


def selected(prefix: Iterable[str] = ()) -> Backend[Any, Any]:
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


def default_backend() -> Backend[Any, Any]:
    """The backend for this host: the one root's configuration selects."""
    return selected()


# Where each backend's rules show, as one netlink request to nf_tables can tell: a table
# (family, table, "") or a chain in one (family, table, chain). How a hook notices that
# firewall_backend was switched (``switched``); the names are iptables.JUMPS' and
# nft.TABLE (a unit test holds them equal), not imported: a hook loads one backend only.
TRACES: dict[str, tuple[tuple[int, str, str], ...]] = {
    "iptables": ((2, "filter", "KVMUFW-FORWARD"), (2, "nat", "KVMUFW-PREROUTING")),
    "nftables": ((1, "kvmufw", ""),),  # NFPROTO_INET
}


def switched() -> bool:
    """Whether a backend other than the selected one holds rules of ours in this
    namespace: ``firewall_backend`` was switched and nothing has run ``replay`` since.
    One netlink request per trace, no process. (Legacy iptables cannot be asked so: a
    switch away from it is completed by ``replay`` or ``restore``.)"""
    from .. import config
    from .nftprobe import chain_in_kernel, table_in_kernel
    name = config.load().firewall_backend
    return any(chain_in_kernel(family, table, chain) if chain else
               table_in_kernel(family, table)
               for other, traces in TRACES.items() if other != name
               for family, table, chain in traces)


# Everything each backend may hold, as netlink requests can tell (``proved_empty``):
# every chain of the iptables backend in both families (iptables.JUMPS', held equal by a
# unit test), and libvirt's nftables tables, where its accepts go; our table.
_IPTABLES_CHAINS = (("filter", "INPUT"), ("filter", "FORWARD"), ("nat", "PREROUTING"),
                    ("nat", "OUTPUT"), ("nat", "POSTROUTING"))
HOLDINGS: dict[str, tuple[tuple[int, str, str], ...]] = {
    "iptables": (*((family, table, f"KVMUFW-{chain}") for family in (2, 10)
                   for table, chain in _IPTABLES_CHAINS),
                 (2, "libvirt_network", ""), (10, "libvirt_network", "")),
    "nftables": TRACES["nftables"],
}


def proved_empty(name: str, prefix: Iterable[str] = ()) -> bool:
    """Whether netlink requests prove that backend ``name`` holds nothing of ours in
    this namespace (none of its ``HOLDINGS`` there), so that nobody needs to read it with
    a process (``replay`` and ``flush`` clear the backends not selected). False where
    they cannot tell: elsewhere (``prefix``), legacy iptables, nf_tables not answering."""
    from .nftprobe import chain_in_kernel, generation, table_in_kernel
    if tuple(prefix) or name not in HOLDINGS or generation() is None:
        return False
    if name == "iptables":
        from .iptables import nft_based
        if not (nft_based(4) and nft_based(6)):
            return False  # legacy: not in nf_tables
    return not any(chain_in_kernel(family, table, chain) if chain else
                   table_in_kernel(family, table) for family, table, chain in HOLDINGS[name])


def others(backend: Backend[Any, Any]) -> list[tuple[str, Backend[Any, Any]]]:
    """(name, backend) of every registered backend but ``backend``'s, running where it
    runs (its ``prefix``): where rules of ours may be left from before a switch of
    ``firewall_backend``. None for a backend the registry does not hold (a test's
    stand-in): nothing else of ours is its business."""
    if backend.name not in REGISTRY:
        return []
    return [(name, get(name, backend.prefix)) for name in REGISTRY if name != backend.name]


def libvirt_firewall(backend: Backend[Any, Any], ruleset: Any | None) -> LibvirtFirewall:
    """Which firewall backend libvirt really uses and why (``status``, ``doctor``): what
    ``ruleset`` (read by ``backend``) shows first, else libvirt's configuration and build."""
    from .libvirt_nft import LibvirtNft
    from .libvirt_nft import libvirt_firewall as detect
    seen = backend.libvirt_backend(ruleset) if ruleset is not None else None
    return detect(seen, LibvirtNft(backend.prefix))
