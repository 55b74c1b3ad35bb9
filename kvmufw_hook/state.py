"""What later hooks need to know, kept as files: hooks must never call libvirt.

``STATE/networks/NAME.xml`` holds the live ``<network>`` of each active network we saw
(written on network start/started/updated/port ops, removed on stopped);
``STATE/domains/NAME.xml`` holds the live ``<domain>`` of each running guest with our
metadata (written on qemu start/reconnect, removed on stopped/release);
``STATE/overrides/NAME.xml`` holds our ``<forwards>`` of a running network as ``forward
add --network`` left them
(libvirt keeps the running network's XML until it restarts; until then this is the truth);
``STATE/ports/NAME.tsv`` holds the MAC and owner of each port libvirt created on a network.
libvirt's own ``/run/libvirt/network/NAME.xml`` fills in networks we have not seen yet, and
says which networks are active: libvirt writes it after a successful ``started`` and
removes it before ``stopped``.

State follows the kernel and libvirt, never leads them. A network's file is written after
its rules (``STATE/starting/NAME`` marks the moment between our ``started`` and libvirt's
status file); a guest's before its rules but kept or dropped by what its stop and libvirt
say; ``STATE/stopped/TOKEN`` names an owner whose removal failed: its rules are stale and
``restore`` removes them. ``STATE/uninstalled`` (left by ``ops.uninstall``) makes every
later hook and ``restore`` apply nothing until ``replay`` or ``mark_installed``.

These are copies of XML that libvirt keeps private: the directory is 0700 and every file
0600, and nothing here is opened through a symlink (a planted ``lock`` or ``domains``
link must not make root write elsewhere). A file that cannot be read or parsed is
reported, never silently skipped; who holds a port is taken from the kernel's
owner-tagged rules as well (``ops``), so a corrupt file cannot blind the conflict check.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from .errors import ApplyError, InputError
from .names import libvirt_network_dir, safe_name, state_dir

TYPE_CHECKING = False
if TYPE_CHECKING:  # a guest's stop runs through here: no typing at run time
    from collections.abc import Callable, Iterator
    from typing import Any, TypeVar

    from .model import Domain, Network

    Log = Callable[[str], None] | None
    Parsed = TypeVar("Parsed")

LOCK_TIMEOUT = float(os.environ.get("KVMUFW_LOCK_TIMEOUT", "30"))
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _path(kind: str, name: str) -> str:
    return os.path.join(state_dir(), kind, safe_name(name) + ".xml")


def network_path(name: str) -> str:
    return _path("networks", name)


def domain_path(name: str) -> str:
    return _path("domains", name)


def _private_dir(path: str) -> None:
    """Make ``path`` a real directory of ours, mode 0700 (tightened, never loosened):
    refuse a symlink or a directory someone else owns."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        _private_dir(os.path.dirname(path))
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ApplyError(f"state directory {path} is not a directory (a symlink?); "
                         "remove it and retry")
    if info.st_uid != os.geteuid():
        raise ApplyError(f"state directory {path} is owned by uid {info.st_uid}, not us")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(info.st_mode) & 0o700)


def _ensure(kind: str | None = None) -> str:
    top = state_dir()
    _private_dir(top)
    if kind is None:
        return top
    directory = os.path.join(top, kind)
    _private_dir(directory)
    return directory


def _write(path: str, data: bytes) -> None:
    """Atomically: a temporary file renamed over ``path`` (a kill leaves at most the
    temporary, which ``sweep`` removes once its writer is gone)."""
    _ensure(os.path.basename(os.path.dirname(path)))
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)  # replaces a planted symlink itself, never its target


def write_cache(name: str, data: bytes) -> None:
    """A file of ``cache/`` (what can be read again from the kernel), atomically."""
    _write(os.path.join(state_dir(), "cache", name), data)


def read_recorded(name: str, generation: int) -> Any:
    """What ``write_recorded`` left in ``cache/NAME``, if it was written at nf_tables'
    ``generation`` (nobody has committed anything since); None otherwise, or when the
    file is missing or unreadable (the kernel is read instead)."""
    import marshal
    try:
        with open(os.path.join(state_dir(), "cache", name), "rb") as fh:
            recorded, payload = marshal.loads(fh.read())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    return payload if recorded == generation else None


def write_recorded(name: str, generation: int, payload: Any) -> None:
    """A backend's record of what its own last write left, at nf_tables' generation right
    after it; a record that cannot be written is removed (a stale one would lie)."""
    import marshal
    try:
        write_cache(name, marshal.dumps((generation, payload)))
    except (OSError, ApplyError):
        forget_recorded(name)


