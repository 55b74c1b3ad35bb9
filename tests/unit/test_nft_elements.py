"""The nftables backend's rendering, pure: each planned rule becomes elements of our
sets and maps with its owner tag as comment, read back from ``nft list`` text as the
same elements, and a change is element adds and deletes only."""

from kvmufw_hook.backends.nft import (
    CHAINS,
    EXACT,
    IPT_GLUE,
    LIBVIRT_GLUE,
    Element,
    Glue,
    NftBackend,
    Ruleset,
    Table,
    _glue_change,
    elements,
    forward_elements,
    wanted,
)
from kvmufw_hook.backends.rules import expand
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml

NET = parse_network_xml(b"""<network><name>lab</name><forward mode='nat' dev='eth0'/>
  <bridge name='virbr1'/><ip address='10.0.0.1' prefix='24'><dhcp>
  <host mac='52:54:00:00:00:05' ip='10.0.0.5'/></dhcp></ip>
  <ip family='ipv6' address='fd00::1' prefix='64'/></network>""")
DOM = parse_domain_xml(b"""<domain><name>g5</name><metadata><forwards xmlns="urn:kvmufw:1">
    <forward proto="udp" host-port="6000-6002" guest-port="5000-5002"/>
    <forward proto="udp" host-port="7000-7999"/>
    <forward host-port="8443" guest-port="443" source="198.51.100.0/24,192.0.2.7"/>
    <forward host-port="2222" guest-port="22" guest-ip="10.0.0.5,fd00::5"/>
  </forwards></metadata><devices><interface type='network'>
    <source network='lab' bridge='virbr1'/><mac address='52:54:00:00:00:05'/>
  </interface></devices></domain>""")
RULES = {"n=lab": owner_rules(NET), "d=g5": owner_rules(DOM, {"lab": NET})}


def dnat(owner: str = "d=g5") -> list[Element]:
    return [e for e in wanted({owner: RULES[owner]}) if e.set.startswith("dnat")]


def test_a_shifted_range_is_one_element_per_port_and_a_kept_range_one_interval():
    found = {(e.set, e.key, e.value) for e in dnat()}
    assert {("dnat4_port", f"0.0.0.0/0 . 0.0.0.0/0 . udp . {6000 + i}", f"10.0.0.5 . {5000 + i}")
            for i in range(3)} <= found
    assert ("dnat4_addr", "0.0.0.0/0 . 0.0.0.0/0 . udp . 7000-7999", "10.0.0.5") in found


def test_a_forward_of_one_port_from_anyone_is_an_exact_key_in_every_set_it_needs():
    """The common forward is looked up in hash sets only: a new connection through it
    costs the same whatever the number of forwards."""
    mine = [e for e in wanted({"d=g5": RULES["d=g5"]}) if e.key.endswith(" . 22")
            or e.key.endswith("tcp . 2222") or e.set.startswith("hairnet")]
    found = {(e.set, e.key, e.value) for e in mine}
    assert ("dnat6_any", "tcp . 2222", "fd00::5 . 22") in found
    assert ("dnat4_any", "tcp . 2222", "10.0.0.5 . 22") in found
    assert ("guestx4", '"virbr1" . 10.0.0.5 . tcp . 22', None) in found
    assert ("hairpinx4", '10.0.0.5 . "virbr1" . tcp . 22', None) in found
    assert ("hairnet4", '"virbr1" . 10.0.0.0/24', None) in found
    assert all(e.set in EXACT or e.set.startswith("hairnet") for e in mine)


def test_each_source_is_its_own_key_and_every_element_names_its_owner():
    keys = {e.key for e in dnat() if e.key.endswith(". tcp . 8443")}
    assert keys == {"0.0.0.0/0 . 198.51.100.0/24 . tcp . 8443", "0.0.0.0/0 . 192.0.2.7 . tcp . 8443"}
    assert all(e.comment.startswith("kvmufw:d=g5,b=virbr1,s=") for e in dnat())


def listing(items: list[Element]) -> str:
    """What ``nft list table inet kvmufw`` prints for these elements."""
    out = ["table inet kvmufw {"]
    for name in dict.fromkeys(e.set for e in items):
        texts = [e.text for e in items if e.set == name]
        out += [f"\tset {name} {{", "\t\tflags interval",
                "\t\telements = { " + ",\n\t\t\t     ".join(texts) + " }", "\t}"]
    for chain, (hook, rules) in CHAINS.items():
        out += [f"\tchain {chain} {{", f"\t\t{hook}", *(f"\t\t{r}" for r in rules), "\t}"]
    for chain in sorted({e.value.split()[1] for e in items if e.set.startswith("masqp")}):
        first, last = chain.split("_")[1:]
        out += [f"\tchain {chain} {{",
                f"\t\tmeta l4proto {{ tcp, udp }} masquerade to :{first}-{last}", "\t}"]
    return "\n".join([*out, "}"]) + "\n"


