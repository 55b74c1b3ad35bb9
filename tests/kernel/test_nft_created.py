"""A change that creates our table (a replay after a boot or a ``flush``) is written in
two transactions (``NftBackend._write_created``): T1, one ``nft -f`` of the skeleton, the
range chains, the glue and the elements ``nftwrite`` cannot encode; T2, the other
elements in one netlink batch at the generation T1 left. Against one ``nft -f`` of the
whole: the same table, byte for byte, as text and as JSON. A refused T2 leaves nothing of
ours; one refused as stale (ERESTART) is written again on a fresh read; a replay killed
between T1 and T2 is completed by the next one. Each in a fresh namespace of its own,
with ``ops.replay`` as the command runs it. Root only; CI runs them."""

import json
import os
import pathlib
import sys

import pytest
from dualstack import DB_MAC, WEB1_MAC, dom_xml, net_xml
from netlab import Netns

ROOT = str(pathlib.Path(__file__).resolve().parent.parent.parent)

# In the namespace: ``ops.replay`` of the networks and guests in argv[3] (JSON), our
# table empty before it, written as ``mode`` says:
# - "split": as the backend does (T1 by nft -f, T2 by netlink);
# - "whole": one nft -f (the split turned off);
# - "refused": T2's masqp4 elements jump to a chain nobody added (the kernel refuses);
# - "stale": someone adds a table of his own between T1 and T2 (the first time);
# - "killed": a child replays and is killed (SIGKILL) as T2 is about to be sent; then
#   this process replays.
# Prints one JSON line: how it was written (nft processes, batches sent and their fate),
# the error if any, ``nft list table``, ``nft --json list table``, and the whole ruleset
# and iptables-save after it (nothing of ours after a refusal).
DRIVER = r"""
import json, os, signal, subprocess, sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import errors, ops
from kvmufw_hook.backends import nft, nftwrite
mode, given = sys.argv[2], json.load(open(sys.argv[3]))
nets, doms = [x.encode() for x in given["nets"]], [x.encode() for x in given["doms"]]
spawned, fates, killed = [], [], None

def out(argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

real_run = nft.run
nft.run = lambda argv, **kw: spawned.append(os.path.basename(argv[0])) or real_run(argv, **kw)
real_send = nftwrite.send
def send(payload, sets, table):
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "stale" and not fates:
        out(["nft", "add", "table", "ip", "foreign"])
    try:
        sock = real_send(payload, sets, table)
    except errors.ApplyError as exc:
        fates.append(f"{type(exc).__name__}: {exc}")
        raise
    fates.append("written")
    return sock
nftwrite.send = send
if mode == "whole":
    nft.NftBackend._write_created = lambda self, start, change: False
if mode == "refused":
    real_separate = nftwrite.separate
    def separate(types, adds):
        adds = [nft.Element(e.set, e.key, "jump masq_1_2", e.comment)
                if e.set == "masqp4" else e for e in adds]
        return real_separate(types, adds)
    nftwrite.separate = separate
if mode == "killed":
    child = subprocess.run([sys.executable, *sys.argv[:2], "die", *sys.argv[3:]])
    killed = {"status": child.returncode,
              "list": out(["nft", "list", "table", "inet", "kvmufw"]),
              "glue": out(["nft", "list", "ruleset"]).count("kvmufw:g=glue")}
error = None
try:
    ops.replay(nets, doms, backend=nft.NftBackend())
except errors.ApplyError as exc:
    error = str(exc)
tables = out(["nft", "list", "tables"])
listed = json_listed = ""
if "table inet kvmufw" in tables:
    listed = out(["nft", "list", "table", "inet", "kvmufw"])
    json_listed = out(["nft", "--json", "list", "table", "inet", "kvmufw"])
print(json.dumps({"nft": spawned.count("nft"), "fates": fates, "error": error,
                  "list": listed, "json": json_listed, "killed": killed,
                  "ruleset": out(["nft", "list", "ruleset"]),
                  "saved": out(["iptables-save"]) + out(["ip6tables-save"])}))
"""

DEV = "<forward mode='nat' dev='eth0'>"
LAB = net_xml('host-port="8080" guest-port="80" guest-ip="10.0.0.20"',
              'proto="udp" host-port="7000-7001" guest-port="7100-7101" guest-ip="10.0.0.30"',
              'host-port="8088" guest-port="80" guest-ip="fd00:10::30"'
              ).replace(b"<forward mode='nat'>", DEV.encode())
# no dev: its masquerade is in single-field interval sets
OPEN = (b"<network><name>nodev</name><forward mode='nat'/><bridge name='virbr3'/>"
        b"<ip address='10.0.3.1' prefix='24'/></network>")
WEB1 = dom_xml("web1", WEB1_MAC,
               'host-port="2222" guest-port="22"',
               'proto="udp" host-port="6000-6002" guest-port="5000-5002"',
               'host-port="8443" guest-port="443" source="198.51.100.0/24,2001:db8::/32"',
               'proto="sctp" host-port="9000"', 'host-port="8081" guest-port="80"',
               'host-port="2300-2301" guest-port="3300-3301" source="203.0.113.0/24"')
DB = dom_xml("db", DB_MAC, 'host-port="3306"', 'proto="udp" host-port="5353" guest-port="53"',
             'host-port="9100-9102"')


