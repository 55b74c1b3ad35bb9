"""A fleet of two KVM hosts (tests/support/lab.py, twice): the Ansible role of the README's
``## Fleets`` section run with ``ansible-playbook`` against both, and guests live-migrated
between them with their forwards (docs/fleet.md).

Each host has its own mount + network namespace, its own libvirtd listening on TCP with
its own host UUID, the same NAT network ``lab`` with the same reservations, real UFW, an
"internet" namespace behind eth0 and guest namespaces standing in for the guests: a packet
answered by host B's g5 proves the forward is on B. The hosts are linked by ``mig0``
(198.18.0.1 <-> 198.18.0.2), the way libvirt migrates between them. The playbook runs
inside each host (``connection: local`` through nsenter), both hosts at once. One fleet for
the whole module: the Ansible tests come first and tell one story in order (a dry run, the
first run installs the package, a second run, ...), each able to run alone too (the
``web1`` fixture makes what the first run leaves); the migration tests after.
"""

from __future__ import annotations

import json
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, need_root_tools

lab_module = pytest.importorskip("lab")
Lab = lab_module.Lab

NET = """<network><name>lab</name><forward mode='nat' dev='eth0'/>
  <bridge name='virbr1' stp='off'/>
  <ip address='10.0.0.1' prefix='24'><dhcp><range start='10.0.0.100' end='10.0.0.200'/>
    <host mac='52:54:00:00:00:05' ip='10.0.0.5'/><host mac='52:54:00:00:00:06' ip='10.0.0.6'/>
    <host mac='52:54:00:00:00:07' ip='10.0.0.7'/><host mac='52:54:00:00:00:08' ip='10.0.0.8'/>
  </dhcp></ip></network>"""
GUESTS = {"g5": "10.0.0.5", "g6": "10.0.0.6", "g7": "10.0.0.7"}  # namespaces on each host
LINK = {"a": "198.18.0.1", "b": "198.18.0.2"}
INTERNET = "203.0.113.1"  # each host's eth0 (the internet namespace behind it is .2)
VIRT_TYPE = "kvm" if lab_module.kvm_usable() else "qemu"


def forwards(*lines: str) -> str:
    return ('<kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">'
            + "".join(f"<kvmufw:forward {l}/>" for l in lines) + "</kvmufw:forwards>")


