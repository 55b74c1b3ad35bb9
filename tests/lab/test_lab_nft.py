"""The lab with libvirt's nftables backend: a real libvirtd (>= 10.4; Debian 13's 11.3) with
``firewall_backend = "nftables"``, real UFW enabled with its defaults, the installed hooks,
real packets (tests/support/lab.py). libvirt keeps its rules in ``table ip libvirt_network``, whose
``guest_input`` ends in ``oif BRIDGE reject``: forwards work only through our owner-tagged
accepts in that chain, and the control below shows them failing without. The dual-stack
network ``dual`` (NAT44 and NAT66) has its IPv6 rules in ``table ip6 libvirt_network``, the
same chains: its IPv6 forward passes only through our accept there (a control of its own).

On a machine whose libvirt is older (Debian 12: 9.0) ``test_in_a_debian13_root`` runs this
module inside the Debian 13 root of tests/debian13/root.py; there (or on a Debian 13
machine) the lab tests run natively.

TEST-ONLY SHIM: these machines' kernels lack the ``act_csum`` module, and libvirt 11's
nftables backend runs ``tc filter add ... action csum ip and udp`` (a DHCP checksum fix-up)
for every network it starts, refusing to start the network when that fails. The lab puts a
``tc`` wrapper first on libvirtd's PATH (/usr/local/sbin, inside the lab's overlay) that skips
exactly that call and runs every other ``tc`` command unchanged.
"""

import json
import re
import subprocess
import time

import pytest
from conftest import ROOT, need_root_tools
from debian13 import early
from debian13.root import os_release

lab_module = pytest.importorskip("lab")
forwards, kvmufw = lab_module.forwards, lab_module.kvmufw

NEEDS = (10, 4)
NETS = {  # the standard lab's networks, one isolated with a forward, one dual-stack
    "lab": lab_module.NETS["lab"],
    "routed": lab_module.NETS["routed"],
    "isolated": """<network><name>isolated</name>
      <metadata><kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">
        <kvmufw:forward host-port="8093" guest-port="80" guest-ip="10.30.0.5"/>
      </kvmufw:forwards></metadata>
      <bridge name='virbr3' stp='off'/>
      <ip address='10.30.0.1' prefix='24'><dhcp><range start='10.30.0.100' end='10.30.0.200'/>
        </dhcp></ip></network>""",
    "opennet": lab_module.NETS["opennet"],
    # NAT66: libvirt 11 lets only replies (iifname "eth0" ... ct state established,related)
    # into fd00:50::/64, so a new inbound IPv6 connection meets its reject. Without
    # <nat ipv6='yes'/> it routes the subnet (ip6 daddr fd00:.../64 iifname "eth0" oif
    # BRIDGE accept, seen in 11.3): there it lets new inbound IPv6 in itself.
    "dual": """<network><name>dual</name>
      <forward mode='nat' dev='eth0'><nat ipv6='yes'/></forward>
      <bridge name='virbr5' stp='off'/>
      <ip address='10.50.0.1' prefix='24'><dhcp><range start='10.50.0.100' end='10.50.0.200'/>
        <host mac='52:54:00:00:50:05' ip='10.50.0.5'/></dhcp></ip>
      <ip family='ipv6' address='fd00:50::1' prefix='64'><dhcp>
        <host name='web6' ip='fd00:50::5'/></dhcp></ip></network>""",
}
GUEST_NS = {**lab_module.GUEST_NS,  # namespace: (bridge, ip, gateway)
            "i5": ("virbr3", "10.30.0.5", "10.30.0.1")}
GUEST_NS6 = {"d5": ("virbr5", "10.50.0.5", "10.50.0.1", "fd00:50::5", "fd00:50::1")}
HOST4, INET4 = "203.0.113.1", "203.0.113.2"
HOST6, INET6 = "2001:db8:ff::1", "2001:db8:ff::2"
# the uplink in IPv6 too; inet has no route to fd00:50::/64: an answer proves NAT66
UPLINK6 = f"""
ip addr add {HOST6}/64 dev eth0 nodad
ip -6 route add default via {INET6}
ip netns exec inet ip addr add {INET6}/64 dev eth0 nodad
"""
TC_SHIM = r"""#!/bin/sh
# TEST-ONLY SHIM of tests/lab/test_lab_nft.py: this kernel has no act_csum; libvirt 11's nftables
# backend adds a tc "action csum ip and udp" filter per network. Skip exactly that call.
case " $* " in
  *" u32 match ip dport 68 ffff action csum ip and udp"*) exit 0 ;;
esac
exec /usr/sbin/tc "$@"
"""
EGRESS = {"g5": "203.0.113.1", "r5": "10.20.0.5", "o5": "10.40.0.5"}


