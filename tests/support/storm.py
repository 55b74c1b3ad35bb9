#!/usr/bin/python3
"""Hook storms: a careful operator's worst day, generated at random from a seed.

A simulated libvirt drives the real hooks (``hooks/qemu``, ``hooks/network``: argv and
the XML on stdin, a cleared environment) in a network namespace with real iptables, in
libvirt's own order: guest start (prepare, port-created, start, started; a failure runs
stopped, port-deleted, release), guest stop, network start and stop (libvirt's status
file written after a successful ``started``, removed before ``stopped``), daemon restart
(port-created for every port, then reconnect; a failed reconnect kills the guest),
and ``ufw reload`` with MANAGE_BUILTINS=yes as the separate ``-F``/``-X`` calls it makes,
followed by UFW's after.init ``kvmufw_hook restore``. 2-4 events run at once (never two on
one object); a share of hooks is SIGKILLed after a random delay, alone or with their
children (``iptables-restore``), as the OOM killer would.

Then the admin's way back, checked each step: ``restore`` alone (our state and libvirt's
status files), then ``replay`` (libvirt's truth). After each: every rule of every running
guest and active network exactly once and nothing of a stopped one, jumps first,
``status --json`` agreeing with the kernel, no lock held, no temporary file, no process
left; through the storm: nothing on stdout, no traceback, and no hook failed unless it
was killed.

    sudo python3 tests/support/storm.py --seeds 1-50 --events 2000    # the long soak
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))

from netlab import Netns

SAMPLES = ROOT / "tests" / "fixtures" / "samples"
HOOKS = ROOT / "hooks"
PYTHON = "/usr/bin/python3"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUESTS = 4
LAB_RESERVATIONS = "".join(
    f"<host mac='52:54:00:00:01:{i:02x}' name='g{i}' ip='10.0.0.{100 + i}'/>"
    for i in range(1, GUESTS + 1))


def _network_xmls() -> dict[str, bytes]:
    default = (SAMPLES / "02-network.default.port-created.xml").read_text()
    default = default.split("<networkport>")[0] + "</hookData>"
    lab = (SAMPLES / "16-network.lab.started.xml").read_text()
    lab = lab.replace("</dhcp>", LAB_RESERVATIONS + "</dhcp>", 1)
    return {"default": default.encode(), "lab": lab.encode()}


NETWORKS = _network_xmls()
BRIDGE = {"default": "virbr0", "lab": "virbr1"}


def _uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012x}"


def domain_xml(i: int, at_prepare: bool = False) -> bytes:
    """Guest gI: one NIC on lab (its reservation gives the address), three forwards,
    two of them to the same guest port."""
    port, udp = 2200 + 10 * i, 6000 + 10 * i
    source = ("<source network='lab'/>" if at_prepare else
              f"<source network='lab' portid='{_uuid(1000 + i)}' bridge='virbr1'/>"
              f"<target dev='vnet{i}'/>")
    return f"""<domain type='qemu' id='{i}'>
  <name>g{i}</name>
  <uuid>{_uuid(i)}</uuid>
  <metadata>
    <kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">
      <kvmufw:forward proto="tcp" host-port="{port}" guest-port="22"/>
      <kvmufw:forward proto="tcp" host-port="{port + 1}" guest-port="22"/>
      <kvmufw:forward proto="udp" host-port="{udp}-{udp + 2}" guest-port="5000-5002"/>
    </kvmufw:forwards>
  </metadata>
  <memory unit='KiB'>49152</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <interface type='network'>
      <mac address='52:54:00:00:01:{i:02x}'/>
      {source}
      <model type='e1000'/>
      <alias name='net0'/>
    </interface>
  </devices>
</domain>
""".encode()


def port_xml(i: int) -> bytes:
    net = NETWORKS["lab"].decode().split("</hookData>")[0]
    return (net + f"""<networkport>
    <uuid>{_uuid(1000 + i)}</uuid>
    <owner><name>g{i}</name><uuid>{_uuid(i)}</uuid></owner>
    <mac address='52:54:00:00:01:{i:02x}'/>
    <plug type='network' bridge='virbr1'/>
  </networkport>
