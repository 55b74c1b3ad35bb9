"""install.sh in a private host (tests/support/lab.py): what it writes, what it refuses, what it
leaves behind, and when it signals libvirt.

Most tests need no libvirt daemon: a fresh lab (namespaces and overlays, 0.2 s) per test,
so each starts from the machine's own, untouched files. The SIGHUP tests run a real
libvirtd and real guests.
"""

import hashlib
import time

import pytest
from conftest import ROOT
from lab import AFTER_INIT, content, install

from kvmufw_hook.installation import MANIFEST

LIB = "/usr/local/lib/kvmufw_hook"
BIN = "/usr/local/sbin/kvmufw_hook"
QEMU_HOOK = "/etc/libvirt/hooks/qemu.d/kvmufw_hook"
TRACKED = ("/etc/libvirt/hooks /etc/ufw /usr/local/lib /usr/local/sbin /var/lib/kvmufw_hook "
           "/etc/systemd/system /etc/hookstarget")
MARK = "# kvmufw_hook: written by kvmufw_hook install.sh; removed by install.sh --uninstall"
# the after.init block that install.sh wrote up to commit 16cd8a7
LEGACY_BLOCK = """\
# BEGIN kvmufw_hook
# Re-applies kvmufw_hook's rules whenever UFW starts or reloads (see install.sh).
if [ "${1:-}" = start ] && [ -x /usr/local/sbin/kvmufw_hook ]; then
    /usr/local/sbin/kvmufw_hook replay >/dev/null 2>&1 || true
fi
# END kvmufw_hook
"""


def digest(lab) -> str:
    """Every file and directory install.sh may touch: name, mode, owner, type, content,
    symlink target; byte-exact (the package's bytecode aside)."""
    return lab.sh(f"find {TRACKED} -path '*__pycache__*' -prune -o -print 2>/dev/null | sort | "
                  "while read f; do stat -c '%n %a %U %F' \"$f\"; "
                  "[ -L \"$f\" ] && readlink \"$f\"; "
                  "[ -f \"$f\" ] && [ ! -L \"$f\" ] && sha256sum < \"$f\"; done; true").stdout


def without(digest_text: str, *paths: str) -> list[str]:
    """``digest``'s lines but those of ``paths`` (regular files)."""
    out, skip = [], False
    for line in digest_text.splitlines():
        if line.startswith("/"):
            skip = line.split(" ", 1)[0] in paths
        if not skip:
            out.append(line)
    return out


def mode(lab, path: str) -> str:
    return lab.run("stat", "-c", "%a %F", path).stdout.strip()


def one_line(text: str) -> str:
    assert text.count("\n") == 1, text
    return text


def uninstalled_the_rest(lab) -> None:
    """What --uninstall removes whatever it had to leave alone."""
    assert lab.run("test", "-e", LIB, check=False).returncode == 1
    assert lab.run("test", "-e", BIN, check=False).returncode == 1
    assert lab.run("test", "-e", "/etc/libvirt/hooks/network.d/kvmufw_hook",
                   check=False).returncode == 1
    assert lab.run("test", "-e", "/var/lib/kvmufw_hook", check=False).returncode == 1


# --------------------------------------------------------------------------- after.init