def libvirt_version() -> tuple[int, ...]:
    try:
        out = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True,
                             check=False).stdout
    except FileNotFoundError:
        return ()
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    return tuple(map(int, found.groups())) if found else ()


NATIVE = libvirt_version() >= NEEDS
native_only = pytest.mark.skipif(not NATIVE, reason=f"needs libvirt >= 10.4 (here "
                                 f"{'.'.join(map(str, libvirt_version())) or 'none'}): "
                                 "test_in_a_debian13_root runs these inside Debian 13")


# --------------------------------------------------------------------------- Debian 12 host

def start_in_debian13_root() -> early.Run | None:
    """This module's run inside the Debian 13 root, begun at collection (it overlaps the
    other tests: tests/debian13/early.py) or when the test starts; None where the test
    skips or fails first."""
    if NATIVE or os_release().get("ID") != "debian" or not early.can_enter_root():
        return None
    return early.run("nftables lab", ["python3", "-m", "pytest", "-q", "-ra", "-p",
                                      "no:cacheprovider", "tests/lab/test_lab_nft.py"], 1800)


@early.starts_early(start_in_debian13_root)
def test_in_a_debian13_root(capsys):
    """On a host with an older libvirt, this module inside the Debian 13 root."""
    if NATIVE:
        pytest.skip("libvirt >= 10.4 here: the lab tests ran natively")
    release = os_release()
    if release.get("ID") != "debian":
        pytest.skip(f"the Debian 13 root is built from Debian's archive; this is "
                    f"{release.get('ID')} with libvirt {'.'.join(map(str, libvirt_version()))}")
    need_root_tools("debootstrap", "unshare", "pivot_root")
    run = start_in_debian13_root()
    assert run is not None
    result = run.wait()
    lines = result.stdout.rstrip().splitlines()
    with capsys.disabled():
        print(f"\nnftables lab in the Debian 13 root ({result.ran:.0f}s): "
              f"{lines[-1] if lines else '(no output)'}")
    assert result.returncode == 0, f"{result.stdout[-30000:]}\n{result.stderr[-5000:]}"
    # inside, only this test skips (libvirt 11.3 there): every lab test ran
    assert " passed" in lines[-1] and "1 skipped" in lines[-1], lines[-1]


# --------------------------------------------------------------------------- the lab

def make_nft_lab(install: bool = True):
    need_root_tools(*lab_module.PACKAGES_TOOLS, "nft")
    lab = lab_module.Lab()
    try:
        lab.sh(f"""
            printf 'firewall_backend = "nftables"\\n' >> /etc/libvirt/network.conf
            mkdir -p /usr/local/sbin
            cat > /usr/local/sbin/tc <<'EOF'
{TC_SHIM}EOF
            chmod 755 /usr/local/sbin/tc
        """)
        lab.sh(UPLINK6)
        lab.start_libvirt()
        lab_module.populate(lab, NETS, GUEST_NS)
        for ns, (bridge, ip, gw, ip6, gw6) in GUEST_NS6.items():
            lab.add_guest_ns(ns, bridge, ip, 24, gw, ip6, gw6)
            lab.serve(ns, "tcp", 22)
        lab.serve("inet", "tcp", 9000)
        lab.libvirt_rules = libvirts(listing(lab))
        if install:
            install_and_replay(lab)
    except BaseException:
        lab.destroy()
        raise
    return lab


def libvirt_handles(lab) -> set[str]:
    return {l.rsplit(" ", 1)[1] for l in listing(lab).splitlines()
            if "# handle" in l and "kvmufw:" not in l and "reject" in l}


def reloaded(lab, before: set[str]) -> None:
    """Wait for libvirt's SIGHUP reload: it deletes its rules and inserts them again at
    the top of its chains (new handles), in the background."""
    assert eventually(lambda: not libvirt_handles(lab) & before), listing(lab)


