"""Hairpin mode on guests' bridge ports: the kernel side of ``hairpin.py``'s plan, a
participant of the apply step beside the firewall backend.

Promises:
- A port is turned on only when a plan names it (a guest of ours with a forward of its
  own, its ``<target dev=…>``), it is a port of the bridge its network has, and
  br_netfilter is on (``net.bridge.bridge-nf-call-iptables`` / ``-ip6tables`` of this
  network namespace) for a family of that guest's forwards.
- Only ports we turned on are ever turned off, and only while they are the same
  interface (ifindex): a tap name reused by another guest, or a port whose hairpin mode
  someone else set, is left alone.
- What we turned on is recorded per owner under ``STATE/hairpin/``, so that a guest's
  stop, ``replay``, ``restore`` and ``flush`` take back exactly that.
- One sysfs write per port changed, no process. A backend that runs elsewhere (tests:
  ``prefix`` = ``ip netns exec NS``) reads and writes through one child there per step.

A guest's stop imports this module: it imports nothing but ``os`` until there is work.
"""

from __future__ import annotations

import os

from .. import state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import Any

    from ..hairpin import HairpinPort
    from .base import Backend

    Ports = dict[str, tuple[int, str | None, bool] | None]  # port -> (ifindex, bridge, hairpin)

SYSCTL = {4: "net/bridge/bridge-nf-call-iptables", 6: "net/bridge/bridge-nf-call-ip6tables"}


def _text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _usable(port: str) -> bool:
    """A name that is one entry of /sys/class/net (records are ours, but a path is a path)."""
    return bool(port) and "/" not in port and port not in (".", "..") and len(port) <= 15


def read_netfilter() -> list[int]:
    """The families whose bridged frames go through ip(6)tables in this namespace (the
    sysctls are absent where br_netfilter is not loaded: off)."""
    return [f for f, path in SYSCTL.items() if _text(f"/proc/sys/{path}") == "1"]


def read_ports(ports: Iterable[str]) -> dict[str, tuple[int, str | None, bool] | None]:
    """port -> (ifindex, its bridge, hairpin on), or None when there is no such port."""
    out: dict[str, tuple[int, str | None, bool] | None] = {}
    for port in ports:
        base = f"/sys/class/net/{port}"
        index = _text(f"{base}/ifindex") if _usable(port) else None
        if index is None or not index.isdigit():
            out[port] = None
            continue
        try:
            master: str | None = os.path.basename(os.readlink(f"{base}/master"))
        except OSError:
            master = None
        out[port] = (int(index), master, _text(f"{base}/brport/hairpin_mode") == "1")
    return out


def write_ports(changes: Iterable[tuple[str, int, bool]]) -> list[str]:
    """Set hairpin mode of each (port, ifindex, on) still that interface; what failed."""
    failed = []
    for port, index, on in changes:
        base = f"/sys/class/net/{port}"
        if not _usable(port) or _text(f"{base}/ifindex") != str(index):
            continue  # gone, or another interface by now: not ours to touch
        try:
            with open(f"{base}/brport/hairpin_mode", "w") as fh:
                fh.write("1" if on else "0")
        except OSError as exc:
            failed.append(f"{port}: {exc.strerror or exc}")
    return failed


def _served() -> None:
    """The child's side with ``prefix``: a JSON request on stdin, the answer on stdout."""
    import json
    import sys
    request = json.load(sys.stdin)
    if request["op"] == "read":
        json.dump([read_netfilter(), read_ports(request["ports"])], sys.stdout)
    else:
        json.dump(write_ports((p, i, on) for p, i, on in request["changes"]), sys.stdout)


