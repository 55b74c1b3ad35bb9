"""What an adversary who writes XML, or a careless admin, cannot make the hooks, replay
and the CLI do: publish another guest's reservation with a copied MAC, take a running
guest's port while its network restarts, lose an override's or a live update's forwards,
block a guest with a socket of their own, break UFW with an after.init. The real shims in
hooks/ (and ops with the real iptables) run in a network namespace this test creates, as
in tests/kernel/test_host_safety.py; the last ones in the standard lab (a real libvirtd).
"""

import re
import sys

from hookrun import (
    dnat_owners,
    domain_xml,
    hook_ok,
    lab_network,
    port_created,
    run_hook,
    started_lab,
)
from lab import AFTER_INIT, content, forwards, install, kvmufw

VICTIM_MAC = "52:54:00:00:00:21"  # lab_network(): reserved 10.0.0.21


def second_network() -> bytes:
    """``lab2``: the lab network moved to virbr2 and 10.0.1.0/24, without lab's forward."""
    text = re.sub(r"<metadata>.*?</metadata>", "", lab_network().decode(), flags=re.S)
    return (text.replace("<name>lab</name>", "<name>lab2</name>")
            .replace("e027d06f-2cf7-42f1-b787-c16fc3b078f1",
                     "e027d06f-2cf7-42f1-b787-c16fc3b078f2")
            .replace("virbr1", "virbr2").replace("10.0.0.", "10.0.1.")
            .replace("52:54:00:7d:90:63", "52:54:00:7d:90:64").replace("fd00:10::", "fd00:11::")
            .replace("52:54:00:00:00:2", "52:54:00:00:01:2")).encode()


# --------------------------------------------------------------------------- copied MACs

def test_a_guest_cannot_publish_another_guests_reservation_by_copying_its_mac(
        netns, state_env):
    """``victim`` runs on lab with the MAC of the 10.0.0.21 reservation (libvirt told us so
    by port-created). ``evil`` declares a NIC with the same MAC (``<link state='down'/>``
    keeps the LAN quiet; libvirt does not refuse a duplicate MAC) and a forward of 3306
    without guest-ip: the forward resolves through "its own" NIC's reservation to the
    victim's address, publishing the victim's database. A domain forward must reach only
    an address of that domain: a MAC another running guest's port has is not evil's."""
    started_lab(netns, state_env)
    hook_ok(netns, state_env, "network", ["lab", "port-created", "begin", "-"],
            port_created(lab_network(), "victim", VICTIM_MAC))
    evil = domain_xml("evil", VICTIM_MAC, 'host-port="3306"')
    proc = run_hook("qemu", ["evil", "start", "begin", "-"], evil, state_env, netns)
    hijack = [l for l in netns.save().splitlines() if "d=evil" in l and "-j DNAT" in l]
    assert proc.returncode != 0 and hijack == [], (
        "evil's forward DNATs to the victim's reserved address:\n" + "\n".join(hijack))


def test_a_copied_mac_started_first_loses_its_forwards_when_the_real_owner_comes(
        netns, state_env):
    """The other order: ``evil`` (a copy of the victim's MAC) starts while ``victim`` is
    down; no port has that MAC yet, so its forward is applied (to what is, for now, its
    own address). When ``victim`` starts, libvirt creates its port with the same MAC:
    evil's DNAT would now reach the victim. port-created removes it."""
    started_lab(netns, state_env)
    hook_ok(netns, state_env, "network", ["lab", "port-created", "begin", "-"],
            port_created(lab_network(), "evil", VICTIM_MAC))
    evil = domain_xml("evil", VICTIM_MAC, 'host-port="3306"')
    hook_ok(netns, state_env, "qemu", ["evil", "start", "begin", "-"], evil)
    assert [l for l in netns.save().splitlines() if "d=evil" in l and "-j DNAT" in l]
    proc = run_hook("network", ["lab", "port-created", "begin", "-"],
                    port_created(lab_network(), "victim", VICTIM_MAC), state_env, netns)
    assert proc.returncode == 0, proc.stderr
    assert not [l for l in netns.save().splitlines() if "d=evil" in l]
    # a daemon restart re-creates every port: evil's does not bring its forwards back
    hook_ok(netns, state_env, "network", ["lab", "port-created", "begin", "-"],
            port_created(lab_network(), "evil", VICTIM_MAC))
    assert not [l for l in netns.save().splitlines() if "d=evil" in l]


# --------------------------------------------------------------------------- a network restarting