def forget_recorded(name: str) -> None:
    try:
        os.unlink(os.path.join(state_dir(), "cache", name))
    except OSError:
        pass


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read(path: str) -> bytes | None:
    """The file's bytes; None if it does not exist. A symlink is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path} is a symlink; not following it") from None
        raise InputError(f"{path}: {exc.strerror}") from None
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def network_element(xml: bytes) -> bytes:
    """The ``<network>…</network>`` bytes of a hook's stdin, found without parsing: what
    we keep, and what an ``updated`` call is compared with to skip a no-op quickly."""
    start, end = xml.find(b"<network"), xml.rfind(b"</network>")
    return xml[start:end + len(b"</network>")] if 0 <= start < end else xml


def save_network(name: str, xml: bytes) -> None:
    _write(network_path(name), network_element(xml))


def network_unchanged(name: str, xml: bytes) -> bool:
    try:
        return _read(network_path(name)) == network_element(xml)
    except InputError:
        return False


def forget_network(name: str) -> None:
    _remove(network_path(name))
    forget_starting(name)
    forget_network_override(name)
    forget_ports(name)


def _override_path(name: str) -> str:
    return _path("overrides", name)


def save_network_override(name: str, xml: bytes) -> None:
    """``forward add --network`` on an active network: libvirt keeps the running
    network's XML until it restarts, so hooks, ``replay``, ``restore``, ``status`` and
    ``doctor`` take the network from here until then."""
    _write(_override_path(name), xml)


def network_override(name: str) -> bytes | None:
    return _read(_override_path(name))


def forget_network_override(name: str) -> None:
    _remove(_override_path(name))


def _ports_path(network: str) -> str:
    return os.path.join(state_dir(), "ports", safe_name(network) + ".tsv")


def network_ports(network: str) -> list[tuple[str, str]]:
    """(MAC, owner name) of every port libvirt created on the network (port-created),
    as libvirt told us: who really has which MAC, whatever a domain's XML claims."""
    try:
        data = _read(_ports_path(network))
    except InputError:
        return []
    if not data:
        return []
    import json  # only where ports were recorded: every guest start asks
    try:
        return [tuple(json.loads(line)) for line in data.splitlines()]
    except (ValueError, TypeError):
        return []


def record_port(network: str, mac: str, owner: str, deleted: bool) -> None:
    import json
    ports = [p for p in network_ports(network) if p != (mac, owner)]
    if not deleted:
        ports.append((mac, owner))
    _write(_ports_path(network), "".join(json.dumps(p) + "\n" for p in ports).encode())


def forget_ports(network: str) -> None:
    _remove(_ports_path(network))


def save_domain(name: str, xml: bytes) -> None:
    _write(domain_path(name), xml)


def forget_domain(name: str) -> None:
    _remove(domain_path(name))


def _files(directory: str) -> list[str]:
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(info.st_mode):
        raise ApplyError(f"state directory {directory} is not a directory (a symlink?)")
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.endswith(".xml"))


def _default_log(message: str) -> None:
    from .log import log
    log(message, error=True)


def _parsed(paths: list[str], parse: Callable[[bytes], Parsed],
            log: Log) -> Iterator[Parsed]:
    """The object of each file that parses. Each one that does not is reported (as an
    error: it is never skipped in silence); callers take the owner's claims from the
    kernel, and ``replay`` rewrites the file from libvirt."""
    report = log or _default_log
    for path in paths:
        try:
            data = _read(path)
            if data is None:
                continue
            yield parse(data)
        except InputError as exc:
            report(f"state file {path} is unreadable or corrupt ({exc}); its owner's "
                   "ports are taken from the kernel's rules; kvmufw_hook replay rewrites it")


def with_override(net: Network) -> Network:
    """The running network as ``forward add --network`` left it: its forwards from the
    override, everything else as libvirt has it live. InputError if the override is bad."""
    data = network_override(net.name)
    if data is None:
        return net
    from dataclasses import replace

    from .parse import parse_override
    return replace(net, forwards=parse_override(data, f"{net.name}: override"))


def load_networks(log: Log = None) -> dict[str, Network]:
    """name -> Network of every active network we know of (overrides applied)."""
    from .parse import parse_network_xml
    networks: dict[str, Network] = {}
    for net in _parsed(_files(os.path.join(state_dir(), "networks")), parse_network_xml, log):
        networks.setdefault(net.name, net)
    # libvirt's own status files (NAME.xml) of networks our state does not hold: the
    # others are not parsed again only to be dropped (a network's reservations are many)
    theirs = [path for path in _files(libvirt_network_dir())
              if os.path.basename(path)[:-4] not in networks]
    for net in _parsed(theirs, parse_network_xml, log):
        networks.setdefault(net.name, net)
    for name, net in networks.items():
        try:
            networks[name] = with_override(net)
        except InputError as exc:  # that network keeps its live forwards; others theirs
            (log or _default_log)(f"network override: {exc}")
    return networks