def test_a_symlinked_after_init_is_never_written_through(host):
    """install refuses to edit it (one line, nothing written); uninstall
    leaves a link and its target as they are, and removes the rest."""
    host.sh(f"mv {AFTER_INIT} /etc/ufw/after.init.real; ln -s after.init.real {AFTER_INIT}")
    before = digest(host)
    err = install(host, status=1).stderr
    assert "is a symlink" in one_line(err) and "after.init" in err
    assert digest(host) == before  # nothing written, the package included

    # the admin puts the link in after the install: uninstall must not follow it either
    host.sh(f"rm {AFTER_INIT}; mv /etc/ufw/after.init.real {AFTER_INIT}")
    install(host)
    host.sh(f"mv {AFTER_INIT} /etc/ufw/after.init.real; ln -s after.init.real {AFTER_INIT}")
    target, target_mode = content(host, "/etc/ufw/after.init.real"), \
        mode(host, "/etc/ufw/after.init.real")
    out = install(host, "--uninstall").stdout
    assert f"left {AFTER_INIT} alone: it is a symlink" in out
    assert mode(host, AFTER_INIT) == "777 symbolic link"
    assert host.run("readlink", AFTER_INIT).stdout.strip() == "after.init.real"
    assert content(host, "/etc/ufw/after.init.real") == target
    assert mode(host, "/etc/ufw/after.init.real") == target_mode == "740 regular file"
    uninstalled_the_rest(host)


@pytest.mark.parametrize("broken", ["END", "BEGIN"])
def test_uninstall_leaves_after_init_byte_for_byte_when_the_block_is_not_whole(host, broken):
    """A BEGIN without its END (or the reverse) is said in one line, the
    file stays as it was, and everything else is uninstalled."""
    install(host)
    host.sh(f"sed -i '/^# {broken} kvmufw_hook$/d' {AFTER_INIT}")
    before = host.sh(f"sha256sum {AFTER_INIT}; stat -c '%a %i' {AFTER_INIT}").stdout
    out = install(host, "--uninstall").stdout
    assert f"left {AFTER_INIT} unchanged: its kvmufw_hook block is not whole" in out
    assert host.sh(f"sha256sum {AFTER_INIT}; stat -c '%a %i' {AFTER_INIT}").stdout == before
    uninstalled_the_rest(host)
    # and install refuses to add a second block beside what is left of the first
    before = digest(host)
    assert "without the other" in one_line(install(host, status=1).stderr)
    assert digest(host) == before


def test_an_entry_of_an_earlier_install_is_replaced_by_the_bounded_restore(host):
    """Issue 9: after.init must never run `replay` (it connects to libvirt, which waits for
    UFW at boot); an older install's block is ours and the next install replaces it."""
    template = content(host, AFTER_INIT)
    host.sh(f"sed -i '1r /dev/stdin' {AFTER_INIT} <<'EOF'\n{LEGACY_BLOCK}EOF")
    assert "replay >/dev/null 2>&1" in content(host, AFTER_INIT)
    out = install(host).stdout
    assert "replaced the kvmufw_hook entry" in out
    text = content(host, AFTER_INIT)
    assert text.count("# BEGIN kvmufw_hook") == 1 and "replay" not in text
    assert "timeout -k 2 20 /usr/local/sbin/kvmufw_hook restore" in text
    assert "2>&1" not in text  # restore's refusals stay visible
    install(host, "--uninstall")
    assert content(host, AFTER_INIT) == template


def test_an_upgrade_from_the_previous_install_sh(host):
    """Everything the previous install.sh wrote (hooks, command, package, after.init block)
    is recognised as ours: the new install replaces it without a refusal, and uninstall
    then leaves the host as it was before either. (tests/fixtures/install-16cd8a7.sh is
    install.sh as of commit 16cd8a7, run here beside today's package and network hook, and
    the qemu hook of that commit, tests/fixtures/hook-qemu-16cd8a7: it recorded nothing,
    so that hook is known by its sha256, install_files.LEGACY_SHA256.)"""
    old = f"{host.dir}/old"
    host.sh(f"mkdir -p {old} && cp -a {ROOT}/kvmufw_hook {ROOT}/hooks {old}/ && "
            f"cp {ROOT}/tests/fixtures/hook-qemu-16cd8a7 {old}/hooks/qemu && "
            f"cp {ROOT}/tests/fixtures/install-16cd8a7.sh {old}/install.sh")
    pristine = digest(host)
    host.run(f"{old}/install.sh")
    assert "replay >/dev/null 2>&1" in content(host, AFTER_INIT)
    out = install(host).stdout
    assert "replaced the kvmufw_hook entry" in out
    assert "restore" in content(host, AFTER_INIT)
    assert install(host).stdout.startswith("kvmufw_hook install: already installed")
    install(host, "--uninstall")
    assert digest(host) == pristine