</hookData>""").encode()


# --------------------------------------------------------------------------- the host

@dataclass
class Figures:
    events: Counter = field(default_factory=Counter)
    hooks: int = 0
    killed: int = 0
    killed_with_children: int = 0
    failed_unkilled: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unknowable: int = 0  # owners only libvirt could tell apart (restore alone)
    seconds: float = 0.0

    def add(self, other: Figures) -> None:
        self.events += other.events
        for name in ("hooks", "killed", "killed_with_children", "unknowable", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed_unkilled += other.failed_unkilled
        self.problems += other.problems


class Host:
    """One simulated libvirt host: a namespace, our state, libvirt's status files."""

    def __init__(self, ns: Netns, workdir: Path, kill_rate: float,
                 backend: str = "iptables") -> None:
        self.ns, self.kill_rate, self.backend = ns, kill_rate, backend
        self.state = workdir / "state"
        self.status = workdir / "libvirt-network"
        self.status.mkdir(parents=True, exist_ok=True)
        config = workdir / "kvmufw_hook.conf"  # root's configuration: the backend
        config.write_text(f'firewall_backend = "{backend}"\n')
        self.env = {"PATH": PATH, "LC_ALL": "C", "KVMUFW_STATE_DIR": str(self.state),
                    "KVMUFW_LIBVIRT_NETWORK_DIR": str(self.status),
                    "KVMUFW_CONFIG": str(config)}
        self.active: set[str] = set()
        self.running: set[int] = set()
        self.figures = Figures()
        self.lock = threading.Lock()

    # ------------------------------------------------------------ running hooks

    def hook(self, rng: random.Random, kind: str, argv: list[str], data: bytes) -> bool:
        """Run one hook as libvirt does; True when it succeeded (exit 0)."""
        proc = subprocess.Popen([*self.ns.prefix, str(HOOKS / kind), *argv],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env, start_new_session=True)
        killer = None
        group = False
        if rng.random() < self.kill_rate:
            group = rng.random() < 0.5
            killer = threading.Timer(rng.uniform(0.0, 0.15), self._kill, (proc, group))
            killer.start()
        out, err = proc.communicate(data, timeout=120)
        if killer:
            killer.cancel()
            killer.join()
        killed = proc.returncode == -signal.SIGKILL
        what = f"{kind} {' '.join(argv[:2])}"
        with self.lock:
            self.figures.hooks += 1
            if killed:
                self.figures.killed += 1
                self.figures.killed_with_children += group
            elif proc.returncode != 0:
                self.figures.failed_unkilled.append(
                    f"{what}: exit {proc.returncode}: {err.decode(errors='replace')[:300]}")
            if out:
                self.figures.problems.append(f"{what} wrote to stdout: {out[:200]!r}")
            if b"Traceback" in err or b"internal error" in err:
                self.figures.problems.append(f"{what}: {err.decode(errors='replace')[:500]}")
        return proc.returncode == 0

    @staticmethod
    def _kill(proc: subprocess.Popen, group: bool) -> None:
        if proc.poll() is not None:
            return
        try:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cli(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.ns.prefix, PYTHON, "-m", "kvmufw_hook", *argv],
                              capture_output=True, env=self.env, cwd=ROOT, timeout=120)

    # ------------------------------------------------------------ libvirt's part

    def _status(self, name: str, active: bool) -> None:
        path = self.status / f"{name}.xml"
        if active:
            tmp = self.status / f"{name}.xml.new"  # as virFileRewrite: then rename
            data = NETWORKS[name]
            element = data[data.find(b"<network"):data.rfind(b"</network>") + 10]
            tmp.write_bytes(b"<networkstatus>" + element + b"</networkstatus>")
            tmp.rename(path)
        else:
            path.unlink(missing_ok=True)

    def guest_start(self, rng: random.Random, i: int) -> None:
        name = f"g{i}"
        ok = self.hook(rng, "qemu", [name, "prepare", "begin", "-"], domain_xml(i, True))
        ok = ok and self.hook(rng, "network", ["lab", "port-created", "begin", "-"], port_xml(i))
        ok = ok and self.hook(rng, "qemu", [name, "start", "begin", "-"], domain_xml(i))
        ok = ok and self.hook(rng, "qemu", [name, "started", "begin", "-"], domain_xml(i))
        if ok:
            with self.lock:
                self.running.add(i)
        else:  # libvirt stops what it started
            self.guest_stop(rng, i)

    def guest_stop(self, rng: random.Random, i: int) -> None:
        name = f"g{i}"
        with self.lock:
            self.running.discard(i)
        self.hook(rng, "qemu", [name, "stopped", "end", "-"], domain_xml(i))
        self.hook(rng, "network", ["lab", "port-deleted", "begin", "-"], port_xml(i))
        self.hook(rng, "qemu", [name, "release", "end", "-"], domain_xml(i))

    def net_start(self, rng: random.Random, name: str) -> None:
        argv = lambda op: [name, op, "begin", "-"]  # noqa: E731
        if (self.hook(rng, "network", argv("start"), NETWORKS[name])
                and self.hook(rng, "network", argv("started"), NETWORKS[name])):
            self._status(name, True)
            with self.lock:
                self.active.add(name)

    def net_stop(self, rng: random.Random, name: str) -> None:
        with self.lock:
            self.active.discard(name)
        self._status(name, False)
        self.hook(rng, "network", [name, "stopped", "end", "-"], NETWORKS[name])

    def daemon_restart(self, rng: random.Random) -> None:
        with self.lock:
            running = sorted(self.running)
        if "lab" in self.active:
            for i in running:
                self.hook(rng, "network", ["lab", "port-created", "begin", "-"], port_xml(i))
        for i in running:
            if not self.hook(rng, "qemu", [f"g{i}", "reconnect", "begin", "-"],
                             domain_xml(i)):
                self.guest_stop(rng, i)  # a failed reconnect kills the guest

    def ufw_reload(self, rng: random.Random) -> None:
        """MANAGE_BUILTINS=yes: each table flushed and its chains deleted, one call each
        (ours go with them), UFW's own chain and jump back, then after.init."""
        for tool in ("iptables", "ip6tables"):
            for table in ("filter", "nat"):
                for verb in ("-F", "-X"):
                    self.ns.run(tool, "-t", table, verb, check=False)
                    time.sleep(rng.uniform(0, 0.02))
            self.ns.run(tool, "-N", "ufw-before-forward", check=False)
            self.ns.run(tool, "-A", "FORWARD", "-j", "ufw-before-forward", check=False)
        self.restore("after.init restore")

    def restore(self, what: str) -> None:
        """``kvmufw_hook restore``. It exits 1 for an owner it refuses; the one refusal
        a storm brings is true: a guest running while its network is stopped."""
        proc = self.cli("restore")
        why = [line for line in proc.stderr.decode(errors="replace").splitlines()
               if line.strip()]
        expected = all("network that is active" in line for line in why)
        with self.lock:
            if proc.returncode != 0 and not (proc.returncode == 1 and why and expected):
                self.figures.failed_unkilled.append(
                    f"{what}: exit {proc.returncode}: {proc.stderr[:300]!r}")

    def replay(self) -> None:
        """``kvmufw_hook replay``: libvirt's live XML of active networks, running guests."""
        from kvmufw_hook import backends, ops
        self._in_env(lambda: ops.replay(
            [NETWORKS[n] for n in sorted(self.active)],
            [domain_xml(i) for i in sorted(self.running)],
            backend=backends.get(self.backend, self.ns.prefix)))

    def _in_env(self, call):
        saved = {k: os.environ.get(k) for k in self.env if k.startswith("KVMUFW_")}
        os.environ.update({k: self.env[k] for k in saved})
        try:
            return call()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    # ------------------------------------------------------------ checks

    def check(self, phase: str) -> list[str]:
        """What is wrong now, compared with libvirt's truth (``self.active``,
        ``self.running``); ``restore`` alone cannot know a guest whose every stop hook
        was killed before it did anything, nor a network whose ``started`` was killed
        after it finished: those are left to ``replay`` (counted, not failed)."""
        return self._in_env(lambda: self._check(phase))

    def _check(self, phase: str) -> list[str]:
        from kvmufw_hook import backends, state
        from kvmufw_hook.hostplan import plan_host
        from kvmufw_hook.names import domain_owner, network_owner
        from kvmufw_hook.parse import parse_domain_xml, parse_hookdata

        problems: list[str] = []
        networks = {n: parse_hookdata(NETWORKS[n])[0] for n in sorted(self.active)}
        domains = {f"g{i}": parse_domain_xml(domain_xml(i)) for i in sorted(self.running)
                   if "lab" in self.active}
        unsure: set[str] = set()
        if phase == "restore":
            for i in range(1, GUESTS + 1):
                if i not in self.running and state.has_domain(f"g{i}"):
                    unsure.add(domain_owner(f"g{i}"))
            for name in NETWORKS:
                if name not in self.active and os.path.exists(state.network_path(name)):
                    unsure.add(network_owner(name))
                    unsure |= {domain_owner(f"g{i}") for i in self.running}
            self.figures.unknowable += len(unsure)
        wanted = plan_host(networks, domains).rules
        backend = backends.get(self.backend, self.ns.prefix)
        ruleset = backend.read((4, 6))
        if self.backend == "iptables":
            problems += self._exactly_once(phase, wanted, unsure)
        else:  # rules, elements or whatever the backend holds: what it would still change
            sure = {owner: rules for owner, rules in wanted.items() if owner not in unsure}
            change = backend.change(ruleset, sure)
            if change:
                problems.append(f"{phase}: not as libvirt's truth asks: {change.text[:400]}")
            extra = backend.owners(ruleset) - set(wanted) - unsure
            if extra:
                problems.append(f"{phase}: left over: {sorted(extra)}")
        bad = backend.entry_problems(ruleset)
        if bad:
            problems.append(f"{phase}: jumps not first: {bad}")
        problems += self._status_agrees(phase, backend, networks, domains, unsure)
        problems += self.leftovers(phase)
        return problems

    def _exactly_once(self, phase: str, wanted, unsure: set[str]) -> list[str]:
        """The iptables backend's rules, line by line: each wanted one exactly once, none
        of an owner that libvirt does not run."""
        from kvmufw_hook.backends.iptables import IptablesBackend, Ruleset
        problems: list[str] = []
        expected = IptablesBackend.change(Ruleset.empty(), wanted).parts
        for family in (4, 6):
            have = [line for line in self.ns.save(family).splitlines()
                    if line.startswith("-A KVMUFW-")]
            want = [line for line in expected.get(family, "").splitlines()
                    if line.startswith("-A KVMUFW-")]
            dup = sorted({line for line in have if have.count(line) > 1})
            if dup:
                problems.append(f"{phase}: IPv{family}: duplicated: {dup[:3]}")
            sure = lambda line: not any(f"kvmufw:{o}," in line for o in unsure)  # noqa: E731
            missing = [line for line in want if line not in have and sure(line)]
            extra = [line for line in set(have) if line not in want and sure(line)]
            if missing:
                problems.append(f"{phase}: IPv{family}: missing {len(missing)}: {missing[:2]}")
            if extra:
                problems.append(f"{phase}: IPv{family}: left over {len(extra)}: {extra[:2]}")
        return problems

    def _status_agrees(self, phase: str, backend, networks, domains,
                       unsure: set[str]) -> list[str]:
        from kvmufw_hook.commands import status
        from kvmufw_hook.names import domain_owner, network_owner
        problems: list[str] = []
        report = status.collect(backend)
        listed = {network_owner(n["name"]) for n in report["networks"]} | {
            domain_owner(d["name"]) for d in report["domains"]}
        # a guest runs on while its network is stopped: listed, its forwards not present
        truth = {network_owner(n) for n in networks} | {
            domain_owner(f"g{i}") for i in self.running}
        if (listed - unsure) != (truth - unsure):
            problems.append(f"{phase}: status lists {sorted(listed)}, libvirt runs "
                            f"{sorted(truth)}")
        for entry in report["networks"]:
            if network_owner(entry["name"]) in truth and not entry["rules_present"]:
                problems.append(f"{phase}: status: network {entry['name']} rules absent")
        for entry in report["domains"]:
            owner = domain_owner(entry["name"])
            if entry["name"] in domains and owner not in unsure and not all(
                    f["present"] for f in entry["forwards"]):
                problems.append(f"{phase}: status: {entry['name']} forwards absent")
        return problems

    def leftovers(self, phase: str) -> list[str]:
        out = []
        for path in self.state.rglob("*.tmp"):
            out.append(f"{phase}: temporary file left: {path.name}")
        lock = self.state / "lock"
        if lock.exists():
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                out.append(f"{phase}: the lock is still held")
            finally:
                os.close(fd)
        pids = subprocess.run(["ip", "netns", "pids", self.ns.name], capture_output=True,
                              text=True).stdout.split()
        if pids:
            out.append(f"{phase}: processes left in the namespace: {pids}")
        return out


