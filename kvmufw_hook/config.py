"""Root's configuration: ``/etc/kvmufw_hook/kvmufw_hook.conf`` (``names.config_path``).

Written by the admin, never by guests: what guest-writable XML must not be able to grant
lives here. The syntax of libvirt's own ``network.conf``: ``key = "value"``, lists as
``[ "a", "b" ]`` (over several lines if need be), ``#`` comments. A missing file means the
defaults; an unknown key or a malformed value is one line naming the file and the line,
and nothing is changed (the caller refuses the operation).

Keys:
- ``firewall_backend``: ``"iptables"`` (the default: our ``KVMUFW-*`` chains) or
  ``"nftables"`` (our own ``table inet kvmufw`` with maps); ``backends.selected()`` turns
  it into the backend every hook and command uses.
- ``allow_host_service``: entries ``"KIND:NAME:PROTO:PORTS"`` (KIND ``domain`` or
  ``network``, NAME exactly as libvirt has it, PROTO ``tcp`` or ``udp``, PORTS ``N`` or
  ``N-M``): only these forwards may take a host port on which a host service listens.
"""

from __future__ import annotations

import os
import stat

from .errors import ConfigError, shown
from .names import domain_owner, network_owner

BACKENDS = ("iptables", "nftables")
# No regular expressions: a guest's stop reads this file (which backend holds its rules),
# and importing ``re`` would cost that hook more than the rest of its reading.
_DIGITS = frozenset("0123456789")


class Config:
    """What the file says: the backend, and root's consents (owner tag, proto, first
    port, last port). A plain class: a hook builds one per call."""

    __slots__ = ("allow_host_service", "firewall_backend")

    def __init__(self, firewall_backend: str = "iptables",
                 allow_host_service: frozenset[tuple[str, str, int, int]] = frozenset()
                 ) -> None:
        self.firewall_backend = firewall_backend
        self.allow_host_service = allow_host_service

    def consents(self, owner: str, proto: str, port: int) -> bool:
        """Whether root lets ``owner``'s forwards take ``port``/``proto`` of a host service."""
        return any(o == owner and p == proto and first <= port <= last
                   for o, p, first, last in self.allow_host_service)


def load(path: str | None = None) -> Config:
    """The configuration in ``path`` (default: ``names.config_path()``); the defaults
    if it does not exist; ConfigError naming file and line if it is wrong."""
    if path is None:
        from .names import config_path
        path = config_path()
    try:
        with open(path, encoding="utf-8") as fh:
            _check_trusted(path, os.fstat(fh.fileno()), os.stat(os.path.dirname(path) or "."))
            text = fh.read()
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    return parse(text, path)


def _check_trusted(path: str, file: os.stat_result, folder: os.stat_result) -> None:
    """ConfigError unless root (or whoever runs this) owns the file and its directory
    and neither group nor others may write them (as sshd's StrictModes): consent that
    someone else could write is none (a sticky directory such as /tmp is not enough for
    the file's own mode, but may hold it)."""
    me = {0, os.geteuid()}
    if file.st_uid not in me or file.st_mode & 0o022:
        raise ConfigError(f"{path}: not used: owned by uid {file.st_uid} with mode "
                          f"{stat.S_IMODE(file.st_mode):04o}; it must be root's and "
                          "writable by root only")
    if folder.st_uid not in me or (folder.st_mode & 0o022
                                   and not folder.st_mode & stat.S_ISVTX):
        raise ConfigError(f"{path}: not used: its directory is owned by uid "
                          f"{folder.st_uid} with mode {stat.S_IMODE(folder.st_mode):04o};"
                          " it must be root's and writable by root only")