def test_an_upgrade_from_the_bash_install_sh_changes_nothing_and_keeps_every_rule(
        libvirt_host):
    """install.sh in bash (tests/fixtures/install-095cef3.sh, the last one) and the Python
    installer write the same bytes: installing over it rewrites only the qemu hook, which
    was Python then (tests/fixtures/hook-qemu-095cef3) and is a shell script now, sends no
    SIGHUP, keeps the network's rules, and uninstall leaves the host as it was."""
    lab = libvirt_host
    old = f"{lab.dir}/old"
    lab.sh(f"mkdir -p {old} && cp -a {ROOT}/kvmufw_hook {ROOT}/hooks {old}/ && "
           f"cp {ROOT}/tests/fixtures/hook-qemu-095cef3 {old}/hooks/qemu && "
           f"cp {ROOT}/tests/fixtures/install-095cef3.sh {old}/install.sh")
    lab.run(f"{old}/install.sh")
    lab.define_network(NET)
    rules = network_rules(lab)
    assert rules
    installed = digest(lab)
    out = install(lab).stdout
    assert [l for l in out.splitlines() if "wrote" in l] == [
        f"kvmufw_hook install: wrote {QEMU_HOOK}"] and "sent" not in out, out
    assert without(digest(lab), QEMU_HOOK, MANIFEST) == without(installed, QEMU_HOOK, MANIFEST)
    assert network_rules(lab) == rules
    assert lab.run(QEMU_HOOK, "web1", "prepare", "begin", "-").returncode == 0
    assert install(lab).stdout.startswith("kvmufw_hook install: already installed")
    install(lab, "--uninstall")
    assert not network_rules(lab)


# --------------------------------------------------------------------------- ownership

def test_an_admin_edited_hook_is_never_overwritten_nor_deleted(host):
    """Ours only if exactly what we wrote (the sha256 we recorded)."""
    install(host)
    host.sh(f"echo '# my own line' >> {QEMU_HOOK}")
    edited = content(host, QEMU_HOOK)
    before = digest(host)
    err = install(host, status=1).stderr
    assert f"{QEMU_HOOK} exists and is not as kvmufw_hook wrote it" in one_line(err)
    assert digest(host) == before
    out = install(host, "--uninstall").stdout
    assert f"left {QEMU_HOOK} alone: not as kvmufw_hook wrote it" in out
    assert content(host, QEMU_HOOK) == edited
    uninstalled_the_rest(host)


def test_a_script_that_quotes_the_marker_is_not_ours(host):
    script = f"#!/bin/sh\n# not kvmufw_hook's, it only quotes it:\n{MARK}\necho mine\n"
    host.run("bash", "-c", f"cat > {BIN}; chmod 755 {BIN}", input=script)
    before = digest(host)
    err = install(host, status=1).stderr
    assert f"{BIN} exists and is not as kvmufw_hook wrote it" in one_line(err)
    assert digest(host) == before
    out = install(host, "--uninstall").stdout
    assert f"left {BIN} alone" in out
    assert content(host, BIN) == script


@pytest.mark.parametrize("link, target", [(BIN, "/etc/hookstarget/kvmufw_hook"),
                                          ("/etc/libvirt/hooks/qemu.d", "/etc/hookstarget"),
                                          (LIB, "/etc/hookstarget")])
def test_install_never_writes_through_a_symlink(host, link, target):
    host.sh(f"mkdir -p /etc/hookstarget /etc/libvirt/hooks $(dirname {link}); "
            f"ln -s {target} {link}")
    before = digest(host)
    err = install(host, status=1).stderr
    assert f"{link} is a symlink" in one_line(err)
    assert digest(host) == before
    assert host.run("ls", "-A", "/etc/hookstarget").stdout == ""