def install_and_replay(lab) -> None:
    """install.sh, then the replay its SIGHUP makes necessary on this backend: libvirt's
    reload re-inserts its rules above ours and runs no hook (see
    test_a_libvirt_reload_puts_its_rejects_first_until_a_hook_or_replay)."""
    before = libvirt_handles(lab)
    lab.run(str(ROOT / "install.sh"))
    reloaded(lab, before)
    lab.run("kvmufw_hook", "replay")


@pytest.fixture(scope="module")
def lab():
    if not NATIVE:
        pytest.skip("needs libvirt >= 10.4: test_in_a_debian13_root runs this inside Debian 13")
    the_lab = make_nft_lab()
    yield the_lab
    the_lab.destroy()


def listing(lab, family: int = 4) -> str:
    """libvirt's table of that family: ``table ip`` or ``table ip6 libvirt_network``."""
    return lab.run("nft", "-a", "list", "table", "ip" if family == 4 else "ip6",
                   "libvirt_network").stdout


def chain(text: str, name: str) -> list[str]:
    """The rules of one chain of ``nft -a list`` output, in order."""
    body = text.split(f"chain {name} {{", 1)[1].split("}", 1)[0]
    return [l.strip() for l in body.splitlines()[1:] if "# handle" in l]


def ours(text: str) -> list[str]:
    return [re.sub(r" # handle \d+$", "", l.strip()) for l in text.splitlines()
            if "kvmufw:" in l]


def libvirts(text: str) -> list[str]:
    """libvirt's rules as a multiset: no handles, counters or order (its reloads change
    those)."""
    return sorted(re.sub(r"counter packets \d+ bytes \d+ |# handle \d+", "", l).strip()
                  for l in text.splitlines() if "# handle" in l and "kvmufw:" not in l
                  and not l.strip().startswith(("table", "chain")))


def ahead_of_libvirt(text: str) -> bool:
    """In guest_input and guest_output, every rule of ours before every rule of libvirt's."""
    for name in ("guest_input", "guest_output"):
        tagged = ["kvmufw:" in l for l in chain(text, name)]
        if tagged != sorted(tagged, reverse=True):
            return False
    return True


def egress(lab) -> dict:
    return {ns: lab.ask(ns, "tcp", "203.0.113.2", 9000) for ns in EGRESS}


def eventually(check, timeout: float = 20.0):
    """libvirt rebuilds its rules, and runs our hooks, in the background of a restart."""
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.3)
    return result


# --------------------------------------------------------------------------- tests

@native_only
def test_libvirt_really_uses_its_nftables_backend(lab):
    text = listing(lab)
    assert 'oif "virbr1" counter' in text and chain(text, "guest_input")[-1].split(
        " # handle")[0].endswith("reject")
    assert "LIBVIRT_" not in lab.save()  # nothing of libvirt's in iptables
    report = json.loads(kvmufw(lab, "doctor", "--json").stdout)
    backend = [f for f in report if f["check"] == "libvirt firewall backend"]
    assert backend and backend[0]["level"] == "OK"
    assert backend[0]["detail"].startswith("nftables (kernel: table ip libvirt_network")
    assert not [f for f in report if f["level"] == "FAIL"], report


@native_only
def test_egress_through_ufws_drop_policy(lab):
    assert egress(lab) == EGRESS
    assert "-P FORWARD DROP" in lab.run("iptables", "-S").stdout


