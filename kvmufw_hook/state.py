"""What later hooks need to know, kept as files: hooks must never call libvirt.

``STATE/networks/NAME.xml`` holds the live ``<network>`` of each active network we saw
(written on network start/started/updated/port ops, removed on stopped);
``STATE/domains/NAME.xml`` holds the live ``<domain>`` of each running guest with our
metadata (written on qemu start/reconnect, removed on stopped/release). libvirt's own
``/run/libvirt/network/NAME.xml`` fills in networks we have not seen yet.
"""

from __future__ import annotations

import fcntl
import os

from .errors import InputError
from .names import libvirt_network_dir, safe_name, state_dir


def _path(kind: str, name: str) -> str:
    return os.path.join(state_dir(), kind, safe_name(name) + ".xml")


def network_path(name: str) -> str:
    return _path("networks", name)


def domain_path(name: str) -> str:
    return _path("domains", name)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def network_element(xml: bytes) -> bytes:
    """The ``<network>…</network>`` bytes of a hook's stdin, found without parsing: what
    we keep, and what an ``updated`` call is compared with to skip a no-op quickly."""
    start, end = xml.find(b"<network"), xml.rfind(b"</network>")
    return xml[start:end + len(b"</network>")] if 0 <= start < end else xml


def save_network(name: str, xml: bytes) -> None:
    _write(network_path(name), network_element(xml))


def network_unchanged(name: str, xml: bytes) -> bool:
    return _read(network_path(name)) == network_element(xml)


def forget_network(name: str) -> None:
    _remove(network_path(name))
    forget_network_override(name)


def _override_path(name: str) -> str:
    return os.path.join(state_dir(), "overrides", safe_name(name) + ".xml")


def save_network_override(name: str, xml: bytes) -> None:
    """``forward add --network`` on an active network: libvirt keeps the running
    network's XML until it restarts, so hooks take the network from here until then."""
    _write(_override_path(name), xml)


def network_override(name: str) -> bytes | None:
    return _read(_override_path(name))


def forget_network_override(name: str) -> None:
    _remove(_override_path(name))


def save_domain(name: str, xml: bytes) -> None:
    _write(domain_path(name), xml)


def forget_domain(name: str) -> None:
    _remove(domain_path(name))


def _files(directory: str) -> list[str]:
    try:
        return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                      if f.endswith(".xml"))
    except FileNotFoundError:
        return []


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _parsed(paths: list[str], parse, log):
    """The object of each file that parses; the others are logged and skipped."""
    for path in paths:
        data = _read(path)
        if data is None:
            continue
        try:
            yield parse(data)
        except InputError as exc:
            if log:
                log(f"ignoring {path}: {exc}")


def load_networks(log=None) -> dict:
    """name -> Network of every active network we know of."""
    from .parse import parse_network_xml
    networks: dict = {}
    paths = _files(os.path.join(state_dir(), "networks")) + _files(libvirt_network_dir())
    for net in _parsed(paths, parse_network_xml, log):
        networks.setdefault(net.name, net)
    return networks


def load_domains(log=None) -> dict:
    """name -> Domain of every running guest we applied forwards for."""
    from .parse import parse_domain_xml
    paths = _files(os.path.join(state_dir(), "domains"))
    return {dom.name: dom for dom in _parsed(paths, parse_domain_xml, log)}


def has_domain(name: str) -> bool:
    return os.path.exists(domain_path(name))


class locked:
    """``with locked():`` serialises read-modify-write of state and rules across
    concurrent hooks (a class, not contextlib: this module is on the hooks' fast path)."""

    def __enter__(self) -> None:
        directory = state_dir()
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self.fd = os.open(os.path.join(directory, "lock"),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the lock

def replace_all(networks: dict[str, bytes], domains: dict[str, bytes]) -> None:
    """Make the state files exactly these (``replay``)."""
    for kind, wanted in (("networks", networks), ("domains", domains)):
        paths = {_path(kind, name): raw for name, raw in wanted.items()}
        for path in _files(os.path.join(state_dir(), kind)):
            if path not in paths:
                _remove(path)
        for path, raw in paths.items():
            _write(path, raw)