def test_replay_while_a_guests_network_is_down_keeps_its_port(
        netns, state_env):
    """``victim`` (running, forward 8088) keeps running while its network ``lab`` is
    restarted. In between, a replay (any ``ufw reload``/doctor's advice) sees victim fail
    to plan (its network is down) and victim no longer in the kernel, so ``aaa`` (live
    metadata edited behind our back, on lab2) gets 8088. When lab comes back,
    ``network_started`` re-adds victim's forwards from its state without any conflict
    check: two DNATs for the same port, the first one silently wins. The port must stay
    the running victim's (its state file is a claim), or the re-add must be checked."""
    started_lab(netns, state_env)
    hook_ok(netns, state_env, "network", ["lab2", "started", "begin", "-"], second_network())
    victim = domain_xml("victim", VICTIM_MAC, 'host-port="8088" guest-port="80"')
    hook_ok(netns, state_env, "qemu", ["victim", "start", "begin", "-"], victim)
    hook_ok(netns, state_env, "network", ["lab", "stopped", "end", "-"], lab_network())
    aaa = domain_xml("aaa", "52:54:00:00:01:22", 'host-port="8088" guest-port="80"',
                     network="lab2", bridge="virbr2")
    from kvmufw_hook.backends.iptables import IptablesBackend
    from kvmufw_hook.ops import replay
    replay([second_network()], [aaa, victim], backend=IptablesBackend(netns.prefix))
    hook_ok(netns, state_env, "network", ["lab", "started", "begin", "-"], lab_network())
    holders = dnat_owners(netns, 8088)
    assert len(holders) == 1, f"8088 is DNATed by {sorted(holders)} at once"


# --------------------------------------------------------------------------- overrides

def test_a_live_net_update_after_a_network_forward_add_is_not_lost(netns, state_env):
    """After ``forward add --network lab`` (an override), the admin adds a DHCP
    reservation live (``virsh net-update lab add ip-dhcp-host ... --live``): libvirt runs
    the network ``updated`` hook with the new live XML. The hook takes the override
    instead, so the new reservation is unknown to us until lab restarts: a guest on it
    with a forward by reservation is refused at start ("no <dhcp><host> reservation")
    although libvirt has one. The override should only contribute our forwards."""
    forward = 'host-port="8088" guest-port="80" guest-ip="10.0.0.22"'
    started_lab(netns, state_env)
    from kvmufw_hook import state
    state.save_network_override("lab", lab_network(forward))  # what forward add leaves
    hook_ok(netns, state_env, "network", ["lab", "updated", "begin", "-"], lab_network(forward))
    updated = lab_network().replace(
        b"<host mac='52:54:00:00:00:22' ip='10.0.0.22'/>",
        b"<host mac='52:54:00:00:00:22' ip='10.0.0.22'/>"
        b"<host mac='52:54:00:00:00:23' ip='10.0.0.23'/>")
    hook_ok(netns, state_env, "network", ["lab", "updated", "begin", "-"], updated)
    web8 = domain_xml("web8", "52:54:00:00:00:23", 'host-port="8090" guest-port="80"')
    proc = run_hook("qemu", ["web8", "start", "begin", "-"], web8, state_env, netns)
    assert proc.returncode == 0, proc.stderr.decode()
    assert dnat_owners(netns, 8090) == {"d=web8"}
    assert dnat_owners(netns, 8088) == {"n=lab"}  # and the added forward stays


# --------------------------------------------------------------------------- host services

V6ONLY_LISTENER = """
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::", 8443)); s.listen()
print("ready", flush=True); time.sleep(120)
"""


def test_an_ipv6_only_listener_does_not_refuse_an_ipv4_forward(netns, state_env):
    """A service bound to ``[::]:8443`` with IPV6_V6ONLY (nginx's ``listen [::]:8443``,
    whose default is ipv6only=on) never sees IPv4 traffic, and this forward is IPv4 only;
    yet ``Listener.reaches`` counts every ``::`` socket as taking IPv4: the guest's start
    is refused for a port the host does not use (false refusal). /proc/net/tcp6 does not
    show V6ONLY; sock_diag (INET_DIAG_SKV6ONLY, what ``ss`` reads) does."""
    started_lab(netns, state_env)
    server = netns.spawn(sys.executable, "-c", V6ONLY_LISTENER)  # ended by the fixture
    assert server.stdout.readline().strip() == "ready"
    dom = domain_xml("web7", "52:54:00:00:00:22", 'host-port="8443" guest-port="443"')
    proc = run_hook("qemu", ["web7", "start", "begin", "-"], dom, state_env, netns)
    assert proc.returncode == 0, proc.stderr.decode()


USER_LISTENER = """
import socket, time
s = socket.socket(); s.bind(("0.0.0.0", 8088)); s.listen()
print("ready", flush=True); time.sleep(120)
"""


