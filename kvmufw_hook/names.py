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