class BridgePorts:
    """Hairpin mode of guests' bridge ports in the hook's network namespace (``prefix``:
    in another one, as the firewall backend that goes with it)."""

    def __init__(self, prefix: Iterable[str] = ()) -> None:
        self.prefix = list(prefix)

    @classmethod
    def beside(cls, backend: Backend[Any, Any] | None) -> BridgePorts:
        """The ports in the namespace where ``backend`` writes (None: the host's own)."""
        return cls(backend.prefix if backend is not None else ())

    def _elsewhere(self, request: dict[str, Any]) -> Any:
        import json
        import sys

        from ..process import communicate
        package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (f"import sys; sys.path.insert(0, {package!r}); "
                "from kvmufw_hook.backends.bridgeports import _served; _served()")
        status, out, err = communicate([*self.prefix, sys.executable, "-c", code],
                                       json.dumps(request).encode(), timeout=30)
        if status != 0:
            raise OSError(f"bridge ports: {err.decode(errors='replace').strip()}")
        return json.loads(out)

    def netfilter(self) -> list[int]:
        """The families where br_netfilter is on here."""
        return self.read([])[0]

    def read(self, ports: list[str]) -> tuple[list[int], Ports]:
        """(families where br_netfilter is on, port -> (ifindex, bridge, hairpin on))."""
        if not self.prefix:
            return read_netfilter(), read_ports(ports)
        nf, found = self._elsewhere({"op": "read", "ports": ports})
        return nf, {p: tuple(v) if v else None for p, v in found.items()}

    def _write(self, changes: list[tuple[str, int, bool]]) -> list[str]:
        if not changes:
            return []
        if not self.prefix:
            return write_ports(changes)
        written: list[str] = self._elsewhere({"op": "write", "changes": changes})
        return written

    def sync(self, wanted: Mapping[str, Sequence[HairpinPort]], everyone: bool = False,
             keep: Iterable[str] = ()) -> list[str]:
        """Make hairpin mode follow the plan for the owners in ``wanted`` (an empty
        sequence takes back all of that owner's); ``everyone``: every other owner with a
        record too, but those in ``keep`` (they failed to plan: theirs stay). Called
        under the state lock. One line per change, and per port that could not be set."""
        owners = set(wanted)
        if everyone:
            owners |= set(state.hairpin_owners()) - set(keep)
        records = {o: state.hairpin_ports(o) for o in sorted(owners)}
        if not any(records.values()) and not any(wanted.values()):
            return []  # nothing planned, nothing of ours: no read at all
        names = sorted({p.port for ports in wanted.values() for p in ports}
                       | {p for rec in records.values() for p in rec})
        netfilter, found = self.read(names)
        changes: list[tuple[str, int, bool]] = []
        lines: list[str] = []
        for owner, recorded in records.items():
            ours: dict[str, int] = {}
            for planned in wanted.get(owner, ()):
                now = found.get(planned.port)
                if now is None or now[1] != planned.bridge:
                    continue  # not a port of the guest's bridge: not the guest's
                if set(planned.families).isdisjoint(netfilter):
                    continue  # routed by the host: the bridge needs no hairpin
                index, _bridge, on = now
                if not on:
                    changes.append((planned.port, index, True))
                    lines.append(f"hairpin on for {planned.port} (owner {owner})")
                    ours[planned.port] = index
                elif recorded.get(planned.port) == index:
                    ours[planned.port] = index
                # on, and not by us: someone else's setting, never ours to take back
            for port, index in recorded.items():
                now = found.get(port)
                if ours.get(port) != index and now is not None and now[0] == index and now[2]:
                    changes.append((port, index, False))
                    lines.append(f"hairpin off for {port} (owner {owner})")
            if ours != recorded:
                state.save_hairpin_ports(owner, ours)
        lines += [f"hairpin mode not changed: {why}" for why in self._write(changes)]
        return lines

    def release(self, owner: str) -> list[str]:
        """Take back the hairpin mode turned on for ``owner`` (a guest's stop): nothing
        to read when it has no record."""
        if not state.hairpin_ports(owner):
            return []
        return self.sync({owner: ()})

    def release_all(self) -> list[str]:
        """Take back every port we turned on (``flush``, uninstall)."""
        return self.sync({}, everyone=True)


def follow(backend: Backend[Any, Any] | None, wanted: Mapping[str, Sequence[HairpinPort]],
           log: Callable[[str], None], everyone: bool = False, keep: Iterable[str] = ()) -> None:
    """``BridgePorts.sync`` beside ``backend``, each line logged. A port that cannot be
    set costs the guest only the way to its own forwards: logged, never a failure of the
    rules just applied."""
    from ..errors import ApplyError
    try:
        lines = BridgePorts.beside(backend).sync(wanted, everyone, keep)
    except (OSError, ApplyError) as exc:
        lines = [f"hairpin mode not changed: {exc}"]
    for line in lines:
        log(line)