def test_a_listing_reads_back_as_the_elements_written_and_nothing_changes():
    everything = list(wanted(RULES))
    table = Table.parse(listing(everything))
    assert sorted(table.elements, key=repr) == sorted(everything, key=repr)
    assert table.skeleton_ok()
    assert not NftBackend().change(Ruleset(table), RULES).script


def test_a_stop_deletes_exactly_its_owner_elements_by_key():
    everything = list(wanted(RULES))
    change = NftBackend().change(Ruleset(Table.parse(listing(everything))), {"d=g5": ()})
    lines = change.script.splitlines()
    assert all(line.startswith("delete element inet kvmufw ") for line in lines)
    assert "add " not in change.script and "flush" not in change.script
    assert "kvmufw:" not in change.script  # by key: comments are not part of a key
    assert set(change.ended) == set(dnat())  # prerouting and output share each element
    mine = {e for e in everything if e.comment.startswith("kvmufw:d=g5,")}
    assert sorted(change.after or [], key=repr) == sorted(set(everything) - mine, key=repr)


def test_only_a_change_of_elements_alone_is_offered_to_the_netlink_writer():
    """A stop or a start on a table as it should be: its deletes and adds, exactly the
    script's; where the skeleton must be written, or a range chain comes or goes, none
    (``nft -f`` writes the whole change)."""
    everything = list(wanted(RULES))
    table = Table.parse(listing(everything))
    stop = NftBackend().change(Ruleset(table), {"d=g5": ()})
    assert stop.elements is not None
    deletes, adds = stop.elements
    assert not adds and {e.key for e in deletes} == {
        e.key for e in everything if e.comment.startswith("kvmufw:d=g5,")}
    start = NftBackend().change(Ruleset(Table.parse(listing(stop.after or []))),
                                {"d=g5": RULES["d=g5"]})
    assert start.elements is not None and not start.elements[0]
    assert len(start.elements[1]) == len(start.script.split(" comment ")) - 1
    assert NftBackend().change(Ruleset(Table()), RULES).elements is None  # the skeleton
    network_gone = NftBackend().change(Ruleset(table), {"n=lab": ()})
    assert "delete chain inet kvmufw masq_" in network_gone.script
    assert network_gone.elements is None  # its range chain goes too


def test_a_forward_renders_straight_from_its_intent_as_through_its_rules():
    forwards = list(RULES["d=g5"]) + [i for i in RULES["n=lab"] if hasattr(i, "guest")]
    for fw in forwards:
        direct = dict.fromkeys(forward_elements(fw))
        through_rules = dict.fromkeys(e for rule in expand(fw) for e in elements(rule))
        assert set(direct) == set(through_rules), fw  # sources in sorted order


def test_a_guest_port_two_owners_forward_to_stays_when_one_of_them_goes():
    """The accept and hairpin of 10.0.0.5:22 are one key each; the network's forward
    8022->22 and the guest's 2222->22 both need them: when the guest's owner goes first,
    the network takes them over in the same transaction."""
    from dataclasses import replace

    from kvmufw_hook.intents import Forward
    mine = [i for i in RULES["d=g5"] if isinstance(i, Forward) and i.guest_ports.first == 22]
    theirs = [replace(f, owner="n=lab", host_ports=type(f.host_ports)(8022, 8022))
              for f in mine]
    both = {"d=g5": mine, "n=lab": theirs}
    table = Table.parse(listing(NftBackend().change(Ruleset(Table()), both).after or []))
    change = NftBackend().change(Ruleset(table), {"d=g5": ()})
    after = Ruleset(Table.parse(listing(change.after or [])))
    assert NftBackend.present(after, theirs)
    assert not any(e.comment.startswith("kvmufw:d=g5,") for e in after.table.elements)


