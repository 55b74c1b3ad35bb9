"""The one place that knows our names: chains, jumps, owner tags and paths.

Every rule we write carries an owner tag in its comment, e.g.
``kvmufw:n=lab,b=virbr1,s=10.0.0.0/24`` (network ``lab``) or
``kvmufw:d=web1,b=virbr1,s=10.0.0.0/24`` (domain ``web1``, NIC on virbr1).
The tag is what makes removal exact: we only ever touch rules inside our own
``KVMUFW-*`` chains, and inside them only the rules of the owner being changed.
"""

from __future__ import annotations

import os

PREFIX = "KVMUFW-"
TAG_PREFIX = "kvmufw:"
NAMESPACE = "urn:kvmufw:1"

# (table, built-in chain, our chain). Each built-in chain gets exactly one jump
# to our chain, at position 1, ahead of libvirt's and UFW's own jumps.
JUMPS: tuple[tuple[str, str, str], ...] = (
    ("filter", "INPUT", "KVMUFW-INPUT"),
    ("filter", "FORWARD", "KVMUFW-FORWARD"),
    ("nat", "PREROUTING", "KVMUFW-PREROUTING"),
    ("nat", "OUTPUT", "KVMUFW-OUTPUT"),
    ("nat", "POSTROUTING", "KVMUFW-POSTROUTING"),
)
TABLES: tuple[str, ...] = ("filter", "nat")


def our_chains(table: str) -> tuple[str, ...]:
    return tuple(ours for t, _, ours in JUMPS if t == table)


_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def safe_name(name: str) -> str:
    """A token for ``name`` that survives iptables comments unquoted and unescaped.

    Plain names stay readable; anything else (spaces, quotes, unicode, very long
    names) becomes a readable stem plus a hash, stable across runs.
    """
    if 0 < len(name) <= 64 and _SAFE.issuperset(name):
        return name
    import hashlib  # only for unusual names: keeps it off the hooks' start-up path
    stem = "".join(c if c in _SAFE else "_" for c in name[:24])
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{stem}~{digest}"


def owner_key(kind: str, name: str) -> str:
    """``n=NAME`` for a network, ``d=NAME`` for a domain."""
    assert kind in ("n", "d"), kind
    return f"{kind}={safe_name(name)}"


def network_owner(name: str) -> str:
    return owner_key("n", name)


def domain_owner(name: str) -> str:
    return owner_key("d", name)


def tag(owner: str, bridge: str, subnet: str) -> str:
    return f"{TAG_PREFIX}{owner},b={bridge},s={subnet}"


def parse_tag(comment: str) -> dict[str, str] | None:
    """``{'owner': 'n=lab', 'b': 'virbr1', 's': '10.0.0.0/24'}`` or None if not ours."""
    if not comment.startswith(TAG_PREFIX):
        return None
    fields = comment[len(TAG_PREFIX):].split(",")
    if not fields or "=" not in fields[0]:
        return None
    out = {"owner": fields[0]}
    for field in fields[1:]:
        key, _, value = field.partition("=")
        out[key] = value
    return out


# Paths. Environment overrides exist for tests and labs; libvirt clears the
# environment of hooks, so in production the defaults always apply.
def state_dir() -> str:
    return os.environ.get("KVMUFW_STATE_DIR", "/run/kvmufw_hook")


def libvirt_network_dir() -> str:
    return os.environ.get("KVMUFW_LIBVIRT_NETWORK_DIR", "/run/libvirt/network")