def readme_files() -> dict[str, str]:
    """The files of the README's ``## Fleets`` section: each ```yaml block, named by
    its first line (``# site.yml``)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Fleets\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return {block.splitlines()[0].lstrip("# ").strip(): block for block in blocks}


class Fleet:
    def __init__(self) -> None:
        self.hosts: dict[str, Lab] = {}

    def __getitem__(self, name: str) -> Lab:
        return self.hosts[name]

    def both(self, fn):
        with ThreadPoolExecutor(len(self.hosts)) as pool:
            return dict(zip(self.hosts, pool.map(fn, self.hosts.values()), strict=True))


def make_host(uuid: str) -> Lab:
    host = Lab()
    try:
        host.listen_tcp(uuid)
        host.start_libvirt()
        host.define_network(NET)
        host.sh("ufw --force enable >/dev/null")  # deny incoming, deny routed
        for ns, ip in GUESTS.items():
            host.add_guest_ns(ns, "virbr1", ip, 24, "10.0.0.1")
            host.serve(ns, "tcp", 22, 80)
    except BaseException:
        host.destroy()
        raise
    return host


@pytest.fixture(scope="module")
def fleet():
    need_root_tools(*lab_module.PACKAGES_TOOLS, "ansible-playbook")
    the_fleet = Fleet()
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(make_host, f"5a1e0000-0000-4000-8000-00000000000{i}")
                       for i, name in enumerate(LINK, 1)}
        failed = [f.exception() for f in futures.values() if f.exception()]
        the_fleet.hosts = {name: f.result() for name, f in futures.items() if not f.exception()}
        if failed:
            raise failed[0]  # the host that did start is destroyed below
        a, b = the_fleet["a"], the_fleet["b"]
        a.link(b, "mig0", LINK["a"], LINK["b"])
        the_fleet.both(lambda h: h.sh("ufw allow in on mig0 >/dev/null"))  # or virsh hangs
        for name, host in the_fleet.hosts.items():
            write_inventory(host, name)
        yield the_fleet
    finally:
        for host in the_fleet.hosts.values():
            host.destroy()


def write_inventory(host: Lab, name: str) -> None:
    """The README's playbook and group_vars, and an inventory of this one host run
    locally as root (no sudo in the lab: ``ansible_become`` off)."""
    files = readme_files()
    inventory = f"{host.dir}/ansible/inventory"
    host.sh(f"mkdir -p {inventory}/group_vars {host.dir}/ansible/home {host.dir}/ansible/tmp")
    host.run("bash", "-c", f"cat > {host.dir}/ansible/site.yml", input=files["site.yml"])
    host.run("bash", "-c", f"cat > {inventory}/group_vars/kvm_hosts.yml",
             input=files["group_vars/kvm_hosts.yml"])
    host.run("bash", "-c", f"cat > {inventory}/hosts.ini", input=textwrap.dedent(f"""\
        [kvm_hosts]
        {name} ansible_connection=local ansible_become=false ansible_python_interpreter=/usr/bin/python3
        """))


def playbook(host: Lab, *args: str, extra: dict | None = None, failing: bool = False):
    """ansible-playbook run inside ``host``; (recap counts, output). It must succeed,
    or fail if ``failing``."""
    base = f"{host.dir}/ansible"
    if extra is not None:
        host.run("bash", "-c", f"cat > {base}/extra.json", input=json.dumps(extra))
    proc = host.run(
        "ansible-playbook", "-i", f"{base}/inventory/hosts.ini", f"{base}/site.yml",
        *(["-e", f"@{base}/extra.json"] if extra is not None else []), *args,
        check=False, timeout=300,
        env={"HOME": f"{base}/home", "TMPDIR": f"{base}/tmp",
             "ANSIBLE_ROLES_PATH": str(ROOT / "contrib" / "ansible"),
             "ANSIBLE_LOCAL_TEMP": f"{base}/tmp", "ANSIBLE_REMOTE_TEMP": f"{base}/tmp",
             "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
             "PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C.UTF-8"})
    out = proc.stdout + proc.stderr
    recap = re.search(r"^\S+\s+: (ok=.*)$", out, re.M)
    assert recap, out[-3000:]
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap.group(1))}
    assert (proc.returncode != 0 and counts["failed"] > 0) if failing else \
        (proc.returncode == 0 and counts["failed"] == 0), out[-3000:]
    return counts, out


def run_both(fleet: Fleet, *args: str, extra: dict | None = None) -> dict:
    return fleet.both(lambda h: playbook(h, *args, extra=extra))


def ask(host: Lab, port: int, address: str = INTERNET) -> str | None:
    """What the guest namespace behind ``host``'s forward answers (None: nothing)."""
    return host.ask("inet", "tcp", address, port, 1.5)


def metadata(host: Lab, domain: str, *flags: str) -> str:
    return host.virsh("dumpxml", *flags, domain)


def ours(host: Lab, owner: str) -> list[str]:
    return [l for l in host.save().splitlines() if f"kvmufw:{owner}," in l]


# --------------------------------------------------------------------------- Ansible

WEB1 = [{"host_port": 2222, "guest_port": 22},
        {"host_port": 8080, "guest_port": 80, "source": "203.0.113.0/24", "comment": "web"}]
LAB = [{"host_port": 8081, "guest_port": 80, "guest_mac": "52:54:00:00:00:06"}]


