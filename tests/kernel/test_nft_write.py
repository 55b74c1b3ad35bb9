"""Element changes written by netlink in-process (``backends/nftwrite.py``) against the
same changes written by ``nft -f``: two fresh namespaces this test creates, the same
owners started and stopped in each, our table listed after every step, text and JSON,
compared byte for byte. And the transaction: a batch computed from a generation the
ruleset has left is refused with ERESTART and written again on a fresh read; a batch
the kernel refuses applies nothing. Root only; CI runs them."""

import json
import os
import pathlib
import sys

import pytest
from dualstack import DB_MAC, WEB1_MAC, dom_xml, net_xml
from netlab import Netns

ROOT = str(pathlib.Path(__file__).resolve().parent.parent.parent)

# In the namespace: each step (owner, "net" XML | "dom" XML | "stop") planned, changed
# and written, by netlink where it can (``netlink``) or always by ``nft -f`` (``nft``);
# after each, one JSON line: how it was written, ``nft list``, ``nft --json list``, and
# whether our record of the table (if any) is what the kernel lists.
DRIVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook.backends import nft
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata
from kvmufw_hook.backends.nftprobe import generation
mode, steps = sys.argv[2], json.load(open(sys.argv[3]))
backend, nets, spawned = nft.NftBackend(), {}, []
real = nft.run
nft.run = lambda argv, **kw: spawned.append(argv[-1]) or real(argv, **kw)
for owner, kind, xml in steps:
    if kind == "net":
        net, _ = parse_hookdata(xml.encode())
        nets[net.name] = net
        intents = owner_rules(net)
    elif kind == "dom":
        intents = owner_rules(parse_domain_xml(xml.encode()), nets)
    else:
        intents = ()
    change = backend.change(backend.read(), {owner: intents})
    change.glue = {}  # the glue outside our table is not what this compares
    if mode == "nft":
        change.elements = None
    spawned.clear()
    backend.write(change)
    listed = real(["nft", "list", "table", "inet", "kvmufw"])
    recorded = nft.Record.load(generation())
    same = None if recorded is None else (
        sorted(recorded.elements) == sorted(nft.Table.parse(listed).elements))
    print(json.dumps({"step": f"{owner} {kind}", "by": "nft" if spawned else "netlink",
                      "list": listed, "record": same,
                      "json": real(["nft", "--json", "list", "table", "inet", "kvmufw"])}))