@native_only
def test_forwards_reach_the_guest_and_fail_without_our_accepts(lab, guest):
    guest("web1", [("lab", "52:54:00:00:00:05")],
          forwards('host-port="2222" guest-port="22"',
                   'proto="udp" host-port="6000-6002" guest-port="5000-5002"',
                   'host-port="8443" guest-port="443" source="198.51.100.0/24"',
                   'host-port="8444" guest-port="443" host-ip="203.0.113.1"'))
    text = listing(lab)
    assert ('oif "virbr1" ip daddr 10.0.0.5 tcp dport 22 ct status dnat accept comment '
            '"kvmufw:d=web1,b=virbr1,s=10.0.0.0/24"') in ours(text)
    assert ahead_of_libvirt(text), text

    def probes():
        return {"dnat": lab.ask("inet", "tcp", "203.0.113.1", 2222, 1.5),
                "udp": [lab.ask("inet", "udp", "203.0.113.1", p, 1.5) for p in (6000, 6002)],
                "host_ip": lab.ask("inet", "tcp", "203.0.113.1", 8444, 1.5),
                "source_refused": lab.ask("inet", "tcp", "203.0.113.1", 8443, 1.0),
                "hairpin": lab.ask("g6", "tcp", "203.0.113.1", 2222, 1.5),
                "host_local": lab.ask(None, "tcp", "203.0.113.1", 2222, 1.5)}

    working = {"dnat": "203.0.113.2", "udp": ["203.0.113.2", "203.0.113.2"],
               "host_ip": "203.0.113.2", "source_refused": None, "hairpin": "10.0.0.1",
               "host_local": "203.0.113.1"}
    assert probes() == working
    # the control: our iptables rules stay, our accepts in libvirt's table go
    handles = [l.rsplit(" ", 1)[1] for l in text.splitlines() if "kvmufw:d=web1" in l]
    lab.run("nft", "-f", "-", input="".join(
        f"delete rule ip libvirt_network {c} handle {h}\n" for c in ("guest_input",
                                                                    "guest_output")
        for h in handles if any(l.endswith(f"# handle {h}") for l in chain(text, c))))
    assert "kvmufw:d=web1" not in listing(lab) and "d=web1" in lab.save()
    without = probes()
    assert without["dnat"] is None and without["udp"] == [None, None]
    assert without["host_ip"] is None
    assert (without["hairpin"], without["host_local"]) == ("10.0.0.1", "203.0.113.1")
    assert egress(lab) == EGRESS
    # doctor sees it; replay puts them back
    proc = kvmufw(lab, "doctor", status=1)
    assert "FAIL  our accepts in libvirt's table:" in proc.stdout, proc.stdout
    assert "d=web1" in lab.run("kvmufw_hook", "replay", "--dry-run").stdout
    kvmufw(lab, "replay")
    assert probes() == working
    assert kvmufw(lab, "replay", "--dry-run").stdout == "# nothing to change\n"


@native_only
def test_isolated_network_forward_needs_the_reply_accept_too(lab):
    assert lab.ask("inet", "tcp", "203.0.113.1", 8093) == "203.0.113.2"
    output = chain(listing(lab), "guest_output")
    assert output[0].startswith('iif "virbr3" ip saddr 10.30.0.5 tcp sport 80 ct status '
                                'dnat accept comment "kvmufw:n=isolated,')


@native_only
def test_conflicting_guest_does_not_start(lab, guest):
    guest("web1", [("lab", "52:54:00:00:00:05")], forwards('host-port="2222" guest-port="22"'))
    lab.define_domain("web9", [("lab", "52:54:00:00:00:07")],
                      forwards('host-port="2222" guest-port="22"'))
    try:
        before = listing(lab)
        proc = lab.run("virsh", "-c", "qemu:///system", "start", "web9", check=False)
        assert proc.returncode != 0 and "already forwarded by domain 'web1'" in proc.stderr
        assert "d=web9" not in listing(lab) and ours(listing(lab)) == ours(before)
    finally:
        lab.virsh("undefine", "web9", check=False)


def replug(lab, ns: str, bridge: str) -> None:
    port = lab.guests[ns]
    lab.sh(f"ip link set {port} master {bridge}; for i in $(seq 100); do bridge link show "
           f"dev {port} | grep -q forwarding && exit 0; sleep 0.05; done; exit 1")