def test_an_unprivileged_user_cannot_stop_a_guest_from_starting(
        netns, state_env):
    """``victim`` holds 8088. Any local user (here uid 1500: a person's, within login.defs'
    UID_MIN..UID_MAX; nobody, 65534, is a system account) may listen on a port above
    1023: ``nc -l 8088``, or a ``@reboot`` cron job that wins the race with libvirt's
    autostart. The socket never sees a packet (our DNAT comes first), yet the victim's
    next start is refused with "used by a host service": libvirt does not start the
    guest at all. An unprivileged user vetoes what root configured; the holder of a port
    loses it to a socket that came later."""
    started_lab(netns, state_env)
    victim = domain_xml("victim", VICTIM_MAC, 'host-port="8088" guest-port="80"')
    hook_ok(netns, state_env, "qemu", ["victim", "start", "begin", "-"], victim)
    user = netns.spawn("setpriv", "--reuid=1500", "--regid=1500", "--clear-groups",
                       sys.executable, "-c", USER_LISTENER)
    assert user.stdout.readline().strip() == "ready"
    hook_ok(netns, state_env, "qemu", ["victim", "stopped", "end", "-"], b"")
    proc = run_hook("qemu", ["victim", "start", "begin", "-"], victim, state_env, netns)
    assert proc.returncode == 0, proc.stderr.decode()
    assert dnat_owners(netns, 8088) == {"d=victim"}



# --------------------------------------------------------------------------- after.init

def test_an_after_init_without_a_final_newline_stays_runnable(host):
    """A careless admin's after.init that is only a shebang without a newline
    (``printf '#!/bin/sh' > after.init``): install.sh glues the block to the shebang
    (``#!/bin/sh# BEGIN kvmufw_hook``), so after.init can no longer be executed at all
    (UFW's start then fails) and ``--uninstall`` cannot find the block to remove it."""
    host.sh(f"mkdir -p /etc/ufw && printf '#!/bin/sh' > {AFTER_INIT} && chmod 755 {AFTER_INIT}")
    install(host)
    assert content(host, AFTER_INIT).splitlines()[0] == "#!/bin/sh"
    ran = host.sh(f"{AFTER_INIT} start", check=False)
    assert ran.returncode == 0, ran.stderr
    install(host, "--uninstall")
    assert content(host, AFTER_INIT).strip() == "#!/bin/sh"


# --------------------------------------------------------------------------- lab (libvirt)
# The standard lab (fixture ``lab`` of tests/conftest.py): a real libvirtd, QEMU guests, UFW.


def test_lab_a_copied_mac_cannot_publish_another_guests_service(lab, guest):
    """With a real libvirtd: ``victim`` (no forwards) has the MAC of the 10.0.0.5
    reservation; ``evil`` is defined with the same MAC (libvirt starts it: MACs are not
    unique across guests) and a forward 2501 -> 22. A connection from the internet to
    the host's 2501 reaches the victim's sshd (the namespace g5 answers for 10.0.0.5)."""
    guest("victim5", [("lab", "52:54:00:00:00:05")])
    lab.define_domain("evil5", [("lab", "52:54:00:00:00:05")],
                      forwards('host-port="2501" guest-port="22"'))
    try:
        proc = lab.run("virsh", "-c", "qemu:///system", "start", "evil5", check=False)
        assert proc.returncode != 0
        assert "has the MAC of the port of domain 'victim5'" in proc.stderr, proc.stderr
        assert lab.ask("inet", "tcp", "203.0.113.1", 2501, 1.0) is None, \
            "evil5's forward reaches victim5's address"
    finally:
        lab.virsh("destroy", "evil5", check=False)
        lab.virsh("undefine", "evil5", check=False)


def test_lab_forward_add_on_a_running_guest_keeps_its_next_boot_forwards(lab, guest):
    """The admin prepared a forward for the next boot (persistent definition only:
    ``virsh metadata --config`` or ``virsh edit``), then adds another on the running
    guest with ``forward add``. edit_domain writes the LIVE list (+ the new one) to the
    live AND the persistent definition: the prepared forward is silently lost."""
    guest("fa9", [("lab", "52:54:00:00:00:06")], forwards('host-port="2401" guest-port="22"'))
    lab.virsh("metadata", "fa9", "urn:kvmufw:1", "--key", "kvmufw", "--config", "--set",
              '<forwards><forward host-port="2401" guest-port="22"/>'
              '<forward host-port="2402" guest-port="22"/></forwards>')
    assert 'host-port="2402"' in lab.virsh("dumpxml", "--inactive", "fa9")
    kvmufw(lab, "forward", "add", "fa9", "2403:22")
    persistent = lab.virsh("dumpxml", "--inactive", "fa9")
    assert 'host-port="2403"' in persistent
    assert 'host-port="2402"' in persistent, "the next-boot forward 2402 was dropped"