# --------------------------------------------------------------------------- the storm

EXCLUSIVE = "everything"


def pick(rng: random.Random, host: Host, busy: set[str]) -> tuple[str, tuple, set[str]] | None:
    """The next event that libvirt could run now, and the objects it takes."""
    if EXCLUSIVE in busy:
        return None
    choices: list[tuple[str, tuple, set[str]]] = []
    lab_busy = "net:lab" in busy
    for i in range(1, GUESTS + 1):
        if f"g{i}" in busy or lab_busy:
            continue
        if i in host.running:
            choices.append(("guest_stop", (i,), {f"g{i}", "guests"}))
        elif "lab" in host.active:
            choices += [("guest_start", (i,), {f"g{i}", "guests"})] * 2
    for name in NETWORKS:
        if f"net:{name}" in busy or (name == "lab" and "guests" in busy):
            continue
        if name in host.active:
            choices.append(("net_stop", (name,), {f"net:{name}"}))
        else:
            choices += [("net_start", (name,), {f"net:{name}"})] * 3
    if "reload" not in busy:
        choices.append(("ufw_reload", (), {"reload"}))
    return rng.choice(choices) if choices else None


def storm(seed: int, events: int, ns: Netns, workdir: Path, kill_rate: float = 0.3,
          log=print, backend: str = "iptables") -> Figures:
    """One storm of ``events`` events from ``seed``, then the admin's way back, checked,
    with ``backend`` chosen in root's configuration."""
    started = time.monotonic()
    rng = random.Random(seed)
    host = Host(ns, workdir, kill_rate, backend)
    for name in NETWORKS:  # the day starts with both networks up (unkilled)
        host.net_start(random.Random(0), name)
    concurrency = 2 + seed % 3  # 2-4 at once
    busy: Counter = Counter()
    cond = threading.Condition()
    threads: list[threading.Thread] = []

    def run(kind: str, args: tuple, takes: set[str], event_rng: random.Random) -> None:
        try:
            getattr(host, kind)(event_rng, *args)
        except Exception as exc:
            with host.lock:
                host.figures.problems.append(f"{kind}{args}: {type(exc).__name__}: {exc}")
        finally:
            with cond:
                busy.subtract(takes)
                cond.notify_all()

    for n in range(events):
        restart = rng.random() < 0.05  # libvirtd restarts: nothing else runs meanwhile
        with cond:
            while True:
                threads = [t for t in threads if t.is_alive()]
                held = {k for k, v in busy.items() if v > 0}
                if restart:
                    event = ("daemon_restart", (), {EXCLUSIVE}) if not held else None
                else:
                    event = pick(rng, host, held) if len(threads) < concurrency else None
                if event is not None:
                    break
                cond.wait(0.05)
            kind, args, takes = event
            busy.update(takes)
        host.figures.events[kind] += 1
        thread = threading.Thread(target=run, args=(kind, args, takes,
                                                    random.Random(seed * 1_000_003 + n)))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    host.figures.problems += [f"hook failed without being killed: {f}"
                              for f in host.figures.failed_unkilled]

    # the admin's way back: restore (as UFW's after.init runs it), then replay
    failed = len(host.figures.failed_unkilled)
    host.restore("restore")
    host.figures.problems += host.figures.failed_unkilled[failed:]
    host.figures.problems += host.check("restore")
    host.replay()
    host.figures.problems += host.check("replay")
    host.figures.seconds = time.monotonic() - started
    f = host.figures
    log(f"seed {seed} ({backend}): {sum(f.events.values())} events ({dict(sorted(f.events.items()))}), "
        f"concurrency {concurrency}, {f.hooks} hooks, {f.killed} killed "
        f"({f.killed_with_children} with children), {f.unknowable} left to replay, "
        f"{len(f.problems)} problem(s), {f.seconds:.0f}s")
    for problem in f.problems[:20]:
        log(f"  {problem}")
    return f


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1-3", help="e.g. 1-50 or 1,7,9 (default 1-3)")
    parser.add_argument("--events", type=int, default=100, help="events per seed")
    parser.add_argument("--kill-rate", type=float, default=0.3,
                        help="share of hooks SIGKILLed (default 0.3)")
    parser.add_argument("--backend", default="iptables", choices=("iptables", "nftables"),
                        help="firewall_backend of root's configuration (default iptables)")
    args = parser.parse_args(argv)
    import tempfile
    total = Figures()
    for seed in _seeds(args.seeds):
        ns = Netns.create("storm")
        try:
            with tempfile.TemporaryDirectory(prefix="kvmufw-storm-") as work:
                total.add(storm(seed, args.events, ns, Path(work), args.kill_rate,
                                backend=args.backend))
        finally:
            ns.destroy()
    print(f"total: {sum(total.events.values())} events, {total.hooks} hooks, "
          f"{total.killed} killed ({total.killed_with_children} with children), "
          f"{total.unknowable} left to replay, {len(total.problems)} problem(s), "
          f"{total.seconds:.0f}s")
    return 1 if total.problems else 0


if __name__ == "__main__":
    sys.exit(main())