def test_the_readme_playbook_installs_configures_and_declares_forwards(fleet):
    a, b = fleet["a"], fleet["b"]
    a.define_domain("web1", [("lab", "52:54:00:00:00:05")], virt_type=VIRT_TYPE)
    a.virsh("start", "web1")
    assert ask(a, 2222) is None
    # a dry run first, as an admin would: it says what it would do and does none of it
    results = run_both(fleet, "--check", "--diff")
    assert all(counts["changed"] > 0 for counts, _ in results.values())
    assert '+domain web1 (live): <forward guest-port="22" host-port="2222"/>' in \
        results["a"][1]
    for host in (a, b):
        assert host.run("sh", "-c", "ls /usr/local/sbin/kvmufw_hook /etc/kvmufw_hook",
                        check=False).returncode != 0
    assert 'host-port="2222"' not in metadata(a, "web1", "--inactive")

    results = run_both(fleet)
    assert all(counts["changed"] > 0 for counts, _ in results.values())
    for host in (a, b):
        assert host.run("kvmufw_hook", "--version").returncode == 0
        conf = host.run("cat", "/etc/kvmufw_hook/kvmufw_hook.conf").stdout
        assert 'firewall_backend = "iptables"\n' in conf
        assert ask(host, 8081) == "203.0.113.2"  # the network's forward, on both hosts
        assert 'host-port="8081"' in host.virsh("net-dumpxml", "--inactive", "lab")
    # web1 runs on A only: its forwards there, live and persistent; B skipped it
    assert ask(a, 2222) == "203.0.113.2" and ask(a, 8080) == "203.0.113.2"
    assert ask(b, 2222) is None
    for flags in ((), ("--inactive",)):
        assert 'host-port="2222"' in metadata(a, "web1", *flags)
        assert 'comment="web"' in metadata(a, "web1", *flags)


@pytest.fixture
def web1(fleet):
    """web1 running on A with the README's forwards applied, as the first run leaves it
    (made here when a test of the story runs alone)."""
    a = fleet["a"]
    if "web1" not in a.virsh("list", "--all", "--name").split():
        a.define_domain("web1", [("lab", "52:54:00:00:00:05")], virt_type=VIRT_TYPE)
        a.virsh("start", "web1")
        run_both(fleet)
    return fleet


def test_a_second_run_changes_nothing(fleet, web1):
    results = run_both(fleet)
    assert {name: counts["changed"] for name, (counts, _) in results.items()} == \
        {"a": 0, "b": 0}


def test_check_mode_and_diff_say_what_would_change_and_change_nothing(fleet, web1):
    a = fleet["a"]
    wanted = {"kvmufw_hook_domain_forwards": {"web1": [*WEB1, {"host_port": 2223,
                                                                "guest_port": 22}]},
              "kvmufw_hook_firewall_backend": "nftables"}
    conf = "/etc/kvmufw_hook/kvmufw_hook.conf"
    before = (metadata(a, "web1"), metadata(a, "web1", "--inactive"), a.save(),
              a.run("cat", conf).stdout)
    counts, out = playbook(a, "--check", "--diff", extra=wanted)
    assert counts["changed"] == 2, out  # the configuration file and web1's forwards
    assert '-firewall_backend = "iptables"\n+firewall_backend = "nftables"' in out
    assert '+domain web1 (live): <forward guest-port="22" host-port="2223"/>' in out
    assert '+domain web1 (persistent): <forward guest-port="22" host-port="2223"/>' in out
    assert (metadata(a, "web1"), metadata(a, "web1", "--inactive"), a.save(),
            a.run("cat", conf).stdout) == before
    assert ask(a, 2223) is None


def test_a_forward_the_package_refuses_fails_the_play_with_its_line(fleet, web1):
    """The network lab holds 8081 on every host: web1 may not take it. The task fails
    with the package's one line; nothing of web1's changes."""
    a = fleet["a"]
    before = (metadata(a, "web1"), metadata(a, "web1", "--inactive"), a.save())
    clash = {"kvmufw_hook_domain_forwards": {"web1": [*WEB1, {"host_port": 8081,
                                                               "guest_port": 80}]}}
    counts, out = playbook(a, extra=clash, failing=True)
    assert counts["failed"] == 1
    assert ("forward tcp 8081->80: host port already forwarded by network 'lab'") in out, out
    assert (metadata(a, "web1"), metadata(a, "web1", "--inactive"), a.save()) == before


