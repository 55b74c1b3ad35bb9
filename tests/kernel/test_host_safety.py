"""What the host and its owners keep, whatever the XML or the state says:
restore that never asks libvirt, overrides that replay keeps, host-ip only the host's,
host services never taken by surprise, the current holder of a port kept, state that is
private and never followed through a symlink, a corrupt state file that blinds nothing.

Hooks and the CLI run as libvirt and admins run them (the real shims, a subprocess),
inside a network namespace this test creates, so /proc/net and the firewall they read
are that namespace's.
"""

import os
import stat
import time

import pytest
from conftest import SAMPLES
from hookrun import (
    cli,
    default_started_xml,
    dnat_owners,
    domain_xml,
    hook_ok,
    lab_network,
    run_hook,
    sample,
    started_lab,
)

# --------------------------------------------------------------------------- restore and replay

def test_restore_puts_rules_back_from_state_without_libvirt(netns, state_env, tmp_path):
    """After a reload that wiped everything (MANAGE_BUILTINS=yes), restore brings every
    rule back from our state alone. A libvirt module that would hang for ever sits first
    on the path: restore must never import it (at boot it would deadlock ufw.service)."""
    started_lab(netns, state_env, 'host-port="8088" guest-port="80" guest-ip="10.0.0.22"')
    hook_ok(netns, state_env, *sample("04-qemu.web1.start"))
    wanted = sorted(l for l in netns.save().splitlines() if "kvmufw" in l.lower())
    netns.run("iptables", "-t", "nat", "-F")
    netns.run("iptables", "-F")
    netns.run("iptables", "-t", "nat", "-X")
    netns.run("iptables", "-X")
    (tmp_path / "trap").mkdir()
    (tmp_path / "trap" / "libvirt.py").write_text("import time\ntime.sleep(3600)\n")
    started = time.monotonic()
    proc = cli(netns, state_env, "restore", extra_path=tmp_path / "trap")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 20
    assert sorted(l for l in netns.save().splitlines() if "kvmufw" in l.lower()) == wanted


def test_restore_jumps_only_puts_our_jumps_first_again(netns, state_env):
    """What libvirt does at each daemon start: its jumps inserted at position 1."""
    started_lab(netns, state_env)
    for table, chain in (("filter", "INPUT"), ("filter", "FORWARD"), ("nat", "POSTROUTING")):
        netns.run("iptables", "-t", table, "-N", f"LIBVIRT_{chain[:3]}")
        netns.run("iptables", "-t", table, "-I", chain, "1", "-j", f"LIBVIRT_{chain[:3]}")
    proc = cli(netns, state_env, "restore", "--jumps-only")
    assert proc.returncode == 0, proc.stderr
    for table, chain in (("filter", "INPUT"), ("filter", "FORWARD"), ("nat", "POSTROUTING")):
        rules = netns.run("iptables", "-t", table, "-S", chain).stdout.splitlines()
        assert rules[1] == f"-A {chain} -j KVMUFW-{chain}", rules


def test_replay_keeps_a_forward_added_to_a_running_network(netns, state_env, tmp_path):
    """`forward add --network` on a running network writes an override: libvirt's live
    XML lacks the forward until the network restarts. replay (every ufw reload, and
    doctor's advice) must keep it, not delete it."""
    live = lab_network()
    with_forward = lab_network('host-port="8088" guest-port="80" guest-ip="10.0.0.22"')
    started_lab(netns, state_env)
    from kvmufw_hook import backends, state
    from kvmufw_hook.ops import network_started, replay
    backend = backends.get("iptables", prefix=netns.prefix)
    from kvmufw_hook.parse import parse_network_xml
    state.save_network_override("lab", with_forward)
    network_started(parse_network_xml(with_forward), with_forward, backend=backend)
    assert dnat_owners(netns, 8088) == {"n=lab"}
    result = replay([live], [], backend=backend)
    assert result.problems == []
    assert dnat_owners(netns, 8088) == {"n=lab"}
    dry = replay([live], [], dry_run=True, backend=backend)
    assert dry.payload == ""  # doctor's comparison: nothing differs


# --------------------------------------------------------------------------- host addresses, services and holders

