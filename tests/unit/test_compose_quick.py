"""``compose`` (iptables) passes over a chain where none of the changed owners has a
line (a start amid thousands of rules): it must give exactly what reading every line
gives, for any mix of owners added, changed, kept and removed."""

import random

from kvmufw_hook.backends import iptables
from kvmufw_hook.backends.iptables import IptablesBackend, Ruleset, Snapshot
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml

GUESTS = 10
LAB = ("<network><name>lab</name><forward mode='nat'/><bridge name='virbr9'/>"
       "<ip address='10.0.0.1' prefix='24'><dhcp>"
       + "".join(f"<host mac='52:54:00:00:00:{i:02x}' ip='10.0.0.{10 + i}'/>"
                 for i in range(GUESTS + 4))
       + "</dhcp></ip></network>").encode()


def _intents(name: str, nic: int, ports: int):
    forwards = "".join(f'<kvmufw:forward host-port="{20000 + 100 * nic + j}" '
                       f'guest-port="{22 + j}"/>' for j in range(ports))
    dom = parse_domain_xml((
        f"<domain><name>{name}</name><metadata><kvmufw:forwards xmlns:kvmufw='urn:kvmufw:1'>"
        f"{forwards}</kvmufw:forwards></metadata><devices><interface type='network'>"
        f"<mac address='52:54:00:00:00:{nic:02x}'/><source network='lab'/></interface>"
        "</devices></domain>").encode())
    return owner_rules(dom, {"lab": parse_network_xml(LAB)})


def _saved(payload: str) -> str:
    """A restore payload of empty tables as iptables-save prints what it wrote."""
    out = []
    for line in payload.splitlines():
        if line.startswith("-I "):  # a jump at position 1
            chain, _, rest = line[3:].partition(" 1 ")
            line = f"-A {chain} {rest}"
        out.append(line)
    return "\n".join(out) + "\n"


def test_a_chain_without_the_changed_owners_is_composed_as_by_reading_every_line(
        monkeypatch):
    rng = random.Random(7)
    host = {f"d=g{i}": _intents(f"g{i}", i, 1 + i % 3) for i in range(GUESTS)}
    host["n=lab"] = owner_rules(parse_network_xml(LAB))
    for _ in range(60):
        present = {o: r for o, r in host.items() if rng.random() < 0.7}
        snap = Snapshot.parse(_saved(IptablesBackend.render(present)))
        changed = {}
        for owner in rng.sample([*sorted(host), "d=new1", "d=new2"], rng.randrange(1, 5)):
            kind = rng.choice(("remove", "same", "other"))
            nic = GUESTS + 1 if owner == "d=new1" else GUESTS + 2
            name = owner[2:]
            if kind == "remove":
                changed[owner] = ()
            elif kind == "same" and owner in host:
                changed[owner] = host[owner]
            elif owner.startswith("d="):
                changed[owner] = _intents(name, nic if "new" in owner else int(name[1:]), 2)
        answers = []
        for quick in (True, False):
            if not quick:
                monkeypatch.setattr(iptables, "_holds_any", lambda lines, marks: True)
            change = IptablesBackend.change(Ruleset({4: snap}), changed)
            answers.append((change.text, change.ended))
            monkeypatch.undo()
        assert answers[0] == answers[1], changed.keys()
