"""The backend contract (its tests: tests/unit/test_backend_contract_fake.py and
tests/kernel/test_backend_contract.py): the same behaviours, through the one interface
(``backends.base.Backend``), for every backend: the fake (iptables in memory, the unit
tier), every backend of the registry and every participant of a transaction (our accepts
in libvirt's nftables table), on a real kernel in a network namespace.

A new backend is one module and one line in ``backends.REGISTRY``: it is then a
parameter of ``TestOnTheKernel`` by itself (with its ``Subject`` in ``KERNEL_SUBJECTS``:
how to see others' rules in its kernel, and take one of ours away), and must pass all of
this.
"""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import FIXTURES, need_root_tools

from kvmufw_hook import backends
from kvmufw_hook.errors import ApplyError
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.intents import Forward
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml

DUAL = parse_network_xml((FIXTURES / "net-dual.xml").read_bytes())  # bridge virbr6
WEB1 = parse_domain_xml((FIXTURES / "dom-dual.xml").read_bytes())
NETWORK, DOMAIN = "n=dual", "d=web1"
BOTH = (4, 6)


def owners():
    """A nat network with forwards of its own and a guest's forwards, in both families."""
    return {NETWORK: owner_rules(DUAL), DOMAIN: owner_rules(WEB1, {"dual": DUAL})}


class Subject:
    """A backend under test, with what the test needs from its kernel: what is not ours
    there (must never change), and a way to take one of an owner's rules away behind the
    backend's back (so that a change made before is refused by the kernel)."""

    holds_ports = True  # whether its rules hold host ports (``claims``)

    def __init__(self, backend) -> None:
        self.backend = backend

    def foreign(self) -> str:
        raise NotImplementedError

    def sabotage(self, owner: str) -> None:
        raise NotImplementedError


class Fake(Subject):
    def __init__(self) -> None:
        from fakebackend import FakeBackend
        super().__init__(FakeBackend())
        self.backend.tables["filter"]["FORWARD"].append("-A FORWARD -o eth9 -j ACCEPT")

    def foreign(self) -> str:
        return "".join(l for f in BOTH for l in self.backend.save(f).splitlines(True)
                       if "KVMUFW" not in l)

    def sabotage(self, owner: str) -> None:
        chain = self.backend.families[6]["nat"]["KVMUFW-PREROUTING"]
        chain.remove(next(l for l in chain if f"kvmufw:{owner}," in l))


class Iptables(Subject):
    """A registered backend whose rules live in iptables (``iptables``)."""

    def __init__(self, name: str, ns) -> None:
        super().__init__(backends.backend_only(name, prefix=ns.prefix))
        self.ns = ns
        ns.run("iptables", "-N", "ufw-before-forward")
        ns.run("iptables", "-A", "FORWARD", "-j", "ufw-before-forward")

    def foreign(self) -> str:
        """Others' chains and rules (iptables-nft shows a table's built-in chains once
        anyone has a rule in that table: those are not anyone's rules)."""
        return "".join(l for f in BOTH for l in self.ns.save(f).splitlines(True)
                       if "KVMUFW" not in l and l.startswith(("-A ", ":"))
                       and not re.match(r":[A-Z]+ (ACCEPT|DROP) ", l))

    def sabotage(self, owner: str) -> None:
        line = next(l for l in self.ns.save(6).splitlines()
                    if l.startswith("-A KVMUFW-PREROUTING ") and f"kvmufw:{owner}," in l)
        self.ns.run("ip6tables", "-t", "nat", "-D", *shlex.split(line)[1:])


LIBVIRT_TABLE = """\
add table {family} libvirt_network
add chain {family} libvirt_network forward {{ type filter hook forward priority 0; policy accept; }}
add chain {family} libvirt_network guest_output
add chain {family} libvirt_network guest_input
add rule {family} libvirt_network forward counter jump guest_output
add rule {family} libvirt_network forward counter jump guest_input
add rule {family} libvirt_network guest_output iif "virbr6" counter reject
add rule {family} libvirt_network guest_input oif "virbr6" counter reject
"""


class LibvirtNft(Subject):
    """Our accepts in libvirt's ``ip`` and ``ip6 libvirt_network`` tables (made here as
    libvirt makes them for a nat network on virbr6)."""

    holds_ports = False  # an accept lets a translated connection in, it takes no port

    def __init__(self, ns) -> None:
        from kvmufw_hook.backends.accepts import LibvirtAccepts
        super().__init__(LibvirtAccepts(ns.prefix))
        self.ns = ns
        ns.run("ip", "link", "add", "virbr6", "type", "bridge")
        ns.run("nft", "-f", "-", input="".join(LIBVIRT_TABLE.format(family=f)
                                               for f in ("ip", "ip6")))

    def listing(self, family: str) -> str:
        return self.ns.run("nft", "-a", "list", "table", family, "libvirt_network").stdout

    def foreign(self) -> str:
        return "".join(re.sub(r"counter packets \d+ bytes \d+", "counter", l)
                       for f in ("ip", "ip6") for l in self.listing(f).splitlines(True)
                       if "kvmufw:" not in l)

    def sabotage(self, owner: str) -> None:
        line = next(l for l in self.listing("ip6").splitlines() if f"kvmufw:{owner}," in l)
        chain = "guest_input" if line.strip().startswith("oif") else "guest_output"
        handle = line.rsplit(" ", 1)[1]
        self.ns.run("nft", "delete", "rule", "ip6", "libvirt_network", chain, "handle", handle)