def _crowd(guests: int) -> tuple[bytes, list[bytes]]:
    """The benchmark's network and guests (10 forwards each): sets of more than one
    message."""
    sys.path.insert(0, str(pathlib.Path(ROOT) / "benchmarks"))
    try:
        import run as bench
    finally:
        sys.path.pop(0)
    doms = [bench.domain(f"g{i:03d}", 10, 20000 + 10 * i, nic=i) for i in range(guests)]
    return bench.network(guests), doms


def _replay(mode: str, tmp_path, name: str, nets: list[bytes], doms: list[bytes]) -> dict:
    """``DRIVER`` in a fresh namespace, with a state of its own."""
    given = tmp_path / f"{name}.json"
    given.write_text(json.dumps({"nets": [x.decode() for x in nets],
                                 "doms": [x.decode() for x in doms]}))
    state = tmp_path / name
    (state / "libvirt").mkdir(parents=True)
    env = {**os.environ, "KVMUFW_STATE_DIR": str(state / "state"),
           "KVMUFW_LIBVIRT_NETWORK_DIR": str(state / "libvirt"),
           "KVMUFW_DNSMASQ_DIR": str(state / "libvirt"),
           "KVMUFW_CONFIG": str(tmp_path / "none.conf")}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ns = Netns.create(name)
    try:
        proc = ns.run(sys.executable, str(driver), ROOT, mode, str(given), env=env,
                      timeout=120)
    finally:
        ns.destroy()
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture
def tools():
    from conftest import need_root_tools
    need_root_tools("ip", "nft", "iptables-save", "ip6tables-save")


@pytest.fixture
def given():
    crowd, guests = _crowd(80)
    return [LAB, OPEN, crowd], [WEB1, DB, *guests]


def test_a_replay_from_empty_in_two_steps_is_one_nft_f_byte_for_byte(tools, tmp_path, given):
    """Forwards of both families, sourced and ranged, hairpins, a network with a range
    chain and one without a dev (single-field interval sets), 800 forwards more: one nft process and one
    batch, and the table nft -f writes whole, as text and as JSON."""
    split = _replay("split", tmp_path, "split", *given)
    whole = _replay("whole", tmp_path, "whole", *given)
    assert split["error"] is None and whole["error"] is None
    assert (split["nft"], split["fates"]) == (1, ["written"])
    assert (whole["nft"], whole["fates"]) == (1, [])
    assert split["list"] == whole["list"]
    assert split["json"] == whole["json"]
    assert split["ruleset"] == whole["ruleset"]  # the glue too
    for text in ("jump masq_1024_65535", "masq_any4", "tcp . 20799", "udp . 5000-5002",
                 '"virbr1" . 10.0.0.20 . tcp . 80', "198.51.100.0/24"):
        assert text in split["list"], text


def test_a_refused_second_step_leaves_nothing_of_ours(tools, tmp_path, given):
    """T2 refused (an element jumps to a chain that is not there): one line naming the
    set and the errno, and the revert deletes our table and our glue: no rule at all is
    left in the namespace (only the empty built-in chains iptables-nft's glue needed, as
    iptables-nft itself leaves them), and iptables-save shows nothing of ours."""
    refused = _replay("refused", tmp_path, "refused", *given)
    assert refused["error"] == ("nf_tables refused the change of table inet kvmufw (set "
                                "masqp4): No such file or directory (errno 2) (tried 5 times)")
    assert "\n" not in refused["error"]
    assert refused["fates"] == ["ApplyError: " + refused["error"].rpartition(" (tried")[0]] * 5
    assert refused["list"] == "" and "kvmufw" not in refused["ruleset"]
    assert "kvmufw" not in refused["saved"] and "-A " not in refused["saved"]
    assert [line for line in refused["ruleset"].splitlines() if line.strip() and not
            line.strip().startswith(("table ", "chain ", "type ", "}"))] == []


def test_a_stale_second_step_is_written_again_on_a_fresh_read(tools, tmp_path, given):
    """Someone changes the ruleset between T1 and T2: T2 is refused whole (ERESTART), and
    the replay's retry, reading the skeleton T1 left, sends the elements alone (no nft
    process): the table as one nft -f writes it, the other's table kept."""
    stale = _replay("stale", tmp_path, "stale", *given)
    whole = _replay("whole", tmp_path, "whole", *given)
    assert stale["error"] is None
    assert stale["fates"] == [
        "Stale: table inet kvmufw: the ruleset changed since it was read", "written"]
    assert stale["list"] == whole["list"] and stale["json"] == whole["json"]
    assert "table ip foreign" in stale["ruleset"]


def test_a_replay_killed_between_the_steps_is_completed_by_the_next(tools, tmp_path, given):
    """Killed after T1: the skeleton, the glue and T1's elements, none of T2's (no DNAT:
    nothing forwarded, the glue accepts only what our table marks); the next replay
    completes it as one nft -f writes it."""
    done = _replay("killed", tmp_path, "killed", *given)
    whole = _replay("whole", tmp_path, "whole", *given)
    killed = done["killed"]
    assert killed["status"] == -9
    assert "chain forward" in killed["list"] and "masq_any4" in killed["list"]
    assert "tcp . 20000" not in killed["list"] and "d=" not in killed["list"]
    assert killed["glue"] > 0
    assert done["error"] is None and done["fates"] == ["written"]
    assert done["list"] == whole["list"] and done["json"] == whole["json"]