def test_a_failed_install_leaves_nothing_behind(host):
    """A write that fails after others succeeded (here /etc/ufw is full) rolls back
    everything this run wrote: the package, the command, the hooks and their directories."""
    host.sh(f"""
        cp -a /etc/ufw {host.dir}/ufw
        mount -t tmpfs -o size=64k tmpfs /etc/ufw
        cp -a {host.dir}/ufw/. /etc/ufw/
        dd if=/dev/zero of=/etc/ufw/filler bs=4k 2>/dev/null || true
    """)
    before = digest(host)
    dirs = ("/etc/libvirt/hooks", "/etc/libvirt/hooks/network.d", "/etc/libvirt/hooks/qemu.d")

    def existing() -> list[str]:  # Debian 13's libvirt ships /etc/libvirt/hooks, 12's not
        return [d for d in dirs if host.run("test", "-e", d, check=False).returncode == 0]

    there = existing()
    assert "/etc/libvirt/hooks/qemu.d" not in there
    proc = install(host, status=1)
    assert "rolled back what this run wrote" in proc.stderr
    assert "wrote /etc/libvirt/hooks/qemu.d/kvmufw_hook" in proc.stdout  # it had started
    assert digest(host) == before
    assert existing() == there  # the directories it made are gone again
    leftovers = host.sh("find /usr/local /etc /var/lib /run -name '.kvmufw_hook.*' "
                        "-o -name '.after.init.*' -o -name 'kvmufw_hook-install.*'").stdout
    assert leftovers == ""


# --------------------------------------------------------------------------- what is written

def test_the_whole_package_tree_with_safe_modes(host):
    """Every module, subpackages included; package files root's 0644/0755; state 0700."""
    src = f"{host.dir}/src"
    host.sh(f"mkdir -p {src} && cp -a {ROOT}/install.sh {ROOT}/hooks {ROOT}/kvmufw_hook {src}/ "
            f"&& mkdir -p {src}/kvmufw_hook/extra/deeper "
            f"&& echo 'X = 1' > {src}/kvmufw_hook/extra/__init__.py "
            f"&& echo 'Y = 2' > {src}/kvmufw_hook/extra/deeper/mod.py")
    host.run(f"{src}/install.sh")
    sources = sorted(host.sh(f"cd {src} && find kvmufw_hook -name '*.py'").stdout.split())
    installed = sorted(host.sh(f"cd {LIB} && find kvmufw_hook -name '*.py' "
                               "-not -path '*__pycache__*'").stdout.split())
    assert "kvmufw_hook/extra/deeper/mod.py" in installed and installed == sources
    modes = set(host.sh(f"find {LIB} -path '*__pycache__*' -prune -o -printf '%y %m %u\\n' "
                        "| sort -u").stdout.splitlines())
    assert modes == {"d 755 root", "f 644 root"}
    assert host.sh(f"stat -c '%a %U' {BIN} {QEMU_HOOK} /var/lib/kvmufw_hook "
                   "/var/lib/kvmufw_hook/install.manifest").stdout.split("\n")[:4] == \
        ["755 root", "755 root", "700 root", "600 root"]
    manifest = content(host, "/var/lib/kvmufw_hook/install.manifest")
    for path in (BIN, QEMU_HOOK, f"{LIB}/kvmufw_hook/extra/deeper/mod.py"):
        sha = hashlib.sha256(host.run("cat", path).stdout.encode()).hexdigest()
        assert f"file {sha} {path}\n" in manifest