def load_domains(log: Log = None, known: frozenset[str] = frozenset()) -> dict[str, Domain]:
    """name -> Domain of every running guest we applied forwards for; ``known``: owner
    tags (``d=NAME``) whose forwards the caller has already (the kernel's claims): their
    files are not even parsed (a guest's start amid hundreds parses none)."""
    from .parse import parse_domain_xml
    paths = [path for path in _files(os.path.join(state_dir(), "domains"))
             if "d=" + os.path.basename(path)[:-4] not in known]
    return {dom.name: dom for dom in _parsed(paths, parse_domain_xml, log)}


def domain_names(live: dict[str, bytes], log: Log = None,
                 same: set[str] | None = None) -> set[str]:
    """The names ``load_domains`` keys by, without parsing again the files that hold
    exactly a guest's XML as ``live`` has it (name -> XML that parsed as that name):
    ``replay`` of hundreds of guests knows them all already. ``same`` gets the paths of
    those files (``replace_all``'s ``unchanged``, while the state stays locked)."""
    from .parse import parse_domain_xml
    by_path = {domain_path(name): (name, raw) for name, raw in live.items()}
    names, rest = set(), []
    for path in _files(os.path.join(state_dir(), "domains")):
        name, raw = by_path.get(path, ("", None))
        if raw is not None and _unchanged(path, raw):
            names.add(name)
            if same is not None:
                same.add(path)
        else:
            rest.append(path)
    return names | {dom.name for dom in _parsed(rest, parse_domain_xml, log)}


def _unchanged(path: str, data: bytes) -> bool:
    """Whether ``path`` is a plain file holding exactly ``data``."""
    try:
        return _read(path) == data
    except InputError:  # a symlink, unreadable: not the same
        return False


def has_domain(name: str) -> bool:
    """Whether a stop of the guest has anything to remove: its state, or the marker of
    a removal that failed."""
    from .names import domain_owner
    return (os.path.lexists(domain_path(name))
            or os.path.lexists(_marker("stopped", safe_name(domain_owner(name)))))


# --------------------------------------------------------------------------- markers

def _marker(kind: str, token: str) -> str:
    return os.path.join(state_dir(), kind, token)


def mark_starting(name: str) -> None:
    """Our ``started`` of the network is done; libvirt's status file comes next."""
    _write(_marker("starting", safe_name(name)), b"")


def forget_starting(name: str) -> None:
    _remove(_marker("starting", safe_name(name)))


def mark_stopped(owner: str) -> None:
    """``owner``'s removal failed: whatever rules it has left are stale."""
    _write(_marker("stopped", safe_name(owner)), owner.encode())


def forget_stopped(owner: str) -> None:
    _remove(_marker("stopped", safe_name(owner)))


def stopped_owners() -> list[str]:
    """Owners (tags) whose removal failed, oldest first by name."""
    directory = os.path.join(state_dir(), "stopped")
    try:
        tokens = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for token in tokens:
        try:
            data = _read(os.path.join(directory, token))
        except InputError:
            continue
        if data and not token.endswith(".tmp"):
            out.append(data.decode("utf-8", "surrogateescape"))
    return out


class NetworkActivity:
    """Which networks libvirt says are active, from its status files (``tokens``: the
    ``safe_name`` of each), and whether it says so at all (``known``: its status
    directory exists; without it our state is all there is)."""

    def __init__(self) -> None:
        directory = libvirt_network_dir()
        try:
            self.mtime_ns = os.stat(directory).st_mtime_ns
            names = os.listdir(directory)
            self.known = True
        except OSError:
            self.mtime_ns, names, self.known = 0, [], False
        self.tokens = {safe_name(n[:-4]) for n in names if n.endswith(".xml")}

    def active(self, name: str) -> bool:
        return not self.known or safe_name(name) in self.tokens

    def starting(self, name: str) -> bool:
        """Our ``started`` succeeded after libvirt last changed its status files: libvirt
        is writing this network's now (a stop or a failed start changes the directory)."""
        try:
            marked = os.stat(_marker("starting", safe_name(name))).st_mtime_ns
        except OSError:
            return False
        return marked >= self.mtime_ns

    def stale(self, token: str) -> bool:
        """Whether the network of token ``token`` is certainly not active."""
        return self.known and token not in self.tokens


def state_network_tokens() -> set[str]:
    """The ``safe_name`` of every network our state has a file for."""
    directory = os.path.join(state_dir(), "networks")
    try:
        return {f[:-4] for f in os.listdir(directory) if f.endswith(".xml")}
    except OSError:
        return set()


def sweep() -> None:
    """Remove temporary files whose writer is gone (killed between write and rename)."""
    top = state_dir()
    try:
        kinds = os.listdir(top)
    except OSError:
        return
    for kind in kinds:
        directory = os.path.join(top, kind)
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        for name in os.listdir(directory):
            if not name.endswith(".tmp"):
                continue
            pid = name[:-4].rsplit(".", 1)[-1]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _remove(os.path.join(directory, name))


