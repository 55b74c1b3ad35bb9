"""``kvmufw_hook doctor``: check the host, each finding OK / WARN / FAIL with its fix."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .. import backends, config, state
from ..backends import LibvirtFirewall, libvirt_firewall
from ..backends.base import AnyBackend
from ..errors import ApplyError, ConfigError, InputError
from ..installation import (
    HOOK_DRIVERS,
    MANIFEST,
    after_init_command,
    file_sha256,
    hooks_appeared,
    install_command,
    installed_hooks,
    missed_hooks,
    running_daemons,
)
from ..model import Network
from ..names import config_path
from . import add_connect, describe, write_json

Networks = Mapping[str, Network]

@dataclass
class Finding:
    level: str  # OK, WARN, FAIL
    check: str
    detail: str
    fix: str = ""


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _setting(text: str | None, key: str) -> str | None:
    for line in (text or "").splitlines():
        line = line.strip()
        if line.startswith(f"{key}=") or line.startswith(f"{key} ="):
            return line.split("=", 1)[1].strip().strip('"').strip("'")
    return None


# Each family's forwarding switch. Paths take a root prefix so tests can stand a temp
# directory in for /proc and /etc.
FORWARDING = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}
SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
IPV6_PROC = "/proc/sys/net/ipv6"  # absent: the kernel has no IPv6 (ipv6.disable=1)
UFW_CONF = "/etc/ufw/ufw.conf"
UFW_DEFAULT = "/etc/default/ufw"
UFW_AFTER_INIT = "/etc/ufw/after.init"
ROUTING_MODES = ("nat", "route", "open")


def _routing(networks: Networks, family: int) -> list[str]:
    """The active networks that route guests of ``family`` beyond the host."""
    return sorted(n.name for n in networks.values() if n.mode in ROUTING_MODES
                  and any(i.version == family for i in n.interfaces))


def _has_ipv6(networks: Networks | None) -> list[str]:
    return sorted(n.name for n in (networks or {}).values() if n.managed and n.ipv6)


def check_forwarding(networks: Networks, family: int = 4, root: str = "") -> Finding:
    """Forwarding off is a failure only while a network that routes that family is
    active: libvirt turns it on itself when such a network starts."""
    check = "IP forwarding" if family == 4 else "IPv6 forwarding"
    key = SYSCTL[family]
    if family == 6 and not os.path.isdir(root + IPV6_PROC):
        return Finding("OK", check, f"IPv6 is off in this kernel (no {IPV6_PROC}): "
                       "guests get IPv4 only, and kvmufw_hook writes IPv4 rules only")
    value = (_read(root + FORWARDING[family]) or "").strip()
    if value == "1":
        return Finding("OK", check, f"{key} = 1")
    routing = _routing(networks, family)
    if not routing and family == 6:  # most hosts: no IPv6 network, nothing to forward
        return Finding("OK", check, f"{key} = {value or '?'}; no nat, route or open network "
                       "with an IPv6 subnet is active (libvirt turns it on when one starts)")
    if not routing:
        return Finding("WARN", check, f"{key} = {value or '?'}; no nat, route or open "
                       f"network with an IPv{family} subnet is active, and libvirt turns it on "
                       "when one starts", "nothing to do unless guests cannot reach beyond "
                       "the host")
    fix = f"sysctl -w {key}=1"
    if family == 6:  # with forwarding on, Linux ignores router advertisements (accept_ra=1)
        fix += (" (a host that learns its own IPv6 route from router advertisements: "
                "first sysctl -w net.ipv6.conf.UPLINK.accept_ra=2)")
    return Finding("FAIL", check, f"{key} = {value or '?'} while {', '.join(routing)} "
                   f"{'is' if len(routing) == 1 else 'are'} active: guests cannot reach "
                   f"anything beyond the host{' over IPv6' if family == 6 else ''}", fix)


def check_ufw(networks: Networks | None = None, root: str = "") -> list[Finding]:
    conf, default = _read(root + UFW_CONF), _read(root + UFW_DEFAULT)
    if conf is None:
        return [Finding("OK", "UFW", "not installed: kvmufw_hook works beside any iptables "
                        "firewall")]
    out = []
    enabled = (_setting(conf, "ENABLED") or "no").lower() == "yes"
    out.append(Finding("OK" if enabled else "WARN", "UFW", "active" if enabled else
                       "installed but not enabled", "" if enabled else "ufw enable"))
    policy = _setting(default, "DEFAULT_FORWARD_POLICY") or "DROP"
    out.append(Finding("OK", "UFW forward policy", f"{policy}: kvmufw_hook's rules come first, "
                       "so guests work either way; keep it DROP"))
    out.append(_ufw_ipv6(default, networks or {}))
    after = _read(root + UFW_AFTER_INIT) or ""
    command = after_init_command(after)
    # an older install's entry runs replay, which waits for libvirt and can hang a boot
    if "kvmufw_hook restore" not in after or not os.access(root + UFW_AFTER_INIT, os.X_OK):
        out.append(Finding("FAIL", "UFW after.init", "no executable restore entry: a firewall "
                           "reload can leave guests without rules", "kvmufw_hook ufw-entry add"))
    elif command and not os.access(root + command, os.X_OK):
        out.append(Finding("FAIL", "UFW after.init", f"its kvmufw_hook entry runs {command}, "
                           "which is gone (an install.sh install the package replaced?): a "
                           "firewall reload can leave guests without rules",
                           "kvmufw_hook ufw-entry add"))
    else:
        out.append(Finding("OK", "UFW after.init", "restores kvmufw_hook's rules on every UFW "
                           "start"))
    if (_setting(default, "MANAGE_BUILTINS") or "no").lower() == "yes":
        out.append(Finding("WARN", "UFW MANAGE_BUILTINS", "yes: every ufw reload flushes all "
                           "chains, libvirt's included; ours come back through after.init, "
                           "libvirt's only when libvirt restarts",
                           "set MANAGE_BUILTINS=no in /etc/default/ufw"))
    return out


def _ufw_ipv6(default: str | None, networks: Networks | None) -> Finding:
    """UFW's IPV6 setting: with ``no`` UFW leaves ip6tables alone (ufw's backend uses
    IPv6 only if it is ``yes``, so a missing line is ``no``)."""
    setting = (_setting(default, "IPV6") or "no").lower()
    if setting == "yes":
        return Finding("OK", "UFW IPv6", "IPV6=yes: UFW filters IPv6 as it does IPv4, and "
                       "kvmufw_hook's ip6tables rules let the guests' traffic through")
    with_ipv6 = _has_ipv6(networks)
    if not with_ipv6:
        return Finding("OK", "UFW IPv6", f"IPV6={setting}: UFW leaves ip6tables alone; no "
                       "active network has an IPv6 subnet")
    return Finding("WARN", "UFW IPv6", f"IPV6={setting} while {', '.join(with_ipv6)} "
                   f"{'has' if len(with_ipv6) == 1 else 'have'} an IPv6 subnet: UFW does not "
                   "manage ip6tables at all, so the guests' IPv6 (and the host's) is governed "
                   "only by ip6tables' own policies", "set IPV6=yes in /etc/default/ufw, then "
                   "ufw reload")


# From this many forwards on, a new connection through iptables' linear rules costs
# noticeably more than through nftables' maps (benchmarks/packets.py: about 0.27 us per
# forward ahead of the matching one, ~48 us a connection through 1; so +50% at ~100).
MANY_FORWARDS = 100


def check_backend(selected: str, forwards: int, libvirt_backend: str,
                  available: tuple[str, ...]) -> Finding:
    """The backend root's configuration selects, and nftables recommended where it helps:
    many forwards (each new connection walks every iptables rule, an nftables map finds
    its element at once), or libvirt on its nftables backend (our iptables backend then
    needs a second firewall beside it on every hook)."""
    where = f"firewall_backend in {config_path()}"
    if selected == "nftables" or "nftables" not in available:
        return Finding("OK", "kvmufw_hook firewall backend", f"{selected} ({where})")
    reasons: list[str] = []
    if forwards >= MANY_FORWARDS:
        reasons.append(f"{forwards} forwards: every new connection walks their iptables rules, "
                       "one nftables map lookup whatever their number")
    if libvirt_backend == "nftables":
        reasons.append("libvirt uses its nftables backend: with iptables each hook also "
                       "writes our accepts into libvirt's table")
    if not reasons:
        return Finding("OK", "kvmufw_hook firewall backend", f"{selected} ({where})")
    return Finding("WARN", "kvmufw_hook firewall backend",
                   f"{selected} ({where}); nftables would serve better: " + "; ".join(reasons),
                   f'firewall_backend = "nftables" in {config_path()}, then kvmufw_hook replay')


def check_libvirt_firewall(ruleset: Any, active_networks: int,
                           backend: AnyBackend) -> tuple[LibvirtFirewall, list[Finding]]:
    """Which firewall backend libvirt really uses; where it is nftables, libvirt's table
    and our accepts in it (one per forward and direction, ahead of libvirt's rejects:
    the backend's participants read and check them with our rules)."""
    from ..hostplan import plan_host
    firewall = libvirt_firewall(backend, ruleset)
    out = [Finding("OK", "libvirt firewall backend", f"{firewall.backend} ({firewall.reason})")]
    if firewall.backend != "nftables":
        return firewall, out
    if not firewall.table:
        if active_networks:
            out.append(Finding("FAIL", "libvirt's table", "table ip libvirt_network is missing "
                               "while networks are active (an nftables flush removed it?): "
                               "libvirt's network rules are gone",
                               "restart libvirtd (or virtnetworkd); guests keep running"))
        return firewall, out
    out.append(Finding("OK", "libvirt's table", "table ip libvirt_network present"))
    try:
        host = plan_host(state.load_networks(), state.load_domains())
    except InputError:
        return firewall, out
    missing = sorted(o for o, intents in host.rules.items()
                     if not backend.present(ruleset, intents))
    if missing:
        out.append(Finding("FAIL", "our accepts in libvirt's table", "missing, or behind "
                           "libvirt's rejects, for " + ", ".join(missing) + ": libvirt "
                           "rejects those forwards", "kvmufw_hook replay"))
    else:
        out.append(Finding("OK", "our accepts in libvirt's table", "every forward's, ahead "
                           "of libvirt's rejects"))
    return firewall, out


def check_rules(backend: AnyBackend, ruleset: Any, active_networks: int,
                libvirt_backend: str = "iptables", ipv6_networks: bool = True) -> list[Finding]:
    """libvirt's chains (where it uses iptables), our rules and our jumps, through the
    backend's interface (``libvirt_missing``, ``has_rules``, ``entry_problems``); a family
    the backend cannot reach, where a network needs it (``ipv6_networks``)."""
    out = []
    missing = backend.libvirt_missing(ruleset)
    # with its nftables backend libvirt has no iptables chains: check_libvirt_firewall
    libvirt_chains_expected = active_networks and libvirt_backend == "iptables"
    if libvirt_chains_expected and missing:
        out.append(Finding("FAIL", "libvirt's chains", f"missing: {', '.join(missing)} (a "
                           "firewall reload wiped them); libvirt cannot start networks "
                           "until it restarts; running guests keep working through our rules",
                           "restart libvirtd (or virtnetworkd); guests keep running"))
    elif libvirt_chains_expected:
        out.append(Finding("OK", "libvirt's chains", "present"))
    if backend.has_rules(ruleset):
        bad = backend.entry_problems(ruleset)
        if bad:
            out.append(Finding("FAIL", "our jumps", "not exactly once at position 1 in: "
                               + ", ".join(bad), "kvmufw_hook restore --jumps-only"))
        else:
            out.append(Finding("OK", "our jumps", "once each, at position 1"))
    elif active_networks:
        out.append(Finding("FAIL", "our rules", "none in the kernel while networks are "
                           "active", "kvmufw_hook replay"))
    for family, why in sorted(ruleset.unavailable.items()):
        if family == 6 and not ipv6_networks:
            continue
        out.append(Finding("WARN", f"IPv{family} firewall", f"not read: {why}; IPv{family} "
                           "rules are left out", "install ip6tables, or ignore on an "
                           f"IPv{family}-less host"))
    return out


def _hook_files(root: str) -> tuple[list[str], list[Finding]]:
    """The hook files the installer recorded, and a finding for each that is not as
    written."""
    hooks, sha256 = installed_hooks(root)
    fix = install_command(root)
    if set(hooks) != set(HOOK_DRIVERS):
        return [], [Finding("FAIL", "hooks", "no record of installed hooks in " + MANIFEST
                            + " (not installed, or by an install.sh older than this doctor)",
                            fix)]
    paths = [hooks[drv] for drv in HOOK_DRIVERS]
    out = []
    for path in paths:
        if not os.path.exists(root + path):
            out.append(Finding("FAIL", "hooks", f"{path} is missing", fix))
        elif not os.access(root + path, os.X_OK):
            out.append(Finding("FAIL", "hooks", f"{path} is not executable",
                               f"chmod 755 {path}"))
        elif sha256.get(path) not in (None, file_sha256(root + path)):
            out.append(Finding("WARN", "hooks", f"{path} changed since install.sh wrote it",
                               "sudo ./install.sh --uninstall and install again, or merge by "
                               "hand"))
    return paths, out


def check_hooks(root: str = "") -> list[Finding]:
    paths, out = _hook_files(root)
    if any(f.level == "FAIL" for f in out) or not paths:
        return out
    appeared = hooks_appeared(paths, root)
    for daemon, pid in running_daemons(root):
        name = daemon.name
        if missed_hooks(pid, appeared, root):
            out.append(Finding("WARN", "hooks seen by the daemon", f"{name} ({pid}) started "
                               "before the hooks were installed and has had no SIGHUP since",
                               f"kill -HUP {pid}"))
        else:
            out.append(Finding("OK", "hooks seen by the daemon", f"{name} ({pid})"))
    if not any(f.check == "hooks" for f in out):
        daemons = any(f.check == "hooks seen by the daemon" for f in out)
        out.insert(0, Finding("OK", "hooks", "installed: " + ", ".join(paths)
                              + ("" if daemons else " (no libvirt daemon running)")))
    return out


def check_forwards(uri: str, backend: AnyBackend) -> list[Finding]:
    from ..ops import replay
    from ..virt import live_xml
    try:
        nets, doms = live_xml(uri)
    except ApplyError as exc:
        return [Finding("WARN", "forwards", f"not checked: {exc}", "start libvirt")]
    try:
        result = replay(nets, doms, dry_run=True, backend=backend)
    except InputError as exc:  # root's configuration file: nothing could be checked
        return [Finding("FAIL", "configuration", str(exc), "fix that line")]
    out = [Finding("FAIL", "forward", problem, "fix the metadata (virsh edit / net-edit, or "
                   "kvmufw_hook forward remove)") for problem in result.problems]
    if result.payload:
        out.append(Finding("WARN", "rules in the kernel", "differ from what libvirt's live "
                           "state asks for", "kvmufw_hook replay"))
    elif not result.problems:
        out.append(Finding("OK", "forwards", f"{result.owners} owner(s), every forward "
                           "resolved and in place"))
    return out


def run(uri: str, backend: AnyBackend | None = None) -> list[Finding]:
    findings: list[Finding] = []
    try:
        selected = config.load().firewall_backend
        backend = backend or backends.selected()
    except ConfigError as exc:  # checked with the default backend all the same
        findings.append(Finding("FAIL", "configuration", str(exc), "fix that line"))
        selected, backend = backends.DEFAULT, backend or backends.get()
    try:
        networks = state.load_networks()
    except (InputError, ApplyError):
        networks = {}
    findings += [check_forwarding(networks, 4), check_forwarding(networks, 6),
                 *check_ufw(networks)]
    from ..model import FAMILIES
    try:
        ruleset = backend.read(FAMILIES)
    except ApplyError as exc:
        return [*findings, Finding("FAIL", "firewall", str(exc), "install iptables")]
    firewall, found = check_libvirt_firewall(ruleset, len(networks), backend)
    forwards = sum(len(held) for held in backend.claims(ruleset).values())
    findings.append(check_backend(selected, forwards, firewall.backend, backends.names()))
    findings += found
    findings += check_rules(backend, ruleset, len(networks), firewall.backend,
                            bool(_has_ipv6(networks)))
    findings += check_hooks()
    from .doctor_bridges import check_bridge_netfilter
    findings += check_bridge_netfilter(uri, backend)
    findings += check_forwards(uri, backend)
    return findings


def as_json(findings: list[Finding]) -> list[dict[str, str]]:
    return [asdict(f) for f in findings]


def format_findings(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{f.level:<4}  {f.check}: {f.detail}")
        if f.fix and f.level != "OK":
            lines.append(f"      fix: {f.fix}")
    fails = sum(f.level == "FAIL" for f in findings)
    warns = sum(f.level == "WARN" for f in findings)
    lines.append(f"{fails} FAIL, {warns} WARN, {len(findings) - fails - warns} OK"
                 f" ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    return "\n".join(lines) + "\n"


def register(parser: argparse.ArgumentParser, name: str) -> None:
    describe(parser, "Check IP forwarding, UFW, libvirt's firewall backend and chains, our "
             "jumps, the hooks, and every forward. Exit 1 if anything FAILs.",
             "example:\n  kvmufw_hook doctor --json")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_connect(parser)
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    findings = run(args.connect)
    if args.json:
        write_json(as_json(findings))
    else:
        sys.stdout.write(format_findings(findings))
    return 1 if any(f.level == "FAIL" for f in findings) else 0