class NftTable(Subject):
    """Our own ``table inet kvmufw`` (``nftables``), with UFW's chain beside it and its
    glue at the top of filter INPUT and FORWARD."""

    def __init__(self, name: str, ns) -> None:
        need_root_tools("nft")
        super().__init__(backends.backend_only(name, prefix=ns.prefix))
        self.ns = ns
        ns.run("iptables", "-N", "ufw-before-forward")
        ns.run("iptables", "-A", "FORWARD", "-j", "ufw-before-forward")

    def foreign(self) -> str:
        """Others' iptables rules and nftables tables: everything but our table and our
        glue (and the empty built-in chains iptables-nft shows once a table is used)."""
        ipt = "".join(l for f in BOTH for l in self.ns.save(f).splitlines(True)
                      if "kvmufw:" not in l and l.startswith(("-A ", ":"))
                      and not re.match(r":[A-Z]+ (ACCEPT|DROP) ", l))
        tables = [t for t in self.ns.run("nft", "list", "tables").stdout.splitlines()
                  if t.strip() != "table inet kvmufw" and " filter" not in t]
        return ipt + "\n".join(tables)

    def sabotage(self, owner: str) -> None:
        from kvmufw_hook.backends.nft import TABLE
        element = next(e for e in self.backend.read().table.elements
                       if e.comment.startswith(f"kvmufw:{owner},") and e.set.startswith("dnat6"))
        self.ns.run("nft", "delete", "element", "inet", TABLE, element.set,
                    f"{{ {element.key} }}")


def apply(backend, intents, drop=None):
    change = backend.change(backend.read(BOTH), intents, drop)
    backend.write(change)
    return change


class Contract:
    """The behaviours; ``subject`` is given by each tier below."""

    def test_apply_puts_every_owner_in_and_nothing_else_changes(self, subject):
        backend, before = subject.backend, subject.foreign()
        assert not backend.has_rules(backend.read(BOTH))
        assert apply(backend, owners())
        ruleset = backend.read(BOTH)
        assert all(backend.present(ruleset, intents) for intents in owners().values())
        assert backend.owners(ruleset) == {NETWORK, DOMAIN} or not subject.holds_ports
        assert backend.has_rules(ruleset) and backend.entry_problems(ruleset) == []
        assert subject.foreign() == before

    def test_applying_twice_changes_nothing(self, subject):
        backend = subject.backend
        apply(backend, owners())
        again = backend.change(backend.read(BOTH), owners())
        assert not again and again.text == ""

    def test_removal_by_owner_is_exact(self, subject):
        backend = subject.backend
        apply(backend, owners())
        apply(backend, {DOMAIN: ()})
        ruleset = backend.read(BOTH)
        assert DOMAIN not in backend.owners(ruleset)
        assert backend.present(ruleset, owners()[NETWORK])
        assert not any(backend.present(ruleset, [f]) for f in owners()[DOMAIN]
                       if isinstance(f, Forward) and f.family == 4)
        assert apply(backend, {DOMAIN: ()}).text == ""  # stopping twice fails nothing

    def test_a_refused_write_is_reverted_whole(self, subject):
        backend = subject.backend
        apply(backend, owners())
        stale = backend.read(BOTH)
        subject.sabotage(DOMAIN)  # the kernel now refuses a removal made from ``stale``
        with pytest.raises(ApplyError):
            backend.write(backend.change(stale, {DOMAIN: ()}))
        backend.write(backend.revert(backend.read(BOTH), stale))
        ruleset = backend.read(BOTH)
        assert all(backend.present(ruleset, intents) for intents in owners().values())
        assert not backend.change(ruleset, owners())  # as it was: nothing left to do

    def test_claims_are_the_host_ports_of_each_owners_forwards(self, subject):
        backend = subject.backend
        apply(backend, owners())
        claims = backend.claims(backend.read(BOTH))
        for owner, intents in owners().items():
            declared = {(f.proto, f.host_ports, f.guest) for f in intents
                        if isinstance(f, Forward)}
            held = {(c.proto, c.host_port, c.guest) for c in claims.get(owner, ())}
            assert held <= declared
            assert held == declared or not subject.holds_ports
        near = WEB1.forwards[:1]  # only what could overlap these (a guest's start asks so)
        limited = backend.claims(backend.read(BOTH), near=near, mine=NETWORK)
        assert {(c.proto, c.host_port) for c in limited.get(DOMAIN, ())} <= {
            (near[0].proto, near[0].host_port)}

    def test_clear_removes_all_ours_and_only_ours(self, subject):
        backend, before = subject.backend, subject.foreign()
        apply(backend, owners())
        backend.write(backend.clear(backend.read(BOTH)))
        ruleset = backend.read(BOTH)
        assert not backend.has_rules(ruleset) and backend.owners(ruleset) == set()
        assert subject.foreign() == before
        assert not backend.clear(ruleset)  # nothing left: clearing again writes nothing


# name -> how its kernel is looked at and broken: every registered backend and every
# participant of the registry's transaction (a new backend adds its line here)
KERNEL_SUBJECTS = {"iptables": Iptables, "libvirt-nft": LibvirtNft, "nftables": NftTable}