def test_a_forward_removed_from_the_inventory_goes_only_when_told(fleet, web1):
    a = fleet["a"]
    fewer = {"kvmufw_hook_domain_forwards": {"web1": WEB1[:1]}}
    counts, out = playbook(a, extra=fewer)
    assert counts["changed"] == 0, out  # not told: 8080 stays
    assert ask(a, 8080) == "203.0.113.2"
    counts, out = playbook(a, "--diff", extra={**fewer,
                                               "kvmufw_hook_remove_unlisted_forwards": True})
    assert counts["changed"] == 1, out
    assert '-domain web1 (live): <forward comment="web"' in out
    assert ask(a, 8080) is None and ask(a, 2222) == "203.0.113.2"
    for flags in ((), ("--inactive",)):
        assert 'host-port="8080"' not in metadata(a, "web1", *flags)
    counts, out = playbook(a, extra={**fewer, "kvmufw_hook_remove_unlisted_forwards": True})
    assert counts["changed"] == 0, out


def migrate(source: Lab, guest: str, to: str, check: bool = True):
    proc = source.run("virsh", "-c", "qemu:///system", "migrate", "--live", "--persistent",
                      "--undefinesource", guest, f"qemu+tcp://{LINK[to]}/system",
                      "--migrateuri", f"tcp://{LINK[to]}", check=False, timeout=120)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def test_a_guest_migrated_between_the_hosts_keeps_the_declared_forwards(fleet, web1):
    a, b = fleet["a"], fleet["b"]
    migrate(a, "web1", "b")
    assert ask(b, 2222) == "203.0.113.2" and ask(a, 2222) is None
    results = run_both(fleet, extra={"kvmufw_hook_domain_forwards": {"web1": WEB1[:1]}})
    assert {name: counts["changed"] for name, (counts, _) in results.items()} == \
        {"a": 0, "b": 0}
    assert ask(b, 2222) == "203.0.113.2"
    b.virsh("destroy", "web1")
    b.virsh("undefine", "web1")


# --------------------------------------------------------------------------- migration

@pytest.fixture
def installed(fleet):
    """The package on both hosts (the playbook put it there; install.sh if run alone)."""
    fleet.both(lambda h: h.run("kvmufw_hook", "--version", check=False).returncode == 0
               or h.run(str(ROOT / "install.sh")))
    yield fleet
    for host in fleet.hosts.values():
        for name in ("db1", "holder"):
            host.virsh("destroy", name, check=False)
            host.virsh("undefine", name, check=False)


def status(host: Lab, domain: str) -> list[tuple[str, bool]]:
    """``kvmufw_hook status --json`` of the host: (forward, rules present) of ``domain``."""
    report = json.loads(host.run("kvmufw_hook", "status", "--json").stdout)
    return [(f"{f['proto']} {f['host_port']}->{f['guest_port']}", f["present"])
            for d in report["domains"] if d["name"] == domain for f in d["forwards"]]


def state_of(host: Lab, domain: str) -> str:
    """Our state files (/run/kvmufw_hook) that name ``domain`` or mention it ("": none)."""
    return host.sh(f"find /run/kvmufw_hook -name '*{domain}*'; "
                   f"grep -rlw -- '{domain}' /run/kvmufw_hook; true").stdout


