"""The record of the ruleset after our own last write (``backends.iptables.Record``),
with hooks run as libvirt runs them in a namespace this test creates: it is what
``iptables-save`` prints while nf_tables' generation is unchanged, and any change by
someone else makes the next hook read the kernel again."""

import sys

from conftest import ROOT
from hookrun import run_hook, sample

# In the namespace: the record for the current generation, compared with a fresh read;
# prints "same", "none" (no record for this generation) or the first difference.
COMPARE = """
import sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook.backends import nftprobe
from kvmufw_hook.backends.iptables import Record, Snapshot, TOOLS
from kvmufw_hook.process import run
recorded = Record.load(nftprobe.generation(), set())
if recorded is None:
    print("none")
    sys.exit()
for family, snap in recorded.snapshots.items():
    fresh = Snapshot.parse(run([TOOLS[family][0]]))
    for name, table in fresh.tables.items():
        mine = snap.tables[name]
        if set(mine.chains) != set(table.chains):
            print(f"chains of {name}: {mine.chains} != {table.chains}")
            sys.exit()
        for chain in table.chains:
            if mine.rules.get(chain, []) != table.rules.get(chain, []):
                print(f"IPv{family} {name} {chain}: {mine.rules.get(chain)} != "
                      f"{table.rules.get(chain)}")
                sys.exit()
print("same")
"""


TABLES = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
          "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
          ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n")


def _seed(netns) -> None:
    """The built-in chains, as on any host with UFW (iptables-nft creates them with a
    table's first rule, which the record does not model: that write is not recorded)."""
    for tool in ("iptables-restore", "ip6tables-restore"):
        netns.run(tool, input=TABLES)


def _record(netns, env) -> str:
    return netns.run(sys.executable, "-c", COMPARE, str(ROOT), env=env).stdout.strip()


def _hook(netns, env, name):
    kind, argv, xml = sample(name)
    proc = run_hook(kind, argv, xml, env, netns)
    assert proc.returncode == 0, proc.stderr


def test_the_record_is_what_the_kernel_holds_after_each_hook(netns, state_env):
    env = dict(state_env)
    _seed(netns)
    for name in ("16-network.lab.started", "04-qemu.web1.start", "09-qemu.web1.stopped",
                 "04-qemu.web1.start", "14-network.lab.stopped", "16-network.lab.started",
                 "04-qemu.web1.start"):
        _hook(netns, env, name)
        assert _record(netns, {**env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}) == "same", name


def test_a_change_by_someone_else_is_read_from_the_kernel(netns, state_env):
    """An admin flushes our DNAT chain: the record no longer holds (the generation moved
    on), and the guest's next start puts its rules back instead of finding them
    "already in place" in the record."""
    env = dict(state_env)
    _seed(netns)
    _hook(netns, env, "16-network.lab.started")
    _hook(netns, env, "04-qemu.web1.start")
    dnat = [l for l in netns.save().splitlines() if "-j DNAT" in l and "d=web1" in l]
    assert dnat
    netns.run("iptables", "-t", "nat", "-F", "KVMUFW-PREROUTING")
    assert _record(netns, {**env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}) == "none"
    kind, argv, xml = sample("04-qemu.web1.start")
    proc = run_hook(kind, ["web1", "reconnect", "begin", "-"], xml, env, netns)
    assert proc.returncode == 0, proc.stderr
    assert [l for l in netns.save().splitlines() if "-j DNAT" in l and "d=web1" in l] == dnat