def _values(value: str, where: str) -> list[str]:
    """The strings of ``"a"`` or ``[ "a", "b" ]`` (comments already gone)."""
    value = value.strip()
    if value.startswith("["):
        if not value.endswith("]"):
            raise ConfigError(f"{where}: a list must end with ']'")
        inner = value[1:-1].strip()
        items = [] if not inner else [i.strip() for i in inner.rstrip(",").split(",")]
    else:
        items = [value]
    out = []
    for item in items:
        inner = item[1:-1]
        if len(item) < 2 or item[0] != '"' or item[-1] != '"' or '"' in inner or "\\" in inner:
            raise ConfigError(f"{where}: {shown(item)} is not a quoted string")
        out.append(inner)
    return out


def _key_value(line: str) -> tuple[str, str] | None:
    """``key = value`` -> (key, value); None unless the key is a plain ASCII name."""
    key, sep, value = line.partition("=")
    key = key.strip()
    if not sep or not key.isascii() or not key.isidentifier():
        return None
    return key, value.strip()


def _port_range(text: str) -> tuple[int, int] | None:
    """``N`` or ``N-M`` (1 to 5 digits each) -> (first, last); None otherwise."""
    first, sep, last = text.partition("-")
    parts = (first, last) if sep else (first,)
    if not all(0 < len(p) <= 5 and set(p) <= _DIGITS for p in parts):
        return None
    return int(first), int(last or first)


def _uncommented(line: str) -> str:
    """The line without its ``#`` comment (a ``#`` inside quotes is text)."""
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


def parse(text: str, path: str = "kvmufw_hook.conf") -> Config:
    config = Config()
    consents: set[tuple[str, str, int, int]] = set()
    seen: set[str] = set()
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        start = number + 1
        line = _uncommented(lines[number]).strip()
        number += 1
        if not line:
            continue
        where = f"{path}: line {start}"
        found = _key_value(line)
        if found is None:
            raise ConfigError(f'{where}: not key = "value"')
        key, value = found
        while value.lstrip().startswith("[") and "]" not in value and number < len(lines):
            value += " " + _uncommented(lines[number]).strip()  # a list over lines
            number += 1
        if key in seen:
            raise ConfigError(f"{where}: {key} is set twice")
        seen.add(key)
        if key == "firewall_backend":
            (backend,) = _one(_values(value, where), where, key)
            if backend not in BACKENDS:
                raise ConfigError(f"{where}: firewall_backend {shown(backend)} is not one of "
                                 + ", ".join(f'"{b}"' for b in BACKENDS))
            config.firewall_backend = backend
        elif key == "allow_host_service":
            consents.update(_consent(entry, where) for entry in _values(value, where))
        else:
            raise ConfigError(f"{where}: unknown key {shown(key)}")
    config.allow_host_service = frozenset(consents)
    return config


def _one(values: list[str], where: str, key: str) -> list[str]:
    if len(values) != 1:
        raise ConfigError(f"{where}: {key} takes one string, not a list")
    return values


def _consent(entry: str, where: str) -> tuple[str, str, int, int]:
    """``domain:web1:tcp:22`` -> (owner tag, proto, first, last). The name is everything
    between the kind and the last two fields, so a name may hold ``:``."""
    kind, _, rest = entry.partition(":")
    parts = rest.rsplit(":", 2)
    what = f"{where}: allow_host_service entry {shown(entry)}"
    if kind not in ("domain", "network") or len(parts) != 3 or not parts[0]:
        raise ConfigError(f"{what}: not KIND:NAME:PROTO:PORTS (KIND domain or network)")
    name, proto, ports = parts
    if proto not in ("tcp", "udp"):
        raise ConfigError(f"{what}: protocol {shown(proto)} is not tcp or udp")
    found = _port_range(ports)
    if found is None:
        raise ConfigError(f"{what}: {shown(ports)} is not a port or range")
    first, last = found
    if not 1 <= first <= last <= 65535:
        raise ConfigError(f"{what}: ports {shown(ports)} are not a range within 1-65535")
    owner = domain_owner(name) if kind == "domain" else network_owner(name)
    return owner, proto, first, last