"""

DEV = "<forward mode='nat' dev='eth0'>"
LAB = net_xml('host-port="8080" guest-port="80" guest-ip="10.0.0.20"',
              'proto="udp" host-port="7000-7001" guest-port="7100-7101" guest-ip="10.0.0.30"',
              'host-port="8088" guest-port="80" guest-ip="fd00:10::30"'
              ).replace(b"<forward mode='nat'>", DEV.encode())
LAB2 = (b"<network><name>lab2</name>" + DEV.encode() + b"</forward><bridge name='virbr2'/>"
        b"<ip address='10.0.2.1' prefix='24'/>"
        b"<ip family='ipv6' address='fd00:20::1' prefix='64'/></network>")
# no dev: its masquerade is in single-field interval sets (start and end elements)
OPEN = (b"<network><name>nodev</name><forward mode='nat'/><bridge name='virbr3'/>"
        b"<ip address='10.0.3.1' prefix='24'/></network>")
WEB1 = dom_xml("web1", WEB1_MAC,
               'host-port="2222" guest-port="22"',
               'proto="udp" host-port="6000-6002" guest-port="5000-5002"',
               'proto="udp" host-port="5100-5101"',
               'host-port="8443" guest-port="443" source="198.51.100.0/24,2001:db8::/32"',
               'host-port="8444" guest-port="443" source="192.0.2.7,192.0.2.0/25"',
               'proto="sctp" host-port="9000"',
               'host-port="8081" guest-port="80"',
               'host-port="2300-2301" guest-port="3300-3301" source="203.0.113.0/24"',
               'host-port="2400" guest-port="24" host-ip="203.0.113.1"',
               'host-port="2401" guest-port="25" host-ip="2001:db8:1::1"')
DB = dom_xml("db", DB_MAC, 'host-port="3306"', 'proto="udp" host-port="5353" guest-port="53"',
             'host-port="9100-9102"')
# no dev, both families masqueraded (NAT66), source ports of their own: single-field
# interval sets of both families and their range chain
NAT66 = ("<network><name>{0}</name><forward mode='nat'><nat ipv6='yes'>"
         "<port start='2000' end='2009'/></nat></forward><bridge name='virbr{1}'/>"
         "<ip address='10.0.{1}.1' prefix='24'/>"
         "<ip family='ipv6' address='fd00:{1}::1' prefix='64'/></network>")
STEPS = [("n=lab", "net", LAB), ("d=web1", "dom", WEB1), ("d=db", "dom", DB),
         ("n=lab2", "net", LAB2), ("d=web1", "stop", b""), ("d=web1", "dom", WEB1),
         ("n=nodev", "net", OPEN), ("n=lab", "stop", b""), ("d=db", "stop", b""),
         ("n=nodev", "stop", b""),
         ("n=six", "net", NAT66.format("six", 4).encode()),
         ("n=seven", "net", NAT66.format("seven", 7).encode()),
         ("n=nodev", "net", OPEN),  # masq_any4 emptied before: added to again
         ("n=seven", "stop", b""), ("n=six", "stop", b""), ("n=nodev", "stop", b""),
         ("n=lab2", "stop", b""), ("d=web1", "stop", b"")]


def _steps(tmp_path, steps) -> str:
    path = tmp_path / "steps.json"
    path.write_text(json.dumps([[o, k, x.decode()] for o, k, x in steps]))
    return str(path)


def _in_namespace(name: str, script: str, *args: str, env: dict) -> list[str]:
    """The lines ``script`` prints, run in a fresh namespace of its own."""
    ns = Netns.create(name)
    try:
        return ns.run(sys.executable, "-c", script, ROOT, *args,
                      env={**os.environ, **env}).stdout.splitlines()
    finally:
        ns.destroy()


def _drive(mode: str, steps_file: str, tmp_path, name: str) -> list[dict]:
    state = tmp_path / name
    state.mkdir()
    env = {"KVMUFW_STATE_DIR": str(state), "KVMUFW_CONFIG": str(tmp_path / "none.conf")}
    return [json.loads(line) for line in _in_namespace(name, DRIVER, mode, steps_file, env=env)]


@pytest.fixture
def tools():
    from conftest import need_root_tools
    need_root_tools("ip", "nft")


def test_element_changes_by_netlink_are_what_nft_writes(tools, tmp_path):
    """Forwards of both families (any source, sourced, host address, port ranges kept
    and shifted, sctp), hairpins and their shared accepts taken over on a stop, a
    network's elements (single-field interval sets of both families among them: started,
    stopped, emptied and added to again), deletes: after every step the two tables list
    the same, byte for byte, as text and as JSON. Every step but those that need the
    skeleton or add or delete a range chain went by netlink."""
    steps = _steps(tmp_path, STEPS)
    by_netlink = _drive("netlink", steps, tmp_path, "nlw")
    by_nft = _drive("nft", steps, tmp_path, "nft")
    assert [s["step"] for s in by_netlink] == [s["step"] for s in by_nft]
    for mine, theirs in zip(by_netlink, by_nft, strict=True):
        assert mine["list"] == theirs["list"], mine["step"]
        assert mine["json"] == theirs["json"], mine["step"]
        assert mine["record"] in (True, None) and theirs["record"] in (True, None)
    assert all(s["by"] == "nft" for s in by_nft)
    assert [s["by"] for s in by_netlink] == [
        "nft",  # the skeleton and lab's source-port range chain
        "netlink", "netlink", "netlink", "netlink", "netlink",
        "netlink",  # nodev: masq_any4 and masqp_any4, single-field interval sets
        "netlink", "netlink", "netlink",
        "nft",  # six: its source-port range chain
        "netlink", "netlink", "netlink",
        "nft",  # six's stop deletes that chain
        "netlink",
        "nft", "netlink"]  # lab2's stop deletes the range chain
    started = by_netlink[3]["list"]  # what the steps wrote is there
    for text in ('"virbr2" . 10.0.2.0/24', "198.51.100.0/24", "2001:db8::/32",
                 "udp . 5000-5002", "sctp . 9000", '"virbr1" . fd00:10::/64', "jump masq_"):
        assert text in started, text
    assert "d=web1" not in by_netlink[4]["list"] and "d=" not in by_netlink[-1]["list"]
    # lab's stop: web1's forward to the same guest port takes the shared accept over
    assert ('"virbr1" . 10.0.0.20 . tcp . 80 comment "kvmufw:d=web1'
            in by_netlink[7]["list"])
    both = by_netlink[11]["list"]  # six and seven: both families' single-field intervals
    for text in ("10.0.4.0/24", "fd00:4::/64", "fd00:7::/64", "jump masq_2000_2009"):
        assert text in both, text


# In the namespace: web1 started; then its stop, with someone else's element added
# between our read and our batch (the first batch only). Prints each batch's fate, then
# whether the foreign element is still there and what is left of web1.
RETRIED = r"""
import sys
sys.path.insert(0, sys.argv[1])
import subprocess
from kvmufw_hook import apply, errors
from kvmufw_hook.backends import nft, nftwrite
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata
net, _ = parse_hookdata(open(sys.argv[2], "rb").read())
dom = parse_domain_xml(open(sys.argv[3], "rb").read())
backend = nft.NftBackend()
apply.apply_rules({"n=lab": owner_rules(net)}, backend=backend)
apply.apply_rules({"d=web1": owner_rules(dom, {"lab": net})}, backend=backend)
fates, real = [], nftwrite.send
def send(payload, sets, table):
    if not fates:
        subprocess.run(["nft", "add", "element", "inet", "kvmufw", "b2b4", '{ "x" . "y" }'],
                       check=True)
    try:
        sock = real(payload, sets, table)
    except errors.Stale as exc:
        fates.append(f"stale: {exc}")
        raise
    fates.append("written")
    return sock
