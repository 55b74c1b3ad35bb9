"""The libvirt hook entry: ``HOOK OBJECT OP SUBOP EXTRA`` with XML on stdin.

This module is on the critical path of every guest start and stop, so it decides from
argv (and a byte search of stdin) whether the call matters before importing anything
heavy: the XML parser, the planner and the backends are imported only when there is
work. qemu ``prepare`` does nothing: ``start`` runs before QEMU is launched, validates
everything ``prepare`` could (and more: the bridge is known by then) and refuses the
start just the same. A guest's stop needs only its name: no XML, no parser, one
iptables-save (none after a write of ours: ``backends.iptables.Record``) and one
iptables-restore.

The guest-stop budget: a stop (qemu ``stopped``, then ``release``) runs on libvirt's
critical path of every shutdown, so it loads the package's modules of ``STOP_MODULES``
and nothing else of ours, and of the standard library only ``STOP_STDLIB`` beyond what
the interpreter loads to start (``tests/test_hook.py`` runs a real stop and checks
both). Only those modules keep start-up tricks (imports inside functions, annotations
behind ``TYPE_CHECKING``); every other module is written plainly. A guest's start has a
budget too (``START_MODULES``, ``START_STDLIB``); the two tricks it needs live here: a
stand-in for ``inspect`` while the dataclasses load (``_defer_inspect``), and their
generated methods compiled when first called (``_lazy_dataclass_methods``).

Exit status follows libvirt's semantics: a failing validation or start op returns
non-zero so libvirt refuses the start; ``stopped``, ``release`` and ``reconnect`` always
return 0 (non-zero from ``reconnect`` kills the running guest); ``restore`` returns 0.
``migrate`` (on the destination) checks the guest's forwards against this host as
``start`` would and returns non-zero to refuse the migration before anything moves.
Neither writes to stdout (stdout would replace the domain XML).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: the stop path imports no collections
    from collections.abc import Callable

STOP_MODULES = frozenset({
    "kvmufw_hook", "kvmufw_hook.hook", "kvmufw_hook.log", "kvmufw_hook.errors",
    "kvmufw_hook.names", "kvmufw_hook.state", "kvmufw_hook.apply", "kvmufw_hook.process",
    "kvmufw_hook.conntrack", "kvmufw_hook.backends", "kvmufw_hook.backends.bridgeports",
    "kvmufw_hook.backends.iptables", "kvmufw_hook.backends.nftprobe",
    "kvmufw_hook.backends.tags", "kvmufw_hook.backends.transaction",
    "kvmufw_hook.backends.accepts",
    # root's configuration names the backend (firewall_backend), hence its parser, and
    # with "nftables" that backend instead of iptables', and its element changes
    # written by netlink in-process
    "kvmufw_hook.config", "kvmufw_hook.backends.nft", "kvmufw_hook.backends.nftwrite"})
STOP_STDLIB = frozenset({
    "__future__", "os", "posixpath", "genericpath", "stat", "_stat", "_collections_abc",
    "errno", "fcntl", "time", "select", "_socket", "struct", "_struct", "syslog",
    "encodings.unicode_escape"})
# The guest-start budget: qemu ``start`` (and every op that parses XML and plans) loads
# what a stop loads, the parser, the planner and the checks, and of the standard library
# only START_STDLIB beyond the interpreter's start-up and STOP_STDLIB. Not ``inspect``
# (``_defer_inspect``), ``typing``, ``site``, ElementTree (``parse.Node``), lxml or
# anything outside the standard library (``tests/kernel/test_hook.py`` runs a real start
# with each backend and checks).
START_MODULES = STOP_MODULES | frozenset({
    "kvmufw_hook.parse", "kvmufw_hook.model", "kvmufw_hook.intents", "kvmufw_hook.plan",
    "kvmufw_hook.policy", "kvmufw_hook.hostplan", "kvmufw_hook.hairpin",
    "kvmufw_hook.host", "kvmufw_hook.sockdiag", "kvmufw_hook.ops",
    "kvmufw_hook.backends.rules",
    # where another guest has a port on the network: the host's neighbour table
    "kvmufw_hook.neighbours"})
START_STDLIB = STOP_STDLIB | frozenset({
    # the XML parser: expat building parse.Node, not ElementTree
    "xml", "xml.parsers", "xml.parsers.expat", "pyexpat",
    # the model's dataclasses (and what they import but inspect)
    "dataclasses", "copy", "copyreg", "weakref", "_weakrefset", "keyword", "types",
    "org", "org.python", "org.python.core", "reprlib",  # copy's Jython check; 3.11
    "functools", "_functools", "collections", "collections.abc", "_collections",
    "itertools", "operator", "_operator", "enum",
    # validation: addresses, patterns, sorted holders; dnsmasq's leases are JSON
    "ipaddress", "re", "re._casefix", "re._compiler", "re._constants", "re._parser",
    "_sre", "bisect", "_bisect", "json", "json.decoder", "json.encoder", "json.scanner",
    "_json"})
NETWORK_OPS = {"start", "started", "stopped", "port-created", "port-deleted", "updated"}
QEMU_OPS = {"start", "stopped", "release", "reconnect", "migrate", "restore"}
# Ops whose failure must not reach libvirt as a non-zero exit.
NEVER_FAIL = {("network", "stopped"), ("network", "port-created"),
              ("network", "port-deleted"), ("network", "updated"),
              ("qemu", "stopped"), ("qemu", "release"), ("qemu", "reconnect"),
              ("qemu", "restore")}


def _has_domain_state(name: str) -> bool:
    from .state import has_domain
    return has_domain(name)


def _network_unchanged(name: str, data: bytes) -> bool:
    from .state import network_unchanged
    return network_unchanged(name, data)


def _has_our_metadata(data: bytes) -> bool:
    """A byte search for our namespace, before any XML is parsed. names is imported
    here, not at the top: the calls that return before this import nothing at all."""
    from .names import NAMESPACE
    return NAMESPACE.encode() in data


def main(kind: str, argv: list[str] | None = None, stdin: bytes | None = None) -> int:
    """Run one hook call; returns the exit status. Never writes to stdout."""
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # nothing we call may write to libvirt's stdout
    args = sys.argv[1:] if argv is None else argv
    try:
        return _main(kind, args, stdin)
    except (ImportError, SyntaxError) as exc:
        # the package is being replaced under us (an upgrade or uninstall; a module
        # half written): applying half of it is worse than nothing, and the
        # installer's replay follows
        _quiet_log(f"{kind} {' '.join(args[1:2] + args[:1])}: kvmufw_hook is being "
                   f"replaced ({exc}): nothing applied")
        return 0
    finally:
        sys.stdout = real_stdout


def _main(kind: str, argv: list[str], stdin: bytes | None) -> int:
    if len(argv) < 2:
        return 0
    name, op = argv[0], argv[1]
    if (kind == "network" and op not in NETWORK_OPS) or (kind == "qemu" and op not in QEMU_OPS):
        return 0
    if kind == "qemu" and op in ("stopped", "release"):
        # Nothing on stdin matters: the rules are keyed by the name.
        if not _has_domain_state(name):
            return 0
        data = b""
    else:
        data = stdin if stdin is not None else sys.stdin.buffer.read()
        if kind == "network" and op == "updated" and _network_unchanged(name, data):
            return 0  # libvirt re-sent the definition we already applied
        if kind == "qemu" and not _has_our_metadata(data) and not (
                op == "reconnect" and _has_domain_state(name)):
            # A guest without our metadata: nothing to do, unless it had forwards
            # before (metadata removed while running) that a reconnect must remove.
            return 0
    never_fail = (kind, op) in NEVER_FAIL
    try:
        _dispatch(kind, name, op, data)
        return 0
    except (ImportError, SyntaxError):
        raise  # the package is being replaced: ``main`` says so quietly
    except Exception as exc:  # every failure is logged, some must not fail
        from .errors import ApplyError, InputError
        from .log import log
        if isinstance(exc, (InputError, ApplyError)):
            message = str(exc)
        else:
            import traceback
            log("".join(traceback.format_exception(exc)).replace("\n", " | "))
            message = f"internal error: {type(exc).__name__}: {exc}"
        log(f"{kind} {op} {name}: {message}", error=True)
        if never_fail:
            return 0
        return 2 if isinstance(exc, InputError) else 1


def _quiet_log(message: str) -> None:
    """One line to syslog, never to stderr, needing nothing of the package."""
    try:
        import syslog
        syslog.openlog("kvmufw_hook")
        syslog.syslog(syslog.LOG_WARNING, message)
    except Exception:
        pass


def _defer_inspect() -> None:
    """Put a stand-in for ``inspect`` in ``sys.modules`` until something really uses it.

    ``dataclasses`` imports ``inspect`` when it loads, and asks it of a class only its
    own annotations (Python 3.12 on: ``get_annotations``, answered here as ``inspect``
    answers for a class, without evaluating them) and, for a class without a docstring,
    its signature; loading it (ast, dis, tokenize, ...) would cost a
    guest's start about a third of the interpreter's own start-up. Anything else loads
    the real module and answers from it: a use nobody foresaw is slower, never wrong.
    Only this process's hook call sees it (``START_STDLIB`` and its test keep
    ``inspect`` out); an interpreter that has ``inspect`` already keeps it.
    """
    if "inspect" in sys.modules:
        return
    from types import ModuleType

    def real() -> ModuleType:
        if isinstance(sys.modules.get("inspect"), DeferredInspect):
            del sys.modules["inspect"]
        import inspect
        return inspect

    class DeferredInspect(ModuleType):
        def __getattr__(self, name: str) -> object:
            if name.startswith("__"):  # the import system asks for __spec__, __path__, ...
                raise AttributeError(name)
            return getattr(real(), name)

        @staticmethod
        def get_annotations(obj: object, **options: object) -> object:
            if isinstance(obj, type) and not options.get("eval_str"):
                own = obj.__dict__.get("__annotations__")  # noqa: RUF063 - we stand in for it
                if own is None or isinstance(own, dict):
                    return dict(own or {})
            return real().get_annotations(obj, **options)

    sys.modules["inspect"] = DeferredInspect("inspect")


def _lazy_dataclass_methods() -> None:
    """Compile each method a dataclass generates on its first call, not when the class
    is created.

    Python 3.11 and 3.12 compile every generated method (``__init__``, ``__repr__``,
    ``__eq__``, ``__hash__``, a frozen class's ``__setattr__`` and ``__delattr__``) with
    an ``exec`` of its own while the class is created: ~0.4 ms a class, ~6 ms of a
    guest's start, mostly for methods the call never runs. Here ``dataclasses`` hands
    out a stand-in that compiles the very same text (``dataclasses._create_fn``) when
    first called and then calls it. Python 3.13 compiles a class's methods in one
    ``exec`` and has no ``_create_fn``: nothing to do. Only this process's hook call
    sees it, after ``_defer_inspect`` (``dataclasses`` imports ``inspect``).
    """
    import dataclasses
    create = getattr(dataclasses, "_create_fn", None)
    if create is None or create.__module__ == __name__:
        return

    def lazy(name: str, args: list[str], body: list[str],
             **options: object) -> Callable[..., object]:
        compiled: Callable[..., object] | None = None

        def method(*args_: object, **kwargs: object) -> object:
            nonlocal compiled
            if compiled is None:
                compiled = create(name, args, body, **options)
                # named as dataclasses named the stand-in (``Domain.__init__``): a
                # TypeError of a wrong call says the same as with methods compiled at once
                compiled.__qualname__ = method.__qualname__
            return compiled(*args_, **kwargs)

        method.__name__ = name
        return method

    setattr(dataclasses, "_create_fn", lazy)  # noqa: B010 - private: not in the stubs


def _before_the_model() -> None:
    """The start path's two tricks, before the model's dataclasses load."""
    _defer_inspect()
    _lazy_dataclass_methods()


def _finish_switch(log: Callable[[str], None]) -> None:
    """``firewall_backend`` was switched and nothing has run ``replay`` since: ``restore``
    first moves every owner of our state into the selected backend and clears the other
    one, so that no forward is lost and this call finds one backend. A configuration
    error is left to the operation itself (it refuses, or logs, as it always has)."""
    from .backends import switched
    from .errors import ConfigError
    try:
        if not switched():
            return
    except ConfigError:
        return
    _before_the_model()
    from .ops import restore
    restore(log=log)
    log("firewall backend switched: every owner moved by restore")


def _dispatch(kind: str, name: str, op: str, data: bytes) -> None:
    from .log import log  # here: calls that need nothing import nothing, not even os
    _finish_switch(log)
    if kind == "qemu" and op in ("stopped", "release"):
        from .apply import domain_stopped
        domain_stopped(name, log=log)
        return
    _before_the_model()
    if kind == "qemu" and op == "restore":
        from .parse import parse_domain_xml
        from .plan import validate_domain
        validate_domain(parse_domain_xml(data))  # no state, no firewall: nothing else
        return
    if kind == "qemu" and op == "migrate":  # on the destination: would this host take it?
        from .ops import domain_arriving
        from .parse import parse_domain_xml
        domain_arriving(parse_domain_xml(data))
        return
    from . import ops
    if kind == "network":
        from . import state
        from .parse import parse_hookdata
        net, port = parse_hookdata(data)
        if op in ("start", "started"):
            state.forget_network_override(net.name)  # live XML = persistent definition now
        elif op != "stopped":
            net = state.with_override(net)  # forward add --network, until it restarts
        if op == "start":
            ops.validate_network(net)
        elif op == "started":
            ops.network_started(net, data, log=log)
        elif op == "stopped":
            ops.network_stopped(net, log=log)
        else:  # port-created, port-deleted, updated
            ops.network_port(net, data, port, deleted=op == "port-deleted", log=log)
        return
    from .parse import parse_domain_xml
    ops.domain_started(parse_domain_xml(data), data, log=log,  # start, reconnect
                       running=op == "reconnect")
