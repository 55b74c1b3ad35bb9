"""Our names: the metadata namespace, owners and their tags, paths.

Every rule we write carries an owner tag (``Tag``): the owner (``n=lab`` for network
``lab``, ``d=web1`` for domain ``web1``), the bridge and the subnet the rule serves. How
a tag is written into a rule is each backend's business (``backends/tags.py``); chains,
tables and jumps are the backend's vocabulary too (``backends/iptables.py``).
"""

from __future__ import annotations

NAMESPACE = "urn:kvmufw:1"


_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
MAX_ENCODED = 64
_STEM = 24


def _escaped(ch: str) -> str:
    if ch in _SAFE:
        return ch
    # surrogatepass: every str has exactly one byte form, lone surrogates included
    return "".join(f"~{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))


def safe_name(name: str) -> str:
    """A token for ``name`` that survives iptables comments and file names unquoted:
    different names always give different tokens (libvirt tells ``web1``, ``web1 `` and
    ``web1\u00a0`` apart, so must we: the token is the owner tag and the state file name).

    Why it is injective: every character outside ``[A-Za-z0-9._-]`` becomes ``~`` and the
    two hex digits of each of its UTF-8 bytes (``~`` itself included), so the token decodes
    back to the one name it came from: a name that looks like a token (``web1~20``) is
    encoded again (``web1~7e20``). A token longer than MAX_ENCODED characters is replaced
    by a readable stem, ``~~`` (which an encoding never contains: ``~`` is always followed
    by hex) and the first 128 bits of the name's SHA-256: two long names share a token
    only if they share those (no one finds such a pair). 128 bits, not 256, so that the
    longest owner tag fits the 128 bytes nft keeps of a rule's comment.
    """
    if 0 < len(name) <= MAX_ENCODED and _SAFE.issuperset(name):
        return name  # every character its own token: most names, asked per rule
    parts = [_escaped(ch) for ch in name]
    encoded = "".join(parts)
    if 0 < len(encoded) <= MAX_ENCODED:
        return encoded
    import hashlib  # only for long names: keeps it off the hooks' start-up path
    stem = ""
    for part in parts:
        if len(stem) + len(part) > _STEM:
            break
        stem += part
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{stem}~~{digest}"


def unsafe_name(token: str) -> str | None:
    """The name of a token that is not a hash; None for a hashed one (the inverse of
    ``safe_name``, kept to prove and document that it is one)."""
    if "~~" in token:
        return None
    out, i = bytearray(), 0
    while i < len(token):
        if token[i] == "~":
            out.append(int(token[i + 1:i + 3], 16))
            i += 3
        else:
            out += token[i].encode()
            i += 1
    return out.decode("utf-8", "surrogatepass")


def owner_key(kind: str, name: str) -> str:
    """``n=NAME`` for a network, ``d=NAME`` for a domain."""
    assert kind in ("n", "d"), kind
    return f"{kind}={safe_name(name)}"


def network_owner(name: str) -> str:
    return owner_key("n", name)


def domain_owner(name: str) -> str:
    return owner_key("d", name)


class Tag:
    """Who a rule belongs to and what it serves: ``owner`` (``n=NAME`` or ``d=NAME``,
    names encoded by ``safe_name``), ``bridge`` and ``subnet`` (as text). A plain class:
    a dataclass costs a guest's stop a millisecond to create."""

    __slots__ = ("bridge", "owner", "subnet")

    def __init__(self, owner: str, bridge: str, subnet: str) -> None:
        self.owner = owner
        self.bridge = bridge
        self.subnet = subnet

    def _key(self) -> tuple[str, str, str]:
        return (self.owner, self.bridge, self.subnet)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Tag({self.owner!r}, {self.bridge!r}, {self.subnet!r})"


# Paths. Environment overrides exist for tests and labs; libvirt clears the
# environment of hooks, so in production the defaults always apply.
def state_dir() -> str:
    import os  # here: a start without our metadata needs the namespace, not os
    # empty is unset, as in qemu's hook (${KVMUFW_STATE_DIR:-...}): both look in one place
    return os.environ.get("KVMUFW_STATE_DIR") or "/run/kvmufw_hook"


def libvirt_network_dir() -> str:
    import os
    return os.environ.get("KVMUFW_LIBVIRT_NETWORK_DIR", "/run/libvirt/network")


def config_path() -> str:
    """Root's configuration file (``config.py``)."""
    import os
    return os.environ.get("KVMUFW_CONFIG", "/etc/kvmufw_hook/kvmufw_hook.conf")


def login_defs_path() -> str:
    """Where the host says which uids are people's (UID_MIN, UID_MAX)."""
    import os
    return os.environ.get("KVMUFW_LOGIN_DEFS", "/etc/login.defs")


def dnsmasq_dir() -> str:
    """libvirt's dnsmasq files: ``BRIDGE.status`` holds each network's leases."""
    import os
    return os.environ.get("KVMUFW_DNSMASQ_DIR", "/var/lib/libvirt/dnsmasq")
