"""Talking to libvirt, for the command line only: hooks never import this module (a hook
that calls back into libvirt deadlocks it)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .errors import ApplyError, InputError

KEY = "kvmufw"  # the prefix libvirt writes our metadata element with (kvmufw:forwards)


def libvirt_module() -> ModuleType:
    try:
        import libvirt
    except ImportError:
        raise ApplyError("libvirt-python is not installed (apt install python3-libvirt)") \
            from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors come as exceptions
    module: ModuleType = libvirt
    return module


def connect(uri: str, readonly: bool = True) -> Any:
    libvirt = libvirt_module()
    try:
        return libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ApplyError(f"cannot connect to libvirt ({uri}): {exc}") from None


def live_xml(uri: str) -> tuple[list[bytes], list[bytes]]:
    """Live XML of every active network and every running domain."""
    libvirt = libvirt_module()
    conn = connect(uri)
    try:
        nets = [n.XMLDesc(0).encode() for n in conn.listAllNetworks(
            libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE)]
        doms = [d.XMLDesc(0).encode() for d in conn.listAllDomains(
            libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
    except libvirt.libvirtError as exc:
        raise ApplyError(f"libvirt ({uri}): {exc}") from None
    finally:
        conn.close()
    return nets, doms


def lookup(conn: Any, kind: str, name: str) -> Any:
    """The libvirt domain or network object of that name; InputError if there is none."""
    libvirt = libvirt_module()
    try:
        return conn.lookupByName(name) if kind == "domain" else conn.networkLookupByName(name)
    except libvirt.libvirtError:
        raise InputError(f"no {kind} named '{name}'") from None