@native_only
def test_network_restart_and_daemon_restart_put_our_accepts_back(lab, guest):
    guest("web1", [("lab", "52:54:00:00:00:05")], forwards('host-port="2222" guest-port="22"'))
    running = ours(listing(lab))
    lab.virsh("net-destroy", "lab")
    assert not any("b=virbr1" in l for l in ours(listing(lab)))
    lab.virsh("net-start", "lab")  # the started hook re-adds the running guest's forwards
    replug(lab, "g5", "virbr1")
    replug(lab, "g6", "virbr1")
    text = listing(lab)
    assert sorted(ours(text)) == sorted(running) and ahead_of_libvirt(text), text
    assert lab.ask("inet", "tcp", "203.0.113.1", 2222) == "203.0.113.2"
    assert egress(lab) == EGRESS

    lab.restart_libvirt()  # libvirt reinserts its rules at the top; port-created, reconnect
    assert "web1" in lab.virsh("list", "--name")
    assert eventually(lambda: ahead_of_libvirt(listing(lab))
                      and sorted(ours(listing(lab))) == sorted(running)), listing(lab)
    assert lab.ask("inet", "tcp", "203.0.113.1", 2222) == "203.0.113.2"
    assert lab.ask("inet", "tcp", "203.0.113.1", 8093) == "203.0.113.2"


@native_only
def test_status_flush_and_replay(lab, guest):
    guest("web1", [("lab", "52:54:00:00:00:05")], forwards('host-port="2222" guest-port="22"'))

    def present():
        report = json.loads(kvmufw(lab, "status", "--json").stdout)
        [dom] = [d for d in report["domains"] if d["name"] == "web1"]
        return dom["forwards"][0]["present"]

    assert present() is True
    kvmufw(lab, "flush")
    assert ours(listing(lab)) == [] and "KVMUFW" not in lab.save()
    assert present() is False
    assert lab.ask("inet", "tcp", "203.0.113.1", 2222, 1.0) is None
    kvmufw(lab, "replay")
    assert present() is True and ahead_of_libvirt(listing(lab))
    assert lab.ask("inet", "tcp", "203.0.113.1", 2222) == "203.0.113.2"
    # a running guest's accepts, in place, but behind libvirt's reject: not present
    text = listing(lab)
    rule = next(l for l in chain(text, "guest_input") if "kvmufw:d=web1" in l)
    handle = rule.rsplit(" ", 1)[1]
    body = rule.split(" # handle")[0]
    lab.run("nft", "-f", "-", input=f"delete rule ip libvirt_network guest_input handle "
            f"{handle}\nadd rule ip libvirt_network guest_input {body}\n")
    assert present() is False
    kvmufw(lab, "replay")
    assert present() is True


@native_only
def test_stopping_a_guest_removes_exactly_its_accepts(lab, guest):
    before = listing(lab)
    guest("web1", [("lab", "52:54:00:00:00:05")], forwards('host-port="2222" guest-port="22"'))
    guest("web2", [("lab", "52:54:00:00:00:06")], forwards('host-port="2223" guest-port="22"'))
    assert len([l for l in ours(listing(lab)) if "d=web1" in l]) == 2
    lab.virsh("destroy", "web1")
    after = ours(listing(lab))
    assert not [l for l in after if "d=web1" in l] and [l for l in after if "d=web2" in l]
    assert lab.ask("inet", "tcp", "203.0.113.1", 2223) == "203.0.113.2"
    lab.virsh("destroy", "web2")
    assert ours(listing(lab)) == ours(before)
    assert libvirts(listing(lab)) == libvirts(before)


def handles(text: str, chain_name: str, tag: str) -> list[str]:
    return [l.rsplit(" ", 1)[1] for l in chain(text, chain_name) if tag in l]