def test_systemd_drop_ins_repair_our_jumps_after_each_daemon_start(host):
    """Where systemd runs: libvirt after UFW, and our jumps first again after every start
    (bounded, never failing the unit); uninstall removes them and their directories."""
    host.sh("mkdir -p /run/systemd/system /etc/systemd/system/libvirtd.service.d")
    # the drop-in of an earlier install.sh is ours: the new one replaces it
    host.run("bash", "-c", "cat > /etc/systemd/system/libvirtd.service.d/kvmufw_hook.conf",
             input=f"{MARK}\n# Start libvirt after UFW, so that UFW's rules are in place "
                   "before networks start.\n[Unit]\nAfter=ufw.service\n")
    install(host)
    for unit in ("libvirtd", "virtnetworkd", "virtqemud"):
        dropin = content(host, f"/etc/systemd/system/{unit}.service.d/kvmufw_hook.conf")
        assert "After=ufw.service" in dropin
        assert ("ExecStartPost=-/bin/sh -c '/usr/bin/timeout 40 /usr/local/sbin/kvmufw_hook "
                "restore --jumps-only --watch 30 </dev/null >/dev/null 2>&1 &'") in dropin
    install(host, "--uninstall")
    for unit in ("libvirtd", "virtnetworkd", "virtqemud"):
        path = f"/etc/systemd/system/{unit}.service.d"
        assert host.run("test", "-e", path, check=False).returncode == 1, path


def test_install_twice_is_install_once_without_a_daemon(host):
    install(host)
    installed = digest(host)
    out = install(host).stdout
    assert "wrote" not in out and "SIGHUP" not in out
    assert digest(host) == installed