UNINSTALLED = "uninstalled"


def uninstalled() -> bool:
    return os.path.lexists(os.path.join(state_dir(), UNINSTALLED))


def mark_installed() -> None:
    """Hooks apply again (the installer, before it installs the hooks; ``replay``)."""
    _remove(os.path.join(state_dir(), UNINSTALLED))


def clear_for_uninstall() -> None:
    """Every state file gone, the ``uninstalled`` marker left (called under the lock)."""
    import shutil
    top = _ensure()
    for entry in os.listdir(top):
        path = os.path.join(top, entry)
        if entry == "lock":
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            _remove(path)
    os.close(os.open(os.path.join(top, UNINSTALLED), os.O_WRONLY | os.O_CREAT | _NOFOLLOW,
                     0o600))


class Uninstalled(Exception):
    """kvmufw_hook was uninstalled while this call waited for the lock: apply nothing."""


class locked:
    """``with locked():`` serialises read-modify-write of state and rules across
    concurrent hooks (a class, not contextlib: this module is on the hooks' fast path).
    Waits at most ``LOCK_TIMEOUT`` seconds: nothing of ours may hang a boot or a daemon
    start behind a stuck holder.

    The lock's fd is inherited by the commands run meanwhile (``iptables-restore``, ``nft``):
    a holder killed while its write is pending leaves the lock held by that write until
    it ends, so no later call reads before the write lands. Raises ``Uninstalled`` when
    ``uninstall`` ran (its marker is there, or the lock file was removed while this call
    waited), unless ``installing`` (``replay``, ``uninstall`` itself)."""

    def __init__(self, timeout: float | None = None, installing: bool = False) -> None:
        self.timeout = LOCK_TIMEOUT if timeout is None else timeout
        self.installing = installing

    def __enter__(self) -> None:
        self._take()
        if self.installing:
            return
        try:
            gone = os.fstat(self.fd).st_nlink == 0 or uninstalled()
        except OSError:
            gone = True
        if gone:
            os.close(self.fd)
            raise Uninstalled("kvmufw_hook is uninstalled: nothing applied")

    def _take(self) -> None:
        directory = _ensure()
        self.fd = os.open(os.path.join(directory, "lock"),
                          os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        os.set_inheritable(self.fd, True)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            deadline = time.monotonic() + self.timeout
            while True:
                time.sleep(0.02)
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(self.fd)
                        raise ApplyError(f"{directory}/lock is held by another kvmufw_hook "
                                         f"for more than {self.timeout:.0f}s") from None

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)  # closing releases the lock


def replace_all(networks: dict[str, bytes], domains: dict[str, bytes],
                keep: set[tuple[str, str]] | None = None,
                unchanged: set[str] | None = None) -> None:
    """Make the state files exactly these (``replay``), leaving alone the files in
    ``keep`` ((kind, name) of owners whose XML did not parse: their rules stay, and so
    must what lets their stop remove them). ``unchanged``: paths found holding exactly
    their XML already under the same lock (``domain_names``' ``same``): not read again."""
    for kind, wanted in (("networks", networks), ("domains", domains)):
        paths = {_path(kind, name): raw for name, raw in wanted.items()}
        kept = {_path(k, name) for k, name in keep or () if k == kind}
        for path in _files(os.path.join(state_dir(), kind)):
            if path not in paths and path not in kept:
                _remove(path)
        for path, raw in paths.items():
            if unchanged is not None and path in unchanged:
                continue
            if not _unchanged(path, raw):  # most are: the hooks wrote them
                _write(path, raw)


# --------------------------------------------------------------------------- hairpin

def _hairpin_path(owner: str) -> str:
    return os.path.join(state_dir(), "hairpin", owner + ".txt")


def hairpin_ports(owner: str) -> dict[str, int]:
    """port -> ifindex of each bridge port on which we turned hairpin on for ``owner``
    (``backends/bridgeports.py``): ``PORT IFINDEX`` lines."""
    data = _read(_hairpin_path(owner))
    out = {}
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        port, _, index = line.partition(" ")
        if port and index.isdigit():
            out[port] = int(index)
    return out


def save_hairpin_ports(owner: str, ports: dict[str, int]) -> None:
    if ports:
        _write(_hairpin_path(owner),
               "".join(f"{p} {i}\n" for p, i in sorted(ports.items())).encode())
    else:
        _remove(_hairpin_path(owner))


def hairpin_owners() -> list[str]:
    """Every owner with a hairpin record."""
    directory = os.path.join(state_dir(), "hairpin")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n[:-4] for n in names if n.endswith(".txt"))