@native_only
def test_dual_stack_forward_passes_libvirts_ip6_reject_only_through_our_accept(lab, guest):
    """One forward of a guest on the NAT44 + NAT66 network ``dual``: reached over IPv4 and
    IPv6, each through our accept in libvirt's table of that family; without our ip6
    accept only IPv6 fails; a destroy takes ours out of both tables."""
    before = {f: listing(lab, f) for f in (4, 6)}
    # libvirt's own: the ip6 table, whose guest_input takes only replies into fd00:50::/64
    # and rejects everything else bound for the bridge
    into = [re.sub(r" counter packets \d+ bytes \d+| # handle \d+", "", l)
            for l in chain(before[6], "guest_input") if 'oif "virbr5"' in l]
    assert into == ['iifname "eth0" oif "virbr5" ip6 daddr fd00:50::/64 ct state '
                    'established,related accept', 'oif "virbr5" reject'], before[6]
    assert lab.ask("d5", "tcp", INET6, 9000) == HOST6  # egress, masqueraded (NAT66)
    assert lab.ask("d5", "tcp", INET4, 9000) == HOST4

    guest("web6", [("dual", "52:54:00:00:50:05")], forwards('host-port="2232" guest-port="22"'))
    text = {f: listing(lab, f) for f in (4, 6)}
    # into the guest (guest_input) and its replies (guest_output), in each family's table
    assert [l for l in ours(text[6]) if "d=web6" in l] == [
        'iif "virbr5" ip6 saddr fd00:50::5 tcp sport 22 ct status dnat accept comment '
        '"kvmufw:d=web6,b=virbr5,s=fd00:50::/64"',
        'oif "virbr5" ip6 daddr fd00:50::5 tcp dport 22 ct status dnat accept comment '
        '"kvmufw:d=web6,b=virbr5,s=fd00:50::/64"'], text[6]
    assert [l for l in ours(text[4]) if "d=web6" in l] == [
        'iif "virbr5" ip saddr 10.50.0.5 tcp sport 22 ct status dnat accept comment '
        '"kvmufw:d=web6,b=virbr5,s=10.50.0.0/24"',
        'oif "virbr5" ip daddr 10.50.0.5 tcp dport 22 ct status dnat accept comment '
        '"kvmufw:d=web6,b=virbr5,s=10.50.0.0/24"'], text[4]
    assert ahead_of_libvirt(text[6]) and ahead_of_libvirt(text[4]), text
    # what we render is what nft prints: nothing to redo
    assert kvmufw(lab, "replay", "--dry-run").stdout == "# nothing to change\n"

    def probes():
        return {4: lab.ask("inet", "tcp", HOST4, 2232, 1.5),
                6: lab.ask("inet", "tcp", HOST6, 2232, 1.5)}

    assert probes() == {4: INET4, 6: INET6}
    # the control: only our accepts in the ip6 table go; our ip6tables rules stay
    lab.run("nft", "-f", "-", input="".join(
        f"delete rule ip6 libvirt_network {c} handle {h}\n" for c in ("guest_input",
                                                                      "guest_output")
        for h in handles(text[6], c, "kvmufw:d=web6")))
    assert "kvmufw:d=web6" not in listing(lab, 6) and "kvmufw:d=web6" in listing(lab, 4)
    assert "d=web6" in lab.save(6)
    assert probes() == {4: INET4, 6: None}
    proc = kvmufw(lab, "doctor", status=1)
    assert "FAIL  our accepts in libvirt's table:" in proc.stdout, proc.stdout
    assert "insert rule ip6 libvirt_network guest_input" in kvmufw(
        lab, "replay", "--dry-run").stdout
    kvmufw(lab, "replay")
    assert probes() == {4: INET4, 6: INET6}

    lab.virsh("destroy", "web6")
    for family in (4, 6):
        after = listing(lab, family)
        assert "d=web6" not in after and ours(after) == ours(before[family]), after
        assert libvirts(after) == libvirts(before[family]), after
        assert "d=web6" not in lab.save(family)
    assert probes() == {4: None, 6: None}


@native_only
def test_uninstall_leaves_nothing_of_ours_in_libvirts_table(lab, guest):
    guest("web1", [("lab", "52:54:00:00:00:05")], forwards('host-port="2222" guest-port="22"'))
    guest("web6", [("dual", "52:54:00:00:50:05")], forwards('host-port="2232" guest-port="22"'))
    assert ours(listing(lab)) and ours(listing(lab, 6))
    lab.run(str(ROOT / "install.sh"), "--uninstall")
    try:
        text = listing(lab)
        assert "kvmufw" not in text and "KVMUFW" not in lab.save()
        assert "kvmufw" not in listing(lab, 6) and "KVMUFW" not in lab.save(6)
        assert eventually(lambda: libvirts(listing(lab)) == lab.libvirt_rules), listing(lab)
        assert lab.ask("inet", "tcp", "203.0.113.1", 2222, 1.0) is None
        assert lab.ask("inet", "tcp", HOST6, 2232, 1.0) is None
    finally:
        install_and_replay(lab)


