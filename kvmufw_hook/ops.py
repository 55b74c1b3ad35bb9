"""Operations: what a hook call or a command does, from parsed model to applied rules:
lock, read, decide, one transaction. Deciding is pure and lives elsewhere: an owner's
rules are composed one way (``hostplan.compose``, ``hostplan.settle``), every check
between owners is ``policy``'s, and the whole host's desired state is
``hostplan.plan_host``; what they need of the kernel, the host and our state is read
here and handed to them as data.

Each operation that changes rules holds the state lock for its whole
read-check-write, so concurrent hooks cannot interleave or both claim a port.
``backend`` arguments are a ``backends.base.Backend``; None means the host's own.

Who holds a host port is what the kernel's owner-tagged rules say, completed by our
state files (a network whose rules a firewall reload wiped still holds its ports):
a newcomer never takes a port from its current holder, whatever order owners are
planned in, and a lost or corrupt state file cannot hide a holder.

State follows the kernel and libvirt (``state.py``): a network's file is written after
its rules, a stop removes rules before state, and an operation whose write fails is run
again on a fresh read (``apply.retrying``): whatever is killed or fails, ``restore``
(which never asks libvirt) and ``replay`` bring every running owner back and leave
nothing of a stopped one. After ``uninstall`` every operation applies nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from . import config, host, state
from .apply import (  # noqa: F401 - the stop path lives there
    Applied,
    apply_rules,
    covering,
    domain_stopped,
    families_of,
    retrying,
)
from .backends import default_backend
from .backends.bridgeports import BridgePorts, follow
from .errors import ApplyError, ConfigError, InputError, Unavailable, shown
from .hairpin import plan_hairpin, plan_host_hairpin
from .hostplan import Composed, HostPlan, _parse_all, compose, owner_of, plan_host, settle
from .intents import Held, Intent
from .model import Domain, ForwardSpec, IPAddress, Network, NetworkPort
from .names import domain_owner, network_owner, safe_name
from .plan import (
    Resolved,
    forward_families,
    resolve_network_forwards,
)
from .policy import (
    Neighbours,
    captured,
    check_claims,
    check_forwards,
    check_host,
    held_by_others,
    same_mac,
    withdraws,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only (a guest's start imports this module)
    from typing import Any

    from .backends.base import AnyBackend
    from .names import Tag

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def host_facts(backend: AnyBackend | None = None) -> Callable[[], host.HostFacts]:
    """How to read the host's facts in the backend's namespace, and root's configuration,
    when a check needs them."""
    return lambda: read_facts(backend)


def read_facts(backend: AnyBackend | None = None, log: Log | None = None) -> host.HostFacts:
    """The host's facts with root's configuration; ``log``: a wrong configuration is
    said there and read as no consent at all (``restore`` must put rules back), instead
    of refusing the operation (``ConfigError``)."""
    facts = host.HostFacts.read(_prefix(backend))
    try:
        facts.config = config.load()
    except ConfigError as exc:
        if log is None:
            raise
        log(f"no host service consents: {exc}")
    return facts


def _prefix(backend: AnyBackend | None) -> Sequence[str]:
    return backend.prefix if backend is not None else ()


def neighbours_of(backend: AnyBackend | None = None) -> Neighbours:
    """The host's neighbour table in the backend's namespace (``policy.Neighbours``),
    read once, and only if a guest's forwards reach a network where another guest has
    a port (``policy.check_own_addresses``): its module is imported only then."""
    read: list[Neighbours] = []

    def on(net: Network) -> Iterable[tuple[IPAddress, str]]:
        if not read:
            from .neighbours import reader
            read.append(reader(_prefix(backend)))
        return read[0](net)
    return on


# --------------------------------------------------------------------------- networks

def validate_network(net: Network) -> None:
    networks = state.load_networks()
    targets = resolve_network_forwards(net, networks)
    if net.forwards:
        label = f"network {shown(net.name)}"
        check_claims(label, network_owner(net.name), net.forwards, networks,
                     state.load_domains())
        check_host(label, network_owner(net.name), net.forwards, host_facts(), networks,
                   families=forward_families(net.forwards, targets))


def _recheck(subject: Network | Domain, rules: dict[str, Sequence[Intent]],
             held: Held, backend: AnyBackend,
             networks: Mapping[str, Network], log: Log,
             neighbours: Neighbours | None = None) -> None:
    """Re-plan into ``rules`` an owner an event may affect (``hostplan.settle``), checked
    against the ports the others' rules hold (``held``) and against the host: a forward
    now taking a port another owner or a host service holds keeps the rules it has (a
    guest that gains an IPv6 address gains the IPv6 ports too); one reaching what its
    owner does not own is withdrawn at once. The log says so in one line."""
    owner = owner_of(subject)

    def check(label: str, owner: str, specs: Sequence[ForwardSpec],
              targets: Sequence[Resolved]) -> None:
        check_forwards(label, owner, specs, targets, held_by_others(owner, held), networks,
                       host_facts(backend), held.get(owner, ()))

    settled = settle(subject, networks, check, held.get(owner, ()), state.network_ports,
                     host.network_leases, neighbours or neighbours_of(backend))
    rules[owner] = settled.rules
    if settled.problem is not None:
        log(("forwards withdrawn: " if settled.withdrawn else "keeping the current rules: ")
            + str(settled.problem))


def _settle_and_apply(rules: dict[str, Sequence[Intent]], affected: Iterable[Network | Domain],
                      before: Any, held: Held, backend: AnyBackend,
                      networks: Mapping[str, Network], log: Log) -> Applied:
    """A network event's one path after its own decisions (``rules``): every other owner
    it may affect re-planned (``_recheck``; the neighbour table read once for them
    all), then one write of them all."""
    neighbours = neighbours_of(backend)
    for subject in affected:
        if owner_of(subject) not in rules:
            _recheck(subject, rules, held, backend, networks, log, neighbours)
    return apply_rules(rules, backend=backend, log=log,
                       before=covering(backend, before, rules))


def _attached(dom: Domain, net: Network) -> bool:
    return any(nic.network == net.name or (nic.bridge and nic.bridge == net.bridge)
               for nic in dom.nics)


def _network_checked(net: Network, backend: AnyBackend
                     ) -> tuple[dict[str, Network], dict[str, Domain], Composed, Any, Held]:
    """Every check of a network's forwards against this host, under the state lock:
    (the networks with it, the guests, its rules composed, the firewall as read, the
    ports each owner's rules hold). InputError names the network, forward and reason."""
    networks = state.load_networks()
    networks[net.name] = net
    domains = state.load_domains()
    mine = compose(net, networks)
    before = backend.read(families_of({mine.owner: mine.rules}))
    held = backend.claims(before)
    if net.forwards:
        check_claims(mine.label, mine.owner, mine.resolved, networks, domains, held)
        check_host(mine.label, mine.owner, net.forwards, host_facts(backend), networks,
                   held.get(mine.owner, ()), mine.families)
    return networks, domains, mine, before, held


@retrying(lambda: None)  # after uninstall: nothing to check
def network_arriving(net: Network, backend: AnyBackend | None = None) -> None:
    """The checks of ``network_started`` and nothing else (no state, no rule):
    ``forward add --network`` checks a running network's new forwards with them before
    it writes anything."""
    if net.with_rules and net.forwards:
        with state.locked():
            _network_checked(net, backend or default_backend())


@retrying(lambda: Applied(""))
def network_started(net: Network, raw: bytes, backend: AnyBackend | None = None,
                    log: Log = _quiet) -> Applied:
    """Add the network's rules and forwards; re-add forwards of running guests on it.
    The state file is written after the rules: if they fail (or this is killed), libvirt
    counts the network as not started and runs no ``stopped``: nothing may say it is
    active."""
    if not net.with_rules:
        return Applied("")
    backend = backend or default_backend()
    with state.locked():
        networks, domains, mine, before, held = _network_checked(net, backend)
        # every owner this network could capture or contradict is re-checked: guests on
        # it, and every owner whose forwards reach into its subnets (a port taken
        # meanwhile keeps the rules it has; a forward now reaching someone else's is
        # withdrawn), and every other network: their fences (``plan_network``) name it
        reached = captured(net, held)
        affected: list[Network | Domain] = [
            dom for dom in domains.values()
            if domain_owner(dom.name) in reached or _attached(dom, net)]
        affected += [other for other in networks.values()
                     if other.name != net.name and other.managed]
        rules: dict[str, Sequence[Intent]] = {mine.owner: mine.rules}
        applied = _settle_and_apply(rules, affected, before, held, backend, networks, log)
        state.save_network(net.name, raw)
        state.mark_starting(net.name)
    log(f"network {shown(net.name)} ({net.bridge}): rules for "
        + ", ".join(sorted(rules)) + (" applied" if applied.payload else " already in place"))
    return applied


@retrying(lambda: Applied(""))
def network_stopped(net: Network, backend: AnyBackend | None = None, log: Log = _quiet) -> Applied:
    """Remove everything that targets the network: its rules and guests' forwards to it.
    The rules first: if their removal fails, the state file stays, and as libvirt removed
    its status file before calling us, ``restore`` removes what is left."""
    bridge = net.bridge
    with state.locked():
        state.forget_starting(net.name)
        if not net.with_rules:
            state.forget_network(net.name)
            return Applied("")
        rules: dict[str, Sequence[Intent]] = {network_owner(net.name): ()}
        networks = state.load_networks()
        networks.pop(net.name, None)  # its state file goes only once its rules are gone
        if any(n.managed and n.bridge for n in networks.values()):
            # the others' fences (``plan_network``) no longer name its bridge
            backend = backend or default_backend()
            held = backend.claims(backend.read())
            for other in networks.values():
                if other.managed:
                    _recheck(other, rules, held, backend, networks, log)
        applied = apply_rules(rules, drop=(lambda t: t.bridge == bridge) if bridge else None,
                              backend=backend, log=log)
        state.forget_network(net.name)
    log(f"network {shown(net.name)} ({bridge}): rules removed")
    return applied


@retrying(lambda: Applied(""))
def network_port(net: Network, raw: bytes, port: NetworkPort | None, deleted: bool,
                 backend: AnyBackend | None = None, log: Log = _quiet) -> Applied:
    """port-created/-deleted/updated: keep the network's and the owner guest's rules
    current (after a daemon restart libvirt re-creates every port, then reconnects). An
    owner whose re-planned forwards would take a port someone else holds keeps the rules
    it has."""
    if not net.managed:
        return Applied("")
    backend = backend or default_backend()
    with state.locked():
        state.save_network(net.name, raw)
        if port and port.mac and port.owner_name is not None:
            state.record_port(net.name, port.mac, port.owner_name, deleted)
        networks = state.load_networks()
        networks[net.name] = net
        owner = port.owner_name if port else None
        domains = state.load_domains()
        rules: dict[str, Sequence[Intent]] = {}
        mac = port.mac if port else None
        twins = same_mac(net, domains, mac, owner) if mac and owner else []
        if not deleted:
            for other in twins:
                rules[domain_owner(other)] = ()  # its forwards may reach this guest now
                log(f"domain {shown(other)}: forwards removed: its NIC {mac} on network "
                    f"{shown(net.name)} has the MAC of the port of domain {shown(owner)}")
        before = backend.read()
        held = backend.claims(before)
        again = captured(net, held) | {domain_owner(o) for o in twins if deleted}
        if owner and owner in domains:
            again.add(domain_owner(owner))
        affected: list[Network | Domain] = [net]
        for dom in domains.values():  # the port's guest, guests whose twin left, and
            if domain_owner(dom.name) in again:  # every guest whose forwards reach in here
                if deleted and mac and dom.name == owner:
                    dom = replace(dom, nics=tuple(n for n in dom.nics if n.mac != mac))
                affected.append(dom)
        affected += [other for other in networks.values()
                     if other.name != net.name and network_owner(other.name) in again]
        return _settle_and_apply(rules, affected, before, held, backend, networks, log)


# --------------------------------------------------------------------------- domains

def _domain_checked(dom: Domain, backend: AnyBackend) -> tuple[tuple[Intent, ...], object]:
    """Every check of a guest's forwards against this host, under the state lock:
    (its rules, the firewall as read). InputError names the guest, forward and reason."""
    networks = state.load_networks()
    mine = compose(dom, networks, state.network_ports, host.network_leases,
                   neighbours_of(backend))
    before = backend.read(families_of({mine.owner: mine.rules}))
    held = backend.claims(before, near=mine.resolved, mine=mine.owner)  # what could clash
    try:
        check_claims(mine.label, mine.owner, mine.resolved, networks,
                     state.load_domains(known=frozenset(held)), held)
    except Unavailable:  # a clash: named by the holder's forward as declared
        check_claims(mine.label, mine.owner, mine.resolved, networks, state.load_domains(),
                     held)
        raise
    check_host(mine.label, mine.owner, dom.forwards, host_facts(backend), networks,
               held.get(mine.owner, ()), mine.families)
    return mine.rules, before


@retrying(lambda: None)  # after uninstall: nothing to check
def domain_arriving(dom: Domain, backend: AnyBackend | None = None) -> None:
    """qemu ``migrate``, on the destination: the checks of ``domain_started`` and
    nothing else (no state, no rule). A host port held here, a ``host-ip`` that is not
    this host's, ... refuse the migration before anything moves; the guest keeps running
    on the source with its forwards. ``start`` checks again and applies when it arrives."""
    if not dom.forwards:
        return
    with state.locked():
        _domain_checked(dom, backend or default_backend())


@retrying(lambda: Applied(""))
def domain_started(dom: Domain, raw: bytes, backend: AnyBackend | None = None, log: Log = _quiet,
                   running: bool = False) -> Applied:
    """Resolve the guest's forwards, refuse conflicts, add its rules (qemu start,
    reconnect, replay of one guest). ``running``: the guest runs whatever happens here
    (``reconnect``): a failure keeps its state, so that ``restore`` brings it back."""
    owner = domain_owner(dom.name)
    backend = backend or default_backend()
    with state.locked():
        try:
            rules, before = _domain_checked(dom, backend)
        except InputError as exc:  # fail closed: rules it had (reconnect) go
            if withdraws(exc) and apply_rules({owner: ()}, backend=backend, log=log).payload:
                log(f"forwards withdrawn: {exc}")
            if withdraws(exc):
                state.forget_domain(dom.name)
            raise
        # The state is written first: it is what lets stopped/release remove the rules
        # (a start that fails or is killed is followed by them). If the write fails, the
        # old rules are back (revert); a guest being started keeps the state only while
        # rules of it are in the kernel, a running one (reconnect) keeps it.
        if dom.forwards:
            state.save_domain(dom.name, raw)
        try:
            applied = apply_rules({owner: rules}, backend=backend, log=log, before=before)
        except ApplyError:
            if not running and owner not in backend.claims(backend.read()):
                state.forget_domain(dom.name)
            raise
        state.forget_stopped(owner)
        follow(backend, {owner: plan_hairpin(dom, rules)}, log)  # its own forwards' way back
        if not dom.forwards:
            state.forget_domain(dom.name)
    if dom.forwards:
        log(f"domain {shown(dom.name)}: {len(dom.forwards)} forward(s), "
            + ("applied" if applied.payload else "already in place")
            + "".join(f" (IPv{f} left out)" for f in sorted(applied.skipped)))
    elif applied.payload:
        log(f"domain {shown(dom.name)}: forwards removed")
    return applied


# --------------------------------------------------------------------------- whole host

@dataclass
class Replayed:
    """What ``replay`` wrote and the problems it found."""

    payload: str
    problems: list[str]
    owners: int


def _uncollected(operation: Callable[..., Replayed]) -> Callable[..., Replayed]:
    """``operation`` run with the cyclic garbage collector paused: a replay of hundreds
    of guests builds tens of thousands of objects that all live until it returns, and
    the collector would walk them again and again (dozens of passes, milliseconds) to
    find nothing; reference counting frees as before, the collector runs after."""
    def run(*args: Any, **kwargs: Any) -> Replayed:
        import gc
        if not gc.isenabled():
            return operation(*args, **kwargs)
        gc.disable()
        try:
            return operation(*args, **kwargs)
        finally:
            gc.enable()
    run.__doc__, run.__name__ = operation.__doc__, operation.__name__
    run.__wrapped__ = operation  # type: ignore[attr-defined]
    return run


@_uncollected
@retrying(lambda: Replayed("", [], 0))
def replay(network_xmls: Iterable[bytes], domain_xmls: Iterable[bytes], dry_run: bool = False,
           backend: AnyBackend | None = None, log: Log = _quiet) -> Replayed:
    """Re-derive every rule from the live XML of active networks and running guests:
    add what is missing, remove our rules that no longer match, fix the jumps, and
    rewrite the state files. An owner that fails keeps whatever rules it has. The way an
    install starts: it lifts ``uninstall``'s marker."""
    backend = backend or default_backend()
    problems: list[str] = []
    networks, domains, broken, kept = _parse_all(network_xmls, domain_xmls, problems)
    with state.locked(installing=True):
        if not dry_run:
            state.mark_installed()
            state.sweep()
        before = backend.read()
        same: set[str] = set()  # state files that hold their live XML: not read again
        planned = plan_host({n: net for n, (net, _r) in networks.items()},
                         {n: dom for n, (dom, _r) in domains.items()},
                         holders=backend.claims(before), broken=broken,
                         facts=read_facts(backend),
                         reserved=[domain_owner(n) for n in state.domain_names(
                             {n: raw for n, (_dom, raw) in domains.items()}, same=same)
                             if n in domains],
                         ports=state.network_ports, neighbours=neighbours_of(backend))
        problems += planned.problems

        def drop(tagged: Tag) -> bool:
            return tagged.owner not in planned.failed

        if dry_run:
            before = covering(backend, before, planned.rules)
            payload = backend.change(before, planned.rules, drop).text
        else:
            payload = apply_rules(planned.rules, drop=drop, backend=backend, log=log,
                                  before=before).payload
            follow(backend, plan_host_hairpin({n: d for n, (d, _r) in domains.items()},
                                              planned.rules),
                   log, everyone=True, keep=planned.failed)
            state.replace_all(
                {name: raw for name, (net, raw) in networks.items() if net.with_rules},
                {name: raw for name, (dom, raw) in domains.items() if dom.forwards},
                keep=kept, unchanged=same)
            for owner in state.stopped_owners():  # every stale rule is gone now
                state.forget_stopped(owner)
            _clear_others(backend, log)
    _report("replay", planned, payload, problems, dry_run, log)
    return Replayed(payload, problems, len(planned.rules))


@retrying(lambda: Replayed("", [], 0))
def restore(jumps_only: bool = False, backend: AnyBackend | None = None, log: Log = _quiet,
            lock_timeout: float | None = None) -> Replayed:
    """Put our rules back from our own state and the kernel, never asking libvirt (it
    runs from UFW's after.init and from libvirt's own unit, where a call into libvirt
    would deadlock a boot). Owners in the state are re-applied; rules of owners the
    state knows nothing of are left alone (only ``replay``, which asks libvirt, may
    call them stale), except what libvirt and our state say is stopped: a network
    libvirt's status files do not list (our ``started`` of it failed or was killed, or
    its ``stopped`` failed), and an owner whose removal failed (``state.stopped_owners``).
    ``jumps_only``: just put our jumps back first."""
    backend = backend or default_backend()
    problems: list[str] = []
    with state.locked(lock_timeout):
        before = backend.read()
        if jumps_only:
            payload = apply_rules({}, backend=backend, log=log, before=before).payload
            if payload:
                log("restore: our jumps put back first")
            return Replayed(payload, [], 0)
        state.sweep()
        networks = state.load_networks(problems.append)
        gone, stopped = _stopped(networks, backend.owners(before))
        bridges = {net.bridge for net in stopped.values() if net.bridge}
        domains = state.load_domains(problems.append)
        planned = plan_host(networks, domains,
                            holders=backend.claims(before),
                            facts=read_facts(backend, problems.append),
                            reserved=[domain_owner(n) for n in domains],
                            ports=state.network_ports, neighbours=neighbours_of(backend))
        problems += planned.problems

        def drop(tagged: Tag) -> bool:  # guests' forwards into a stopped network go with it
            return tagged.bridge in bridges and tagged.owner not in planned.rules

        rules = {**{o: () for o in gone}, **planned.rules}
        payload = apply_rules(rules, drop=drop if bridges else None, backend=backend,
                              log=log, before=before).payload
        follow(backend, plan_host_hairpin(domains, planned.rules), log)
        for owner in gone:
            state.forget_stopped(owner)
        for name in stopped:
            state.forget_network(name)
        _clear_others(backend, log)
    _report("restore", planned, payload, problems, False, log)
    return Replayed(payload, problems, len(planned.rules))


def _stopped(networks: dict[str, Network],
             in_kernel: Iterable[str]) -> tuple[set[str], dict[str, Network]]:
    """(owners whose rules are stale, the networks among them) as our state and
    libvirt's status files say, without asking libvirt; the stopped networks are taken
    out of ``networks``. A network libvirt does not list is stopped unless our
    ``started`` of it finished after libvirt last changed its status files (libvirt is
    writing its file now); so are networks with rules but neither state nor status file,
    and owners whose removal failed."""
    activity = state.NetworkActivity()
    stopped = {name: net for name, net in networks.items()
               if not activity.active(name) and not activity.starting(name)}
    for name in stopped:
        del networks[name]
    known = state.state_network_tokens() | {safe_name(n) for n in networks}
    gone = set(state.stopped_owners()) | {network_owner(n) for n in stopped}
    gone |= {o for o in in_kernel
             if o.startswith("n=") and o[2:] not in known and activity.stale(o[2:])}
    return gone, stopped


def watch_jumps(seconds: float, interval: float = 1.0, backend: AnyBackend | None = None,
                log: Log = _quiet, lock_timeout: float | None = None) -> int:
    """Put our jumps back first now, and again whenever they lose first place during the
    next ``seconds``: libvirt reloads its networks' rules (and puts its jumps at position
    1) a few seconds after its unit counts as started. The number of repairs."""
    deadline = time.monotonic() + seconds
    repaired = 0
    while os.path.exists(__file__):  # uninstalled meanwhile: nothing more to keep
        if restore(jumps_only=True, backend=backend, log=log,
                   lock_timeout=lock_timeout).payload:
            repaired += 1
        if time.monotonic() + interval > deadline:
            break
        time.sleep(interval)
    return repaired


def _report(what: str, planned: HostPlan, payload: str, problems: list[str],
            dry_run: bool, log: Log) -> None:
    """The outcome in one line (the problems themselves are the caller's to show)."""
    if not dry_run:
        log(f"{what}: {len(planned.rules)} owner(s) with rules, "
            + ("changed" if payload else "nothing to change")
            + (f", {len(problems)} problem(s)" if problems else ""))


def flush(backend: AnyBackend | None = None) -> Applied:
    """Remove all our rules and chains, and our accepts in libvirt's nftables table."""
    backend = backend or default_backend()
    with state.locked(installing=True):
        return _flush(backend)


def _clear_others(backend: AnyBackend, log: Log = _quiet, flushing: bool = False) -> str:
    """Remove what other backends of ours hold (``firewall_backend`` was switched): run
    after ``backend`` holds every forward, so none is lost meanwhile; their conntrack
    flows stay (the same forwards carry them on). ``flushing``: ``backend`` was just
    cleared too, and nothing of it is put back."""
    from .backends import others, proved_empty
    text = ""
    for name, other in others(backend):
        if proved_empty(name, backend.prefix):  # most often: no process to read it
            continue
        before = other.read()
        if other.has_rules(before):
            change = other.clear(before)
            other.write(change)
            text += change.text
            log(f"firewall backend switched: every rule of ours in {name} removed")
    if text and not flushing:  # the other's clear takes every rule with our tag in
        # libvirt's chains, the selected backend's glue there too: its entry points back,
        # as restore --jumps-only puts them
        text += apply_rules({}, backend=backend, log=log).payload
    return text


def _flush(backend: AnyBackend) -> Applied:
    change = backend.clear(backend.read())
    backend.write(change)
    text = change.text + _clear_others(backend, flushing=True)
    text += "".join(f"# {line}\n" for line in BridgePorts.beside(backend).release_all())
    return Applied(text)


def uninstall(backend: AnyBackend | None = None) -> Applied:
    """What an uninstaller calls once no new hook can start (hook files and UFW's
    ``after.init`` entry removed): under the state lock, remove all our rules, chains and
    accepts and every state file, and leave the ``uninstalled`` marker, so that a hook
    or ``restore`` that was already waiting for the lock, or still starting, applies
    nothing. ``replay`` (or ``state.mark_installed``) lifts the marker at install."""
    backend = backend or default_backend()
    with state.locked(installing=True):
        flushed = _flush(backend)
        state.clear_for_uninstall()
    return flushed
