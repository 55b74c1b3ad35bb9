"""The Debian package kvmufw-hook, built from this tree by ./build-deb.sh (lintian clean),
installed with apt in a private host whose /usr is an overlay too (tests/support/lab.py) beside a
real libvirtd: it works without a reboot, takes an install.sh install over without losing
a forward, `remove` takes the rules away and keeps the configuration, reinstall keeps
every forward, and `purge` leaves nothing of ours."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, need_root_tools

lab_module = pytest.importorskip("lab")

NET = """<network><name>n1</name><forward mode='nat'/><bridge name='virbr7' stp='off'/>
  <ip address='10.77.0.1' prefix='24'><dhcp><range start='10.77.0.100' end='10.77.0.200'/>
  <host mac='52:54:00:00:77:05' ip='10.77.0.5'/></dhcp></ip></network>"""
FORWARD = '<forwards><forward host-port="2222" guest-port="22"/></forwards>'
AFTER_INIT = "/etc/ufw/after.init"
# everything of ours a purge must take away, and what install.sh writes
OURS = ("/etc/libvirt/hooks /etc/ufw /usr/local/lib /usr/local/sbin /var/lib/kvmufw_hook "
        "/usr/sbin/kvmufw_hook /usr/lib/kvmufw-hook /usr/lib/python3/dist-packages/kvmufw_hook "
        "/usr/lib/systemd/system/libvirtd.service.d /usr/share/doc/kvmufw-hook")


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    need_root_tools("dpkg-buildpackage", "lintian", *lab_module.PACKAGES_TOOLS)
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run([str(ROOT / "build-deb.sh"), str(out)], capture_output=True,
                          text=True, timeout=600)
    # build-deb.sh runs lintian with --fail-on error,warning: no error, no warning
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [path] = out.glob("kvmufw-hook_*_all.deb")
    return str(path)


@pytest.fixture(scope="module")
def host(deb):
    """One private host for the module: libvirtd running, a NAT network and a guest
    with a forward, kvmufw_hook installed by install.sh first (the upgrade path)."""
    lab = lab_module.Lab(overlay_usr=True)
    try:
        lab.pristine = digest(lab)  # type: ignore[attr-defined]
        lab.start_libvirt()
        lab.run(str(ROOT / "install.sh"))
        lab.define_network(NET)
        lab.define_domain("g1", [("n1", "52:54:00:00:77:05")])
        lab.virsh("metadata", "g1", "urn:kvmufw:1", "--key", "kvmufw", "--config", "--set",
                  FORWARD)
        lab.virsh("start", "g1")
        yield lab
    finally:
        lab.destroy()


def digest(lab) -> str:
    return lab.sh(f"find {OURS} -path '*__pycache__*' -prune -o -print 2>/dev/null | sort | "
                  "while read f; do stat -c '%n %a %U %F' \"$f\"; "
                  "[ -L \"$f\" ] && readlink \"$f\"; "
                  "[ -f \"$f\" ] && [ ! -L \"$f\" ] && sha256sum < \"$f\"; done; true").stdout


def forward_rules(lab) -> list[str]:
    return [l for l in lab.save().splitlines() if "KVMUFW" in l and "--dport 2222" in l]


def network_rules(lab) -> list[str]:
    return [l for l in lab.save().splitlines() if "KVMUFW" in l and "10.77.0.0/24" in l]


def doctor(lab, check: str) -> list[str]:
    proc = lab.run("kvmufw_hook", "doctor", "--json", check=False)
    return [f"{f['level']} {f['detail']}" for f in json.loads(proc.stdout) if f["check"] == check]


def apt(lab, *args: str) -> str:
    """apt as the README says it. Nothing to download: the dependencies are installed
    already, and the lab has no way out (recommended packages left out for that)."""
    return lab.run("apt", "-y", "-q", "--no-install-recommends", *args,
                   env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=120).stdout


def exists(lab, path: str) -> bool:
    return lab.run("test", "-e", path, check=False).returncode == 0


def test_the_package_takes_over_an_install_sh_install_without_losing_a_forward(host, deb):
    forwards, networks = forward_rules(host), network_rules(host)
    assert forwards and networks
    out = apt(host, "install", deb)
    # libvirtd runs install.sh's hooks at those very paths: no SIGHUP
    assert "no SIGHUP needed" in out and "sent" not in out
    assert "removed /usr/local/sbin/kvmufw_hook (install.sh's" in out
    # install.sh's after.init entry runs a command that is gone: the package says so
    assert "run once: kvmufw_hook ufw-entry add" in out
    assert not exists(host, "/usr/local/lib/kvmufw_hook")
    assert host.run("sh", "-c", "command -v kvmufw_hook").stdout.strip() == \
        "/usr/sbin/kvmufw_hook"
    assert forward_rules(host) == forwards and network_rules(host) == networks
    host.run("kvmufw_hook", "ufw-entry", "add")
    assert "-x /usr/sbin/kvmufw_hook ]" in host.run("cat", AFTER_INIT).stdout
    assert host.run("grep", "-c", "BEGIN kvmufw_hook", AFTER_INIT).stdout.strip() == "1"


def test_the_packaged_hooks_run_without_a_reboot_and_doctor_checks_them(host):
    """libvirt runs the drop-ins (symlinks to the package's hooks): a guest's restart
    takes its forward out and puts it back."""
    host.virsh("destroy", "g1")
    assert not forward_rules(host)
    host.virsh("start", "g1")
    assert forward_rules(host)
    assert doctor(host, "hooks") == ["OK installed: /etc/libvirt/hooks/network.d/kvmufw_hook, "
                                     "/etc/libvirt/hooks/qemu.d/kvmufw_hook"]
    assert doctor(host, "UFW after.init") == ["OK restores kvmufw_hook's rules on every UFW "
                                              "start"]
    # a reload with MANAGE_BUILTINS=yes flushes every chain: UFW's after.init (the
    # admin's entry) puts ours back through the package's command
    host.sh("for t in filter nat mangle; do iptables -t $t -F; iptables -t $t -X; done")
    assert not forward_rules(host)
    host.run(AFTER_INIT, "start")
    assert forward_rules(host)


def test_reinstall_keeps_every_forward(host, deb):
    forwards = forward_rules(host)
    out = apt(host, "install", "--reinstall", deb)
    assert "sent" not in out and forward_rules(host) == forwards


def test_remove_takes_the_rules_away_and_keeps_the_configuration(host, deb):
    apt(host, "remove", "kvmufw-hook")
    assert not forward_rules(host) and not network_rules(host)
    for path in ("/etc/libvirt/hooks/qemu.d/kvmufw_hook", "/usr/sbin/kvmufw_hook",
                 "/usr/lib/python3/dist-packages/kvmufw_hook"):
        assert not exists(host, path), path
    assert "BEGIN kvmufw_hook" in host.run("cat", AFTER_INIT).stdout  # the admin's entry
    # a guest starts and stops without the hooks: libvirt finds none and runs nothing
    host.virsh("destroy", "g1")
    host.virsh("start", "g1")
    assert not forward_rules(host)
    # installed again: libvirtd, which found no hook since the removal, gets one SIGHUP;
    # the forward is back (from the guest's own metadata, by replay)
    out = apt(host, "install", deb)
    assert "sent one SIGHUP to libvirtd" in out, out
    assert forward_rules(host)


def test_purge_after_the_admins_ufw_entry_remove_leaves_nothing_of_ours(host):
    host.run("kvmufw_hook", "ufw-entry", "remove")
    apt(host, "purge", "kvmufw-hook")
    assert not forward_rules(host)
    assert not exists(host, "/var/lib/kvmufw_hook") and not exists(host, "/run/kvmufw_hook")
    assert digest(host) == host.pristine  # type: ignore[attr-defined]