def test_a_networks_own_nat_port_range_is_a_chain_that_lives_while_an_element_jumps_to_it():
    """``<nat><port start end>``: tcp and udp masquerade through a verdict map to the chain
    of that range; the chain is added ahead of the maps (a new verdict map cannot jump to
    a chain added after it) and deleted with the last element that jumps to it."""
    xml = b"""<network><name>p</name><forward mode='nat' dev='eth0'><nat>
      <port start='2000' end='2009'/></nat></forward><bridge name='virbr2'/>
      <ip address='10.0.2.1' prefix='24'/></network>"""
    owners = {"n=p": owner_rules(parse_network_xml(xml))}
    found = {(e.set, e.key, e.value) for e in wanted(owners)}
    assert ("masqp4", '10.0.2.0/24 . "eth0"', "jump masq_2000_2009") in found
    script = NftBackend().change(Ruleset(Table()), owners).script
    assert script.index("add chain inet kvmufw masq_2000_2009") < script.index("add map")
    assert "masquerade to :2000-2009" in script
    after = NftBackend().change(Ruleset(Table()), owners).after or []
    table = Table.parse(listing(after))
    assert not NftBackend().change(Ruleset(table), owners).script
    stop = NftBackend().change(Ruleset(table), {"n=p": ()}).script
    assert stop.splitlines()[-1] == "delete chain inet kvmufw masq_2000_2009"


def test_a_networks_hairpin_subnet_stays_while_any_of_its_one_port_forwards_does():
    """``hairnetF`` (bridge . subnet) is one key per network, held under the comment of
    the first forward that added it: when that owner goes, another forward of the network
    to another guest port takes it over, so its hairpin still masquerades."""
    from dataclasses import replace

    from kvmufw_hook.intents import Forward
    mine = [i for i in RULES["d=g5"] if isinstance(i, Forward) and i.guest_ports.first == 22]
    port = type(mine[0].host_ports)
    theirs = [replace(f, owner="d=g6", host_ports=port(3333, 3333),
                      guest_ports=port(2022, 2022)) for f in mine]
    both = {"d=g5": mine, "d=g6": theirs}
    table = Table.parse(listing(NftBackend().change(Ruleset(Table()), both).after or []))
    held = [e for e in table.elements if e.set.startswith("hairnet")]
    assert len(held) == 2 and all(e.comment.startswith("kvmufw:d=g5,") for e in held)
    change = NftBackend().change(Ruleset(table), {"d=g5": ()})
    after = Ruleset(Table.parse(listing(change.after or [])))
    assert NftBackend.present(after, theirs)
    assert {e.set for e in after.table.elements if e.comment.startswith("kvmufw:d=g6,")} \
        >= {"hairnet4", "hairnet6", "hairpinx4", "hairpinx6"}


def glue_read(nft_families: set[int], nft_chains=None, **rules) -> Glue:
    """Glue as read: filter INPUT and FORWARD of both iptables families (``rules``:
    chain -> its lines, the same in both)."""
    glue = Glue()
    glue.iptables = {f: {c: list(rules.get(c, [])) for c in IPT_GLUE} for f in (4, 6)}
    glue.nft_families, glue.nft_chains = nft_families, nft_chains
    return glue


def test_missing_glue_goes_in_through_nft_where_iptables_is_iptables_nft():
    out = _glue_change(glue_read({4, 6}, {4: {"INPUT", "FORWARD"}, 6: {"FORWARD"}}),
                       keep=True)
    assert set(out) == {"nft"}
    lines = out["nft"].splitlines()
    assert [l for l in lines if l.startswith("insert")] == [
        f"insert rule {a} filter {c} {LIBVIRT_GLUE}" for a in ("ip", "ip6")
        for c in ("INPUT", "FORWARD")]
    # a chain iptables-nft has not added yet is added as it adds it, the others not
    assert [l for l in lines if l.startswith("add chain")] == [
        "add chain ip6 filter INPUT { type filter hook input priority filter; }"]


def test_legacy_iptables_and_glue_to_move_go_through_iptables_restore():
    legacy = _glue_change(glue_read(set()), keep=True)
    assert set(legacy) == {"4", "6"} and legacy["4"].startswith("*filter\n-I INPUT 1 ")
    moved = _glue_change(glue_read({4, 6}, {4: set(), 6: set()},
                                   INPUT=["-A INPUT -j ACCEPT", IPT_GLUE["INPUT"]]), keep=True)
    assert set(moved) == {"4", "6"} and moved["4"].startswith(
        "*filter\n-D" + IPT_GLUE["INPUT"][2:] + "\n-I INPUT 1 ")
    gone = _glue_change(glue_read({4, 6}, None, FORWARD=[IPT_GLUE["FORWARD"]]), keep=False)
    assert gone == {f: "*filter\n-D" + IPT_GLUE["FORWARD"][2:] + "\nCOMMIT\n" for f in "46"}
