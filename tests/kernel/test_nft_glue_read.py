"""The glue read in-process by netlink dumps (``backends.nftrules``) and read with
iptables-save agree, in a namespace this test creates, with real iptables-nft and nft:
glue present and first, missing, twice, not first, written by nft, our comment on
another rule (a doubt: iptables-save reads then), the iptables backend's chains there
(iptables-save reads then). Root only."""

import json
import pathlib
import sys

import pytest

ROOT = str(pathlib.Path(__file__).resolve().parent.parent.parent)
GLUE = ('-m mark --mark 0x1000000/0x1000000 -m comment --comment "kvmufw:g=glue,b=-,s=-" '
        "-j ACCEPT")
OTHER = "-p tcp --dport 22 -j ACCEPT"

BOTH = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook.backends import nft
backend = nft.NftBackend()
def seen(glue):
    return {"iptables": {str(f): {c: [l == nft.IPT_GLUE[c] for l in lines]
                                  for c, lines in chains.items()}
                         for f, chains in glue.iptables.items()},
            "nft_families": sorted(glue.nft_families),
            "nft_chains": {str(f): sorted(c) for f, c in (glue.nft_chains or {}).items()},
            "libvirt_chains": sorted(glue.libvirt_chains), "bad": nft._glue_bad(glue),
            "change": nft._glue_change(glue, keep=True)}
netlink = nft._glue_by_netlink
used = {f: netlink(nft.Glue(), f) for f in (4, 6)}
by_netlink = seen(backend._read_glue())
nft._glue_by_netlink = lambda glue, family: False
print(json.dumps({"used": used, "netlink": by_netlink, "save": seen(backend._read_glue())}))
"""


def restore(netns, family: int, input_rules: list[str], forward: list[str],
            extra: str = "") -> None:
    chains = ":INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n" + extra
    lines = [f"-A INPUT {r}" for r in input_rules] + [f"-A FORWARD {r}" for r in forward]
    netns.run("iptables-restore" if family == 4 else "ip6tables-restore",
              input="*filter\n" + chains + "\n".join(lines) + "\nCOMMIT\n")


def both(netns) -> dict:
    return json.loads(netns.run(sys.executable, "-c", BOTH, ROOT).stdout)


CASES = {
    "first": ([GLUE, OTHER], [GLUE]),
    "missing": ([OTHER], []),
    "twice": ([GLUE, GLUE], [OTHER, GLUE]),
    "not first": ([OTHER, GLUE], [OTHER, GLUE, OTHER]),
}


@pytest.mark.parametrize("case", CASES)
def test_netlink_and_iptables_save_agree(netns, case):
    input_rules, forward = CASES[case]
    restore(netns, 4, input_rules, forward, ":LIBVIRT_FWI - [0:0]\n")
    restore(netns, 6, forward, input_rules)
    got = both(netns)
    assert got["used"] == {"4": True, "6": True}
    assert got["netlink"] == got["save"]
    assert got["netlink"]["libvirt_chains"] == ["LIBVIRT_FWI"]
    assert (got["netlink"]["bad"] == []) == (case == "first")


def test_no_filter_table_and_the_glue_as_nft_writes_it(netns):
    netns.run("nft", "add table ip6 filter")
    netns.run("nft", "add chain ip6 filter INPUT { type filter hook input priority filter; }")
    netns.run("nft", 'add rule ip6 filter INPUT meta mark & 0x01000000 == 0x01000000 accept '
              'comment "kvmufw:g=glue,b=-,s=-"')
    got = both(netns)
    assert got["netlink"] == got["save"]
    assert got["netlink"]["nft_chains"] == {"4": [], "6": ["INPUT"]}
    assert got["netlink"]["iptables"]["6"] == {"INPUT": [True], "FORWARD": []}


def test_doubts_are_read_with_iptables_save(netns):
    """Our glue's comment on another mark, and the iptables backend's chains: netlink
    does not decide, iptables-save does."""
    restore(netns, 4, [GLUE.replace("0x1000000/", "0x2000000/")], [GLUE])
    restore(netns, 6, [GLUE], [GLUE], ":KVMUFW-FORWARD - [0:0]\n")
    got = both(netns)
    assert got["used"] == {"4": False, "6": False}
    assert got["netlink"] == got["save"]
    assert got["save"]["bad"] == ["INPUT (filter)"]