def test_lab_a_live_net_update_after_a_network_forward_add_is_seen_by_the_hooks(lab):
    """With a real libvirtd: ``forward add --network lab`` (an override), then the admin
    adds a reservation live (``virsh net-update lab add ip-dhcp-host ... --live``). A guest
    with that MAC and a forward by reservation must start; the hooks take the stale
    override instead of libvirt's updated live network, and refuse its start."""
    host_xml = "<host mac='52:54:00:00:00:09' ip='10.0.0.9'/>"
    kvmufw(lab, "forward", "add", "--network", "lab", "8095:80", "--guest-ip", "10.0.0.6")
    try:
        lab.virsh("net-update", "lab", "add", "ip-dhcp-host", host_xml, "--live")
        lab.define_domain("nu9", [("lab", "52:54:00:00:00:09")],
                          forwards('host-port="2409" guest-port="22"'))
        started = lab.run("virsh", "-q", "-c", "qemu:///system", "start", "nu9", check=False)
        assert started.returncode == 0, started.stderr
    finally:
        lab.virsh("destroy", "nu9", check=False)
        lab.virsh("undefine", "nu9", check=False)
        lab.virsh("net-update", "lab", "delete", "ip-dhcp-host", host_xml, "--live",
                  check=False)
        kvmufw(lab, "forward", "remove", "--network", "lab", "8095")


# --------------------------------------------------------------------------- the lab: real
# libvirtd, QEMU guests, UFW and packets (tests/support/lab.py); g5/g6 answer for 10.0.0.5/.6

def test_lab_whitespace_twin_cannot_take_or_keep_a_port(lab, guest):
    guest("victim", [("lab", "52:54:00:00:00:06")], forwards('host-port="2240" guest-port="22"'))
    assert lab.ask("inet", "tcp", "203.0.113.1", 2240) == "203.0.113.2"
    lab.define_domain("victim ", [("lab", "52:54:00:00:00:07")],
                      forwards('host-port="2240" guest-port="22"'))
    try:
        proc = lab.run("virsh", "-q", "-c", "qemu:///system", "start", "victim ", check=False)
        assert proc.returncode != 0 and "already forwarded by domain 'victim'" in proc.stderr
        assert lab.ask("inet", "tcp", "203.0.113.1", 2240) == "203.0.113.2"
        kvmufw(lab, "forward", "remove", "victim ", "2240")
        kvmufw(lab, "forward", "add", "victim ", "2241:22")
        lab.virsh("start", "victim ")
        assert "d=victim~20," in lab.save()
        lab.virsh("destroy", "victim ")
        save = lab.save()
        assert "d=victim~20," not in save and "d=victim," in save
        assert lab.ask("inet", "tcp", "203.0.113.1", 2240) == "203.0.113.2"
    finally:
        lab.virsh("destroy", "victim ", check=False)
        lab.virsh("undefine", "victim ", check=False)


def test_lab_forward_to_another_guests_reservation_is_refused(lab, guest):
    # attacker on .5; .6 is another guest's reservation, and g6 answers there
    guest("atk", [("lab", "52:54:00:00:00:05")])
    before = lab.save()
    err = kvmufw(lab, "forward", "add", "atk", "3306:22", "--guest-ip", "10.0.0.6",
                 status=2).stderr
    assert err.count("\n") == 1 and "guest-ip 10.0.0.6 is reserved for another guest" in err
    for gateway_or_bcast in ("10.0.0.1", "10.0.0.255"):
        kvmufw(lab, "forward", "add", "atk", "3306:22", "--guest-ip", gateway_or_bcast,
               status=2)
    assert lab.save() == before
    assert lab.ask("inet", "tcp", "203.0.113.1", 3306, 1.0) is None


def test_lab_two_host_ips_one_port_and_remove_by_host_ip(lab, guest):
    guest("hip", [("lab", "52:54:00:00:00:05")])
    kvmufw(lab, "forward", "add", "hip", "3307:22", "--host-ip", "203.0.113.1")
    kvmufw(lab, "forward", "add", "hip", "3307:80", "--host-ip", "10.0.0.1")
    err = kvmufw(lab, "forward", "add", "hip", "3307:443", status=2).stderr
    assert "tcp 3307 is already forwarded" in err
    err = kvmufw(lab, "forward", "remove", "hip", "3307", status=2).stderr
    assert err.count("\n") == 1 and "2 forwards match tcp 3307" in err
    kvmufw(lab, "forward", "remove", "hip", "3307", "--host-ip", "10.0.0.1")
    assert lab.ask("inet", "tcp", "203.0.113.1", 3307) == "203.0.113.2"
    assert 'host-ip="10.0.0.1"' not in lab.virsh("dumpxml", "hip")