def test_after_init_start_is_bounded_and_says_why(host):
    """Issue 9: UFW's start runs after.init; ours must return within seconds whatever
    holds it up (here a stuck holder of our state lock), never fail UFW, and not hide
    why it did nothing."""
    install(host)
    host.sh("mkdir -p -m 700 /run/kvmufw_hook; "
            "flock /run/kvmufw_hook/lock sleep 120 >/dev/null 2>&1 </dev/null & "
            "for i in $(seq 100); do flock -n /run/kvmufw_hook/lock true || exit 0; "
            "sleep 0.05; done; exit 1")
    started = time.monotonic()
    proc = host.run(AFTER_INIT, "start", check=False, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0 and elapsed < 25, (proc.returncode, elapsed)
    assert "'kvmufw_hook restore' from /etc/ufw/after.init exited with status" in proc.stderr
    assert "replay" not in content(host, AFTER_INIT)


# --------------------------------------------------------------------------- SIGHUP

NET = """<network><name>n1</name><forward mode='nat'/><bridge name='virbr7' stp='off'/>
  <ip address='10.77.0.1' prefix='24'><dhcp><range start='10.77.0.100' end='10.77.0.200'/>
  </dhcp></ip></network>"""
LIBVIRTD_LOG = "/var/log/libvirt/libvirtd.log"


@pytest.fixture
def libvirt_host(host):
    """The private host with a libvirtd that logs its SIGHUPs and its errors."""
    host.sh(f"cat >> /etc/libvirt/libvirtd.conf <<'EOF'\n"
            f"log_filters=\"2:daemon.libvirtd 4:*\"\nlog_outputs=\"2:file:{LIBVIRTD_LOG}\"\nEOF")
    host.start_libvirt()
    return host


def sighups(lab) -> int:
    return int(lab.sh(f"grep -c 'Reloading configuration on SIGHUP' {LIBVIRTD_LOG}; true").stdout)


def network_rules(lab) -> list[str]:
    return [line for line in lab.save().splitlines() if "KVMUFW" in line and "10.77.0." in line]


def hooks_seen_by_doctor(lab) -> str:
    import json
    findings = json.loads(lab.run("kvmufw_hook", "doctor", "--json", check=False).stdout)
    return " ".join(f["level"] for f in findings if f["check"] == "hooks seen by the daemon")


def test_one_sighup_only_where_libvirt_needs_it_and_none_on_uninstall(libvirt_host):
    lab = libvirt_host
    pid = lab.libvirtd_pid()
    # started without /etc/libvirt/hooks: libvirt runs no hook until one SIGHUP
    out = install(lab).stdout
    assert out.count("SIGHUP") == 1 and f"sent one SIGHUP to libvirtd ({pid})" in out, out
    assert "it answers again" in out
    assert sighups(lab) == 1
    lab.define_network(NET)  # net-start runs our network hook: the daemon sees it
    assert network_rules(lab)
    assert hooks_seen_by_doctor(lab) == "OK"
    # a second install changes nothing and signals nothing
    out = install(lab).stdout
    assert "SIGHUP" not in out and "already installed: nothing to change" in out
    assert sighups(lab) == 1

    # uninstall sends none: the daemon looks for hooks that are gone and runs nothing
    out = install(lab, "--uninstall").stdout
    assert "SIGHUP" not in out and "sees the hooks" not in out
    lab.virsh("net-destroy", "n1")
    lab.virsh("net-start", "n1")
    lab.define_domain("g1", [("n1", "52:54:00:00:77:05")])
    proc = lab.run("virsh", "-c", "qemu:///system", "start", "g1", check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lab.virsh("destroy", "g1")
    assert sighups(lab) == 1 and not network_rules(lab)
    assert "hook" not in content(lab, LIBVIRTD_LOG).lower()

    # a daemon that found hooks of both kinds when it started runs ours without a SIGHUP
    lab.sh("mkdir -p /etc/libvirt/hooks/network.d /etc/libvirt/hooks/qemu.d; "
           "for d in network qemu; do printf '#!/bin/sh\\nexit 0\\n' "
           "> /etc/libvirt/hooks/$d.d/00-admin; chmod 755 /etc/libvirt/hooks/$d.d/00-admin; done")
    lab.restart_libvirt()
    pid = lab.libvirtd_pid()
    out = install(lab).stdout
    assert f"libvirtd ({pid}) runs the hooks in /etc/libvirt/hooks already: no SIGHUP needed" \
        in out and "sent" not in out
    assert sighups(lab) == 1  # the log goes on: still only the first install's
    lab.virsh("net-destroy", "n1")
    lab.virsh("net-start", "n1")
    assert network_rules(lab)
    assert hooks_seen_by_doctor(lab) == "OK"


def test_empty_hook_directories_at_daemon_start_still_need_the_sighup(host):
    """libvirt 9.0 records at start (and SIGHUP) which drivers have an executable hook;
    an empty network.d/qemu.d is not enough (seen: a drop-in added later never ran).
    So install.sh decides on executable hooks, not on directories, and signals once."""
    host.sh("mkdir -p /etc/libvirt/hooks/network.d /etc/libvirt/hooks/qemu.d")
    host.start_libvirt()
    pid = host.libvirtd_pid()
    out = install(host).stdout
    assert out.count("SIGHUP") == 1 and f"sent one SIGHUP to libvirtd ({pid})" in out
    host.define_network(NET)
    assert network_rules(host)


# --------------------------------------------------------------------------- doctor

PLAIN_HOOKS = ("/etc/libvirt/hooks/network", "/etc/libvirt/hooks/qemu")
DROPIN_HOOKS = ("/etc/libvirt/hooks/network.d/kvmufw_hook", QEMU_HOOK)


def doctor_on_hooks(lab) -> list[tuple[str, str]]:
    import json
    findings = json.loads(lab.run("kvmufw_hook", "doctor", "--json", check=False).stdout)
    return [(f["level"], f["detail"]) for f in findings if f["check"] == "hooks"]


def exists(lab, path: str) -> bool:
    return lab.run("test", "-e", path, check=False).returncode == 0


def pretend_libvirt(lab, version: str) -> None:
    """install.sh asks `libvirtd --version`; /usr/local/sbin comes first in PATH."""
    lab.sh("printf '#!/bin/sh\\necho \"libvirtd (libvirt) %s\"\\n' " + version
           + " > /usr/local/sbin/libvirtd; chmod 755 /usr/local/sbin/libvirtd")


@pytest.mark.parametrize("libvirt, hooks", [("6.0.0", PLAIN_HOOKS), ("6.5.0", DROPIN_HOOKS),
                                            (None, DROPIN_HOOKS)])
def test_doctor_checks_the_hooks_install_sh_wrote(host, libvirt, hooks):
    """Issue 11: one list of our hooks, the one install.sh records: doctor is OK for each
    layout install.sh produces (plain hook files before libvirt 6.5, drop-ins from 6.5;
    None: the lab's own libvirt), and names the file it finds wrong."""
    if libvirt:
        pretend_libvirt(host, libvirt)
    install(host)
    other = PLAIN_HOOKS if hooks == DROPIN_HOOKS else DROPIN_HOOKS
    assert all(exists(host, p) for p in hooks) and not any(exists(host, p) for p in other)
    assert doctor_on_hooks(host) == [
        ("OK", f"installed: {hooks[0]}, {hooks[1]} (no libvirt daemon running)")]
    host.sh(f"chmod 644 {hooks[1]}")
    assert doctor_on_hooks(host) == [("FAIL", f"{hooks[1]} is not executable")]
    host.sh(f"chmod 755 {hooks[1]}; echo '# mine' >> {hooks[0]}")
    assert doctor_on_hooks(host)[0] == ("WARN", f"{hooks[0]} changed since install.sh wrote it")


def test_doctor_without_an_install_says_so(host):
    """No record, no guess: doctor (run from the source tree) says what to run."""
    import json
    proc = host.run("python3", "-m", "kvmufw_hook", "doctor", "--json", check=False,
                    env={"PYTHONPATH": str(ROOT)})
    [hooks] = [f for f in json.loads(proc.stdout) if f["check"] == "hooks"]
    assert hooks["level"] == "FAIL" and "no record of installed hooks" in hooks["detail"]
    assert hooks["fix"] == "sudo ./install.sh"


def test_a_libvirt_upgrade_past_6_5_moves_our_hooks_into_the_drop_in_directories(host):
    """libvirt >= 6.5 runs hooks/qemu and every qemu.d/ entry: the install after the
    upgrade removes the plain hook files it wrote before (else each call ran twice),
    doctor checks the drop-ins, and uninstall leaves the host as it was."""
    pristine = digest(host)
    pretend_libvirt(host, "6.0.0")
    install(host)
    host.sh("rm /usr/local/sbin/libvirtd")  # the upgrade: the lab's own libvirt, 9.x
    out = install(host).stdout
    for path in PLAIN_HOOKS:
        assert f"removed {path}: kvmufw_hook's hooks are {DROPIN_HOOKS[0]} and " \
               f"{DROPIN_HOOKS[1]} for this libvirt" in out
        assert not exists(host, path)
        manifest = content(host, "/var/lib/kvmufw_hook/install.manifest").splitlines()
        assert not [line for line in manifest if line.endswith(f" {path}")], manifest
    assert doctor_on_hooks(host) == [
        ("OK", f"installed: {DROPIN_HOOKS[0]}, {DROPIN_HOOKS[1]} (no libvirt daemon running)")]
    assert install(host).stdout.startswith("kvmufw_hook install: already installed")
    install(host, "--uninstall")
    assert digest(host) == pristine


def test_an_admin_hook_file_stays_beside_our_drop_ins(host):
    """/etc/libvirt/hooks/qemu that no install wrote is the admin's: never retired."""
    script = "#!/bin/sh\nexit 0\n"
    host.run("bash", "-c", "mkdir -p /etc/libvirt/hooks && cat > /etc/libvirt/hooks/qemu "
             "&& chmod 755 /etc/libvirt/hooks/qemu", input=script)
    out = install(host).stdout
    assert "/etc/libvirt/hooks/qemu:" not in out and "left" not in out
    assert content(host, "/etc/libvirt/hooks/qemu") == script
    install(host, "--uninstall")
    assert content(host, "/etc/libvirt/hooks/qemu") == script