nftwrite.send = send
apply.domain_stopped("web1", backend=backend)
listed = subprocess.run(["nft", "list", "table", "inet", "kvmufw"], capture_output=True,
                        text=True, check=True).stdout
print(fates)
print('"x" . "y"' in listed, listed.count("d=web1"))
"""


def test_a_batch_from_a_stale_read_is_refused_and_written_again_on_a_fresh_read(
        tools, tmp_path, state_env):
    """Someone changes the ruleset between our read and our batch: the kernel refuses
    the batch (its generation is not the one we computed from: ERESTART), nothing of it
    is in, and the stop runs again on a fresh read, which keeps the other's change."""
    (tmp_path / "net.xml").write_bytes(LAB)
    (tmp_path / "dom.xml").write_bytes(WEB1)
    fates, left = _in_namespace("stale", RETRIED, str(tmp_path / "net.xml"),
                                str(tmp_path / "dom.xml"), env=state_env)
    assert fates == ("['stale: table inet kvmufw: the ruleset changed since it was read', "
                     "'written']")
    assert left == "True 0"


# In the namespace: web1 started; then one batch at the current generation that adds an
# element and deletes one that is not there. Prints the error and whether anything
# changed (the table's listing, nf_tables' generation).
REFUSED = r"""
import sys
sys.path.insert(0, sys.argv[1])
import subprocess
from kvmufw_hook import apply, errors
from kvmufw_hook.backends import nft
from kvmufw_hook.backends.nftprobe import generation
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata
net, _ = parse_hookdata(open(sys.argv[2], "rb").read())
backend = nft.NftBackend()
apply.apply_rules({"n=lab": owner_rules(net)}, backend=backend)
def listed():
    return subprocess.run(["nft", "list", "table", "inet", "kvmufw"], capture_output=True,
                          text=True, check=True).stdout
before, at = listed(), generation()
ruleset = backend.read()
add = nft.Element("dnat4_any", "tcp . 2222", "10.0.0.20 . 22", "kvmufw:d=web1,b=-,s=-")
missing = nft.Element("guestx4", '"virbr1" . 10.0.0.99 . tcp . 22', None, "x")
change = nft.Change("unused", base=ruleset, after=[], elements=([missing], [add]))
try:
    backend.write(change)
except errors.Stale:
    print("stale")
except errors.ApplyError as exc:
    print(exc)
print(listed() == before, generation() == at)
"""


def test_a_refused_batch_applies_nothing_and_says_which_set(tools, tmp_path, state_env):
    (tmp_path / "net.xml").write_bytes(LAB)
    error, unchanged = _in_namespace("refused", REFUSED, str(tmp_path / "net.xml"),
                                     env=state_env)
    assert error == ("nf_tables refused the change of table inet kvmufw (set guestx4): "
                     "No such file or directory (errno 2)")
    assert unchanged == "True True"


# A socket whose close takes a second, released as after a batch that deleted elements,
# by a process whose stdout and stderr are pipes and which holds a flock: it exits at
# once, and neither its pipes nor its lock outlive it in the child that closes the socket.
RELEASED = r"""
import fcntl, os, socket, sys, time
sys.path.insert(0, sys.argv[1])
from kvmufw_hook.backends import nftwrite
lock = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT)
fcntl.flock(lock, fcntl.LOCK_EX)
class Slow(socket.socket):
    def close(self):
        time.sleep(1 if os.getpid() != parent else 0)
        super().close()
parent = os.getpid()
nftwrite.release(Slow(socket.AF_UNIX, socket.SOCK_DGRAM), deleted=True)
print(len(nftwrite._CLOSERS))
"""


def test_the_socket_is_released_by_a_child_that_holds_no_pipe_and_no_lock(tmp_path):
    """What a guest's stop leaves behind to close its batch's socket: libvirt reads the
    hook's stdout and stderr to their end, and the next hook takes the state lock; the
    child waits for neither."""
    import fcntl
    import subprocess
    import time
    lock = tmp_path / "lock"
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RELEASED, ROOT, str(lock)],
                          capture_output=True, text=True, timeout=30)
    took = time.monotonic() - began
    assert proc.returncode == 0 and proc.stdout == "1\n", proc.stderr
    assert took < 0.9, took  # the pipes reached their end before the child's close ended
    with open(lock, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if held
