"""Our accepts inside libvirt's nftables table, as a participant of every change
(``transaction.py``): where libvirt uses its nftables backend, each forward needs an
accept in libvirt's ``guest_input``/``guest_output`` ahead of its reject
(``libvirt_nft.py`` holds the rendering, parsing and detection).

A guest's stop imports this module: it imports nothing until libvirt's table is in the
kernel (one netlink request per family says so), so a host whose libvirt uses iptables
pays two netlink requests and no process.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from ..intents import Claim, Intent
    from ..names import Tag
    from .base import HostPort, Log, Owners
    from .libvirt_nft import NftSnapshot

NFT_FAMILIES = ("ip", "ip6")  # libvirt's tables: IPv4's and IPv6's


class Tables:
    """libvirt's tables that are in the kernel, as read (nft family -> snapshot)."""

    __slots__ = ("tables",)

    def __init__(self, tables: dict[str, NftSnapshot]) -> None:
        self.tables = tables

    @property
    def unavailable(self) -> dict[int, str]:
        return {}

    @property
    def families(self) -> set[int]:
        return {4, 6}  # a family without libvirt's table has no reject to pass


class Script:
    """One ``nft -f`` script over libvirt's tables (one transaction); false when empty."""

    __slots__ = ("script",)

    def __init__(self, script: str) -> None:
        self.script = script

    def __bool__(self) -> bool:
        return bool(self.script)

    @property
    def skipped(self) -> dict[int, str]:
        return {}

    @property
    def text(self) -> str:
        if not self.script:
            return ""
        from .libvirt_nft import NFT_SECTION
        return NFT_SECTION + self.script

    def ends_forwards(self) -> bool:
        return False  # the DNAT that made the flows is the other participant's


class LibvirtAccepts:
    """The accepts of our forwards in libvirt's nftables tables (``ip`` and ``ip6
    libvirt_network``), wherever those tables are; nothing where they are not."""

    name = "libvirt-nft"

    def __init__(self, prefix: Iterable[str] = ()) -> None:
        self.prefix = list(prefix)

    def _present(self) -> list[str]:
        """The nft families whose libvirt table is in the kernel: by netlink here, with
        ``nft`` where ``prefix`` runs commands elsewhere."""
        if not self.prefix:
            from .nftprobe import IPV4, IPV6, table_in_kernel
            probe = {"ip": IPV4, "ip6": IPV6}
            return [f for f in NFT_FAMILIES if table_in_kernel(probe[f])]
        from .libvirt_nft import LibvirtNft
        return [f for f in NFT_FAMILIES if LibvirtNft(self.prefix, f).table_present()]

    def read(self, families: Iterable[int] = ()) -> Tables:
        present = self._present()
        if not present:
            return Tables({})
        from .libvirt_nft import LibvirtNft
        return Tables({f: LibvirtNft(self.prefix, f).read() for f in present})

    def write(self, change: Script) -> None:
        if change:
            from .libvirt_nft import LibvirtNft
            LibvirtNft(self.prefix).write(change.script)

    @staticmethod
    def change(ruleset: Tables, intents: Owners,
               drop: Callable[[Tag], bool] | None = None) -> Script:
        if not ruleset.tables:
            return Script("")
        from .libvirt_nft import LibvirtNft
        return Script("".join(LibvirtNft.change(snap, intents, drop)
                              for snap in ruleset.tables.values()))

    @staticmethod
    def revert(now: Tables, before: Tables) -> Script:
        if not now.tables:
            return Script("")
        from .libvirt_nft import held, transition
        return Script("".join(transition(snap, held(before.tables.get(family)))
                              for family, snap in now.tables.items()))

    @staticmethod
    def clear(ruleset: Tables) -> Script:
        if not ruleset.tables:
            return Script("")
        from .libvirt_nft import transition
        return Script("".join(transition(snap, {}) for snap in ruleset.tables.values()))

    @staticmethod
    def render(intents: Owners) -> str:
        return ""  # a host with none of ours: libvirt's table is libvirt's, not planned here

    @staticmethod
    def present(ruleset: Tables, intents: Iterable[Intent]) -> bool:
        if not ruleset.tables:
            return True
        from .libvirt_nft import tables_present
        return tables_present(ruleset.tables, intents)

    @staticmethod
    def claims(ruleset: Tables, near: Iterable[HostPort] | None = None,
               mine: str | None = None) -> dict[str, list[Claim]]:
        """No host port: an accept lets a translated connection in, it takes none."""
        return {owner: [] for owner in LibvirtAccepts.owners(ruleset)}

    def end_flows(self, change: Script, log: Log) -> None:
        pass

    @staticmethod
    def owners(ruleset: Tables) -> set[str]:
        if not ruleset.tables:
            return set()
        from .libvirt_nft import CHAINS
        return {rule.tag.owner for snap in ruleset.tables.values() for chain in CHAINS
                for rule, _ahead in snap.ours(chain) if rule.tag is not None}

    @staticmethod
    def has_rules(ruleset: Tables) -> bool:
        return bool(LibvirtAccepts.owners(ruleset))

    @staticmethod
    def entry_problems(ruleset: Tables) -> list[str]:
        """Each chain of libvirt's where accepts of ours sit behind a rule of libvirt's
        (its reject then comes first)."""
        if not ruleset.tables:
            return []
        from .libvirt_nft import CHAINS
        from .nftprobe import TABLE
        return [f"{chain} ({family} {TABLE})" for family, snap in sorted(ruleset.tables.items())
                for chain in CHAINS if any(not ahead for _r, ahead in snap.ours(chain))]

    @staticmethod
    def libvirt_backend(ruleset: Tables) -> str | None:
        return "nftables" if ruleset.tables else None

    @staticmethod
    def libvirt_missing(ruleset: Tables) -> list[str]:
        return []

    def accepts(self, ruleset: Tables) -> Sequence[NftSnapshot]:
        """The tables as read (``doctor`` counts our accepts in them)."""
        return tuple(ruleset.tables.values())


if TYPE_CHECKING:  # the compiler checks that this is a backend
    from .base import Backend
    _IS_A_BACKEND: Backend[Tables, Script] = LibvirtAccepts()
