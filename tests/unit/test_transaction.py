"""One change across participants (``backends.transaction``): our rules first, each
participant after them; a refusal anywhere puts every participant back, and a change
that only a participant needs is written all the same."""

import pytest
from conftest import FIXTURES
from fakebackend import FakeBackend

from kvmufw_hook.apply import Stale, apply_rules
from kvmufw_hook.backends.transaction import Transaction
from kvmufw_hook.errors import ApplyError
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml

DUAL = parse_network_xml((FIXTURES / "net-dual.xml").read_bytes())
WEB1 = parse_domain_xml((FIXTURES / "dom-dual.xml").read_bytes())


class Kept:
    """A participant in memory: owner -> its intents, as a table elsewhere would keep
    them; ``refuse`` makes its next write fail (nothing of it is in, as ``nft -f``)."""

    name, prefix = "kept", ()

    def __init__(self, seen: str | None = None) -> None:
        self.held: dict[str, tuple] = {}
        self.refuse = False
        self.writes = 0
        self.seen = seen

    class Change(dict):
        skipped: dict = {}  # noqa: RUF012 - never written to

        @property
        def text(self):
            return "".join(f"# kept {owner}\n" for owner in sorted(self.get("target", ())))

        def ends_forwards(self):
            return False

    class Ruleset(dict):
        unavailable: dict = {}  # noqa: RUF012 - never written to
        families = (4, 6)

    def read(self, families=()):
        return self.Ruleset(self.held)

    def change(self, ruleset, intents, drop=None):
        target = {o: tuple(i) for o, i in ruleset.items()
                  if o not in intents and not (drop and drop(o))}
        target.update({o: tuple(i) for o, i in intents.items() if i})
        return self.Change({"target": target}) if target != dict(ruleset) else self.Change()

    def write(self, change):
        if not change:
            return
        if self.refuse:
            self.refuse = False
            raise ApplyError("kept: refused")
        self.writes += 1
        self.held = dict(change["target"])

    def revert(self, now, before):
        return self.change(now, {o: () for o in now} | dict(before))

    def clear(self, ruleset):
        return self.change(ruleset, {o: () for o in ruleset})

    def render(self, intents):
        return ""

    def present(self, ruleset, intents):
        intents = tuple(intents)
        return not intents or any(set(intents) <= set(i) for i in ruleset.values())

    def claims(self, ruleset, near=None, mine=None):
        return {owner: [] for owner in ruleset}

    def end_flows(self, change, log):
        pass

    def owners(self, ruleset):
        return set(ruleset)

    def has_rules(self, ruleset):
        return bool(ruleset)

    def entry_problems(self, ruleset):
        return []

    def libvirt_backend(self, ruleset):
        return self.seen

    def libvirt_missing(self, ruleset):
        return []


def owners():
    return {"n=dual": owner_rules(DUAL), "d=web1": owner_rules(WEB1, {"dual": DUAL})}


def test_both_participants_get_the_change_and_applying_twice_writes_nothing():
    ours, theirs = FakeBackend(), Kept()
    both = Transaction((ours, theirs))
    assert apply_rules(owners(), backend=both).payload.endswith("# kept d=web1\n# kept n=dual\n")
    assert set(theirs.held) == {"n=dual", "d=web1"} and "kvmufw:d=web1," in ours.save(6)
    assert apply_rules(owners(), backend=both).payload == ""
    assert all(both.present(both.read((4, 6)), i) for i in owners().values())


def test_a_participant_refusing_puts_our_rules_back():
    ours, theirs = FakeBackend(), Kept()
    both = Transaction((ours, theirs))
    apply_rules({"n=dual": owners()["n=dual"]}, backend=both)
    before, writes = (ours.save(4), ours.save(6)), len(ours.writes)
    theirs.refuse = True
    with pytest.raises(Stale):
        apply_rules({"d=web1": owners()["d=web1"]}, backend=both)
    assert len(ours.writes) > writes  # ours was written, then put back
    assert (ours.save(4), ours.save(6)) == before and set(theirs.held) == {"n=dual"}


def test_what_only_a_participant_lacks_is_written_alone():
    ours, theirs = FakeBackend(), Kept()
    both = Transaction((ours, theirs))
    apply_rules(owners(), backend=both)
    theirs.held.pop("d=web1")  # libvirt rebuilt its table: our accepts went with it
    writes = len(ours.writes)
    assert apply_rules(owners(), backend=both).payload == "# kept d=web1\n# kept n=dual\n"
    assert len(ours.writes) == writes and set(theirs.held) == {"n=dual", "d=web1"}


def test_clear_takes_every_participant_empty():
    ours, theirs = FakeBackend(), Kept()
    both = Transaction((ours, theirs))
    apply_rules(owners(), backend=both)
    both.write(both.clear(both.read()))
    ruleset = both.read()
    assert not both.has_rules(ruleset) and both.owners(ruleset) == set() and not theirs.held


def test_libvirts_backend_is_what_a_participant_sees_before_our_rules():
    assert Transaction((FakeBackend(), Kept("nftables"))).libvirt_backend(
        Transaction((FakeBackend(), Kept("nftables"))).read()) == "nftables"
    ours = FakeBackend()
    ours.tables["filter"]["LIBVIRT_FWI"] = []
    both = Transaction((ours, Kept()))
    assert both.libvirt_backend(both.read()) == "iptables"