@native_only
def test_a_libvirt_reload_puts_its_rejects_first_until_a_hook_or_replay(lab, guest):
    """A known limit on this backend: SIGHUP (install.sh, systemctl reload) makes libvirt
    re-insert its rules at the top of guest_input and runs no hook, so forwards are
    rejected until the next hook call (a guest starting or stopping, a network starting,
    a daemon restart) or ``kvmufw_hook replay``; doctor says so."""
    guest("web1", [("lab", "52:54:00:00:00:05")], forwards('host-port="2222" guest-port="22"'))
    assert lab.ask("inet", "tcp", "203.0.113.1", 2222) == "203.0.113.2"
    before = libvirt_handles(lab)
    lab.sh("kill -HUP $(cat /run/libvirtd.pid)")
    reloaded(lab, before)
    assert not ahead_of_libvirt(listing(lab))
    assert lab.ask("inet", "tcp", "203.0.113.1", 2222, 1.0) is None
    assert "FAIL  our accepts in libvirt's table" in kvmufw(lab, "doctor", status=1).stdout
    guest("web2", [("lab", "52:54:00:00:00:06")], forwards('host-port="2223" guest-port="22"'))
    assert ahead_of_libvirt(listing(lab))  # any hook puts every accept of ours back first
    assert lab.ask("inet", "tcp", "203.0.113.1", 2222) == "203.0.113.2"
    assert lab.ask("inet", "tcp", "203.0.113.1", 8093) == "203.0.113.2"


CONF = "/etc/kvmufw_hook/kvmufw_hook.conf"


@native_only
def test_our_nftables_backend_passes_libvirts_rejects_with_its_glue_alone(lab, guest):
    """firewall_backend = "nftables" in root's configuration, then replay: every forward
    (IPv4, a shifted UDP range, hairpin, the host itself, the isolated network's, IPv6
    through NAT66) passes libvirt's rejects through a fixed glue rule per chain instead
    of an accept per forward; doctor names the backend; switching back puts the accepts
    back."""
    guest("web1", [("lab", "52:54:00:00:00:05")],
          forwards('host-port="2222" guest-port="22"',
                   'proto="udp" host-port="6000-6002" guest-port="5000-5002"'))
    guest("web6", [("dual", "52:54:00:00:50:05")], forwards('host-port="2232" guest-port="22"'))

    def probes():
        return {"dnat": lab.ask("inet", "tcp", HOST4, 2222, 1.5),
                "udp": lab.ask("inet", "udp", HOST4, 6002, 1.5),
                "hairpin": lab.ask("g6", "tcp", HOST4, 2222, 1.5),
                "host_local": lab.ask(None, "tcp", HOST4, 2222, 1.5),
                "isolated": lab.ask("inet", "tcp", HOST4, 8093, 1.5),
                "ipv6": lab.ask("inet", "tcp", HOST6, 2232, 1.5), **egress(lab)}

    working = {"dnat": INET4, "udp": INET4, "hairpin": "10.0.0.1", "host_local": HOST4,
               "isolated": INET4, "ipv6": INET6, **EGRESS}
    assert probes() == working
    per_forward = len(ours(listing(lab)))
    try:
        lab.sh(f"mkdir -p /etc/kvmufw_hook && echo 'firewall_backend = \"nftables\"' > {CONF}")
        kvmufw(lab, "replay")
        assert "KVMUFW" not in lab.save() + lab.save(6)
        mine = ours(listing(lab))
        assert mine and all("d=" not in l and "n=" not in l for l in mine), mine  # glue only
        assert probes() == working
        report = kvmufw(lab, "doctor").stdout
        assert "OK    kvmufw_hook firewall backend: nftables" in report, report
        guest("web2", [("lab", "52:54:00:00:00:06")], forwards('host-port="2223" guest-port="22"'))
        assert lab.ask("inet", "tcp", HOST4, 2223, 1.5) == INET4
        assert len(ours(listing(lab))) == len(mine)  # a new forward adds no rule there

        lab.sh(f"echo 'firewall_backend = \"iptables\"' > {CONF}")
        kvmufw(lab, "replay")
        assert lab.run("nft", "list", "table", "inet", "kvmufw", check=False).returncode
        assert len(ours(listing(lab))) > per_forward  # web2's accepts beside the others
        assert probes() == working
    finally:
        lab.sh(f"rm -f {CONF}")
        kvmufw(lab, "replay")