def test_host_ip_must_be_an_address_of_this_host(netns, state_env):
    started_lab(netns, state_env)
    for host_ip in ("198.51.100.53", "127.0.0.1"):
        dom = domain_xml("web7", "52:54:00:00:00:22",
                         f'host-port="443" guest-port="443" host-ip="{host_ip}"')
        proc = run_hook("qemu", ["web7", "start", "begin", "-"], dom, state_env, netns)
        assert proc.returncode != 0
        assert f"host-ip {host_ip}" in proc.stderr.decode()
        assert dnat_owners(netns, 443) == set()
    netns.run("ip", "addr", "add", "203.0.113.1/24", "dev", "lo")
    dom = domain_xml("web7", "52:54:00:00:00:22",
                     'host-port="443" guest-port="443" host-ip="203.0.113.1"')
    hook_ok(netns, state_env, "qemu", ["web7", "start", "begin", "-"], dom)
    rules = [l for l in netns.save().splitlines() if "-j DNAT" in l]
    assert rules and all("--dst-type LOCAL" in l for l in rules), rules


@pytest.mark.parametrize("proto,ports,listen", [("tcp", "22", 22), ("tcp", "2000-2100", 2050),
                                                ("udp", "5353", 5353)])
def test_a_port_a_host_service_uses_is_refused(netns, state_env, proto, ports, listen):
    started_lab(netns, state_env)
    netns.serve(proto, listen)
    dom = domain_xml("web7", "52:54:00:00:00:22", f'proto="{proto}" host-port="{ports}"')
    proc = run_hook("qemu", ["web7", "start", "begin", "-"], dom, state_env, netns)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and f"host port {listen}/{proto}" in err, err
    assert "python3" in err and f'"domain:web7:{proto}:{listen}"' in err, err
    assert len(err.strip().splitlines()) == 1
    assert dnat_owners(netns, listen) == set()
    xml_only = domain_xml("web7", "52:54:00:00:00:22",
                          f'proto="{proto}" host-port="{ports}" allow-host-service="yes"')
    proc = run_hook("qemu", ["web7", "start", "begin", "-"], xml_only, state_env, netns)
    assert proc.returncode != 0, "guest-writable XML alone must not take a host service"
    with open(state_env["KVMUFW_CONFIG"], "w") as fh:  # root's consent
        fh.write(f'allow_host_service = [ "domain:web7:{proto}:{ports}" ]\n')
    hook_ok(netns, state_env, "qemu", ["web7", "start", "begin", "-"], dom)


def test_replay_keeps_the_current_holder_of_a_port(netns, state_env):
    """`victim` holds 8088 in the kernel; `aaa` (first by name) claims it by live
    metadata edited behind our back. replay keeps victim, refuses aaa, exits non-zero."""
    started_lab(netns, state_env)
    victim = domain_xml("victim", "52:54:00:00:00:21", 'host-port="8088" guest-port="80"')
    aaa = domain_xml("aaa", "52:54:00:00:00:22", 'host-port="8088" guest-port="80"')
    hook_ok(netns, state_env, "qemu", ["victim", "start", "begin", "-"], victim)
    from kvmufw_hook.backends.iptables import IptablesBackend
    from kvmufw_hook.ops import replay
    result = replay([lab_network()], [aaa, victim], backend=IptablesBackend(netns.prefix))
    assert dnat_owners(netns, 8088) == {"d=victim"}
    assert len(result.problems) == 1 and "domain 'aaa'" in result.problems[0]


def test_a_holder_whose_metadata_broke_keeps_its_rules_and_its_ports(netns, state_env):
    started_lab(netns, state_env)
    victim = domain_xml("victim", "52:54:00:00:00:21", 'host-port="8088" guest-port="80"')
    hook_ok(netns, state_env, "qemu", ["victim", "start", "begin", "-"], victim)
    broken = domain_xml("victim", "52:54:00:00:00:21", 'host-port="8088" bogus="1"')
    aaa = domain_xml("aaa", "52:54:00:00:00:22", 'host-port="8088" guest-port="80"')
    from kvmufw_hook.backends.iptables import IptablesBackend
    from kvmufw_hook.ops import replay
    result = replay([lab_network()], [aaa, broken], backend=IptablesBackend(netns.prefix))
    assert dnat_owners(netns, 8088) == {"d=victim"}
    assert any("domain 'aaa'" in p and "victim" in p for p in result.problems), result.problems