def test_forwards_follow_a_live_migrated_guest_and_migrating_back_leaves_nothing(installed):
    a, b = installed["a"], installed["b"]
    b_before = b.save()
    a.define_domain("db1", [("lab", "52:54:00:00:00:07")],
                    forwards('host-port="5222" guest-port="22"'), virt_type=VIRT_TYPE)
    a.virsh("start", "db1")
    assert ask(a, 5222) == "203.0.113.2" and ask(b, 5222) is None

    migrate(a, "db1", "b")
    assert "db1" in b.virsh("list", "--name") and "db1" not in a.virsh("list", "--all", "--name")
    assert ask(b, 5222) == "203.0.113.2"  # B's guest namespace answers: the rules are on B
    assert ask(a, 5222) is None and ours(a, "d=db1") == []
    assert status(a, "db1") == [] and status(b, "db1") == [("tcp 5222->22", True)]
    assert state_of(a, "db1") == "" and state_of(b, "db1") != ""

    migrate(b, "db1", "a")
    assert ask(a, 5222) == "203.0.113.2" and ask(b, 5222) is None
    assert status(a, "db1") == [("tcp 5222->22", True)]
    assert b.save() == b_before and state_of(b, "db1") == ""  # nothing left behind on B
    assert status(b, "db1") == []


def test_a_port_held_on_the_destination_refuses_the_migration(installed):
    a, b = installed["a"], installed["b"]
    a.define_domain("db1", [("lab", "52:54:00:00:00:07")],
                    forwards('host-port="5222" guest-port="22"'), virt_type=VIRT_TYPE)
    a.virsh("start", "db1")
    b.define_domain("holder", [("lab", "52:54:00:00:00:08")],
                    forwards('host-port="5222" guest-port="22"'), virt_type=VIRT_TYPE)
    b.virsh("start", "holder")
    b_before = b.save()
    proc = migrate(a, "db1", "b", check=False)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if "kvmufw_hook:" in l]
    assert len(lines) == 1 and "kvmufw_hook: qemu migrate db1: " in lines[0], proc.stderr
    assert ("domain 'db1': forward tcp 5222->22: host port already forwarded by "
            "domain 'holder' (forward tcp 5222->22)") in lines[0]
    assert a.virsh("domstate", "db1").strip() == "running"
    assert ask(a, 5222) == "203.0.113.2"  # still on A, with its forward
    assert "db1" not in b.virsh("list", "--all", "--name")
    assert b.save() == b_before


def test_a_host_ip_missing_on_the_destination_refuses_the_migration(installed):
    """The forward is a promise about one address: B without it refuses the guest (one
    line, the guest stays on A); once the address is B's, the guest moves with it."""
    a, b = installed["a"], installed["b"]
    a.sh("ip addr add 203.0.113.10/24 dev eth0")
    try:
        a.define_domain("db1", [("lab", "52:54:00:00:00:07")],
                        forwards('host-port="5223" guest-port="22" host-ip="203.0.113.10"'),
                        virt_type=VIRT_TYPE)
        a.virsh("start", "db1")
        assert ask(a, 5223, "203.0.113.10") == "203.0.113.2"
        b_before = b.save()
        proc = migrate(a, "db1", "b", check=False)
        assert proc.returncode != 0
        lines = [l for l in proc.stderr.splitlines() if "kvmufw_hook:" in l]
        assert len(lines) == 1 and "kvmufw_hook: qemu migrate db1: domain 'db1'" in lines[0], \
            proc.stderr
        assert "host-ip 203.0.113.10 is not an address of this host" in lines[0]
        assert a.virsh("domstate", "db1").strip() == "running"
        assert ask(a, 5223, "203.0.113.10") == "203.0.113.2"
        assert b.save() == b_before and "db1" not in b.virsh("list", "--all", "--name")
        # the admin moves the service address, then the guest
        a.sh("ip addr del 203.0.113.10/24 dev eth0")
        b.sh("ip addr add 203.0.113.10/24 dev eth0")
        migrate(a, "db1", "b")
        assert ask(b, 5223, "203.0.113.10") == "203.0.113.2"
        assert ours(a, "d=db1") == []
    finally:
        for host in (a, b):
            host.sh("ip addr del 203.0.113.10/24 dev eth0 2>/dev/null || true")


def test_the_readme_section_holds_the_playbook_this_module_runs():
    files = readme_files()
    assert set(files) == {"site.yml", "group_vars/kvm_hosts.yml"}
    assert "kvmufw_hook" in files["site.yml"]
