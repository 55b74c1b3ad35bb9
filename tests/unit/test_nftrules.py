"""iptables-nft's glue read from nf_tables' netlink dumps (``backends.nftrules``): the
kernel's reply bytes (tests/support/nft_dumps.py, captured with iptables 1.8.9 and
1.8.11) parsed as iptables-save would print them; whatever is not read for sure is a
doubt, and the backend then reads with iptables-save."""

import struct

import pytest
from nft_dumps import DUMPS

from kvmufw_hook.backends import nft, nftrules
from kvmufw_hook.backends.nft import GLUE_COMMENT, IPT_GLUE, Glue

VERSIONS = ("1.8.9", "1.8.11")


def dump(version: str, family: int) -> tuple[bytes, bytes]:
    chains, rules = DUMPS[(version, family)]
    return bytes.fromhex(chains), bytes.fromhex(rules)


def read_from(version: str):
    def read(family: int):
        chains, rules = dump(version, family)
        return nftrules.parse_chains(chains), nftrules.parse_rules(rules)
    return read


@pytest.mark.parametrize("version", VERSIONS)
def test_rules_in_their_order_with_their_comments(version):
    chains, rules = dump(version, 2)
    assert nftrules.parse_chains(chains) == {
        ("filter", c) for c in ("INPUT", "FORWARD", "OUTPUT", "LIBVIRT_FWI")}
    read = nftrules.parse_rules(rules)
    assert [(r.chain, r.comment) for r in read] == [
        ("INPUT", GLUE_COMMENT), ("INPUT", "ssh"), ("FORWARD", None),
        ("FORWARD", GLUE_COMMENT), ("FORWARD", GLUE_COMMENT)]
    assert [nftrules.is_glue(r, GLUE_COMMENT) for r in read] == [True, False, False,
                                                                 True, True]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_glue_as_nft_writes_it_and_our_comment_on_another_rule(version):
    read = nftrules.parse_rules(dump(version, 10)[1])
    assert [(r.chain, r.comment) for r in read] == [("INPUT", GLUE_COMMENT),
                                                    ("FORWARD", GLUE_COMMENT)]
    assert nftrules.is_glue(read[0], GLUE_COMMENT)  # user data, not an xtables match
    with pytest.raises(nftrules.Doubt, match="our glue's comment on another rule"):
        nftrules.is_glue(read[1], GLUE_COMMENT)  # mark 0x02000000


@pytest.mark.parametrize("version", VERSIONS)
def test_glue_read_as_iptables_save_prints_it(monkeypatch, version):
    monkeypatch.setattr(nftrules, "read", read_from(version))
    glue = Glue()
    assert nft._glue_by_netlink(glue, 4)
    assert glue.iptables[4] == {"INPUT": [IPT_GLUE["INPUT"], "# 6"],
                                "FORWARD": ["# 7", IPT_GLUE["FORWARD"], IPT_GLUE["FORWARD"]]}
    assert glue.nft_families == {4} and glue.nft_chains == {4: {"INPUT", "FORWARD"}}
    assert glue.libvirt_chains == {"LIBVIRT_FWI"}
    assert nft._glue_bad(glue) == ["FORWARD (filter)"]  # not first, and twice
    # a glue rule to move: iptables-restore deletes both by their text, inserts one
    assert nft._glue_change(glue, keep=True) == {"4": (
        "*filter\n" + "-D" + IPT_GLUE["FORWARD"][2:] + "\n" + "-D" + IPT_GLUE["FORWARD"][2:]
        + "\n-I FORWARD 1" + IPT_GLUE["FORWARD"][len("-A FORWARD"):] + "\nCOMMIT\n")}


def test_a_doubt_leaves_the_family_to_iptables_save(monkeypatch):
    monkeypatch.setattr(nftrules, "read", read_from("1.8.9"))
    glue = Glue()
    assert not nft._glue_by_netlink(glue, 6)  # our comment on another rule
    assert glue.iptables == {} and glue.nft_families == set() and glue.nft_chains is None


def test_the_iptables_backends_chains_leave_the_family_to_iptables_save(monkeypatch):
    chains, rules = read_from("1.8.9")(2)
    monkeypatch.setattr(nftrules, "read",
                        lambda f: (chains | {("nat", "KVMUFW-PREROUTING")}, rules))
    assert not nft._glue_by_netlink(Glue(), 4)


def test_replies_not_read_for_sure_are_doubts():
    chains, rules = dump("1.8.9", 2)
    assert struct.unpack_from("=IH", rules, len(rules) - 20) == (20, 3)  # NLMSG_DONE
    with pytest.raises(nftrules.Doubt, match="without its end"):
        nftrules.parse_rules(rules[:-20])
    with pytest.raises(nftrules.Doubt):
        nftrules.parse_rules(rules[:-21])  # a message cut
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -1) + b"\0" * 16
    with pytest.raises(nftrules.Doubt, match="message type"):
        nftrules.parse_rules(error)  # EPERM
    interrupted = rules[:6] + struct.pack("=H", 2 | 0x10) + rules[8:]  # NLM_F_DUMP_INTR
    with pytest.raises(nftrules.Doubt, match="interrupted"):
        nftrules.parse_rules(interrupted)
    with pytest.raises(nftrules.Doubt, match="message type"):
        nftrules.parse_chains(rules)  # rules where chains were asked for


def test_user_data_comments():
    text = GLUE_COMMENT.encode() + b"\0"
    assert nftrules.comment(bytes([0, len(text)]) + text) == GLUE_COMMENT
    assert nftrules.comment(bytes([1, 1, 0])) is None  # another TLV only
    for bad in (bytes([0, 40]) + text, bytes([0]), bytes([0, 2]) + b"ab",
                bytes([0, len(text)]) + text + bytes([0, len(text)]) + text):
        with pytest.raises(nftrules.Doubt):
            nftrules.comment(bad)