def test_a_corrupt_state_file_does_not_blind_the_conflict_check(netns, state_env):
    started_lab(netns, state_env)
    web5 = domain_xml("web5", "52:54:00:00:00:21", 'host-port="8088" guest-port="80"')
    hook_ok(netns, state_env, "qemu", ["web5", "start", "begin", "-"], web5)
    from kvmufw_hook.state import domain_path
    with open(domain_path("web5"), "r+b") as fh:
        fh.truncate(40)
    web6 = domain_xml("web6", "52:54:00:00:00:22", 'host-port="8088" guest-port="80"')
    proc = run_hook("qemu", ["web6", "start", "begin", "-"], web6, state_env, netns)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "already forwarded by domain 'web5'" in err, err
    assert dnat_owners(netns, 8088) == {"d=web5"}
    # a guest start does not even read the state of an owner the kernel's claims hold
    # (a compact record: starts amid hundreds of guests); what reads it reports it
    from kvmufw_hook.backends.iptables import IptablesBackend
    from kvmufw_hook.ops import restore
    problems = restore(backend=IptablesBackend(netns.prefix)).problems
    assert any("web5" in p and "corrupt" in p for p in problems), problems
    hook_ok(netns, state_env, "qemu", ["web5", "stopped", "end", "-"], b"")
    assert dnat_owners(netns, 8088) == set()


def test_state_is_private(netns, state_env):
    started_lab(netns, state_env)
    hook_ok(netns, state_env, *sample("04-qemu.web1.start"))
    top = state_env["KVMUFW_STATE_DIR"]
    for root, _dirs, files in os.walk(top):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o600, name


@pytest.mark.parametrize("planted", ["lock", "domains"])
def test_symlinks_in_the_state_directory_are_not_followed(netns, state_env, tmp_path,
                                                          planted):
    started_lab(netns, state_env)
    victim = tmp_path / "victim"
    victim.mkdir() if planted == "domains" else victim.write_text("precious\n")
    link = os.path.join(state_env["KVMUFW_STATE_DIR"], planted)
    if os.path.isdir(link) and not os.path.islink(link):
        os.rmdir(link)
    elif os.path.lexists(link):
        os.unlink(link)
    os.symlink(victim, link)
    proc = run_hook("qemu", ["web1", "start", "begin", "-"],
                    (SAMPLES / "04-qemu.web1.start.xml").read_bytes(), state_env, netns)
    assert proc.returncode != 0
    assert len(proc.stderr.decode().strip().splitlines()) == 1, proc.stderr
    if planted == "domains":
        assert os.listdir(victim) == []
    else:
        assert victim.read_text() == "precious\n"
    assert dnat_owners(netns, 2222) == set()


def test_without_root_one_line_says_so(netns, state_env):
    for args in (["status"], ["flush"], ["replay"], ["restore"], ["doctor"],
                 ["forward", "add", "web1", "2222:22"]):
        proc = cli(netns, state_env, *args, user="65534")
        assert proc.returncode == 1, (args, proc.stderr)
        assert "needs root" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- doctor

def test_doctor_verdicts_are_exact(netns, state_env):
    """No FAIL for ip_forward off without an active routing network; a jump FAIL names
    only the chains that are wrong."""
    from kvmufw_hook.backends.iptables import IptablesBackend
    from kvmufw_hook.commands import doctor
    from kvmufw_hook.parse import parse_network_xml
    finding = doctor.check_forwarding({})
    assert finding.level in ("OK", "WARN")
    nat = parse_network_xml(default_started_xml())
    if finding.level == "WARN":
        assert doctor.check_forwarding({"default": nat}).level == "FAIL"
    started_lab(netns, state_env)
    netns.run("iptables", "-N", "LIBVIRT_FWX")
    netns.run("iptables", "-I", "FORWARD", "1", "-j", "LIBVIRT_FWX")
    backend = IptablesBackend(netns.prefix)
    assert backend.entry_problems(backend.read()) == ["FORWARD (filter)"]
