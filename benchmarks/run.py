#!/usr/bin/python3
"""kvmufw_hook benchmarks: hook latency, processes per apply, bulk apply, memory.

    sudo /usr/bin/python3 benchmarks/run.py [--reps N] [--json PATH]

Runs itself inside a fresh network namespace (unshare --net), so every rule it writes is
in a scratch firewall. Every figure is compared with a baseline measured in the same run
on the same interpreter (these machines are noisy): medians of repeated runs, ratios, and
for each target whether it is met. Writes the table and a JSON file
(benchmarks/results/latest.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "fixtures" / "samples"
HOOKS = ROOT / "hooks"
PY = "/usr/bin/python3"  # the interpreter the hooks run with (their shebang)
sys.path.insert(0, str(ROOT))

NETWORK = b"""<hookData><network><name>bench</name>
  <forward mode='nat'/><bridge name='virbr9'/>
  <ip address='10.90.0.1' prefix='16'><dhcp>
    <host mac='52:54:00:90:00:05' ip='10.90.0.5'/></dhcp></ip>
</network></hookData>"""


def domain(name: str, forwards: int, first_port: int = 20000) -> bytes:
    lines = "".join(f'<kvmufw:forward host-port="{first_port + i}" guest-port="{1000 + i}"/>'
                    for i in range(forwards))
    return f"""<domain type='qemu'><name>{name}</name>
  <uuid>00000000-0000-0000-0000-{forwards:012d}</uuid>
  <metadata><kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">{lines}</kvmufw:forwards></metadata>
  <devices><interface type='network'><mac address='52:54:00:90:00:05'/>
    <source network='bench' bridge='virbr9'/><target dev='vnet0'/></interface></devices>
</domain>""".encode()


def plain_domain() -> bytes:
    return domain("plain", 0).replace(b"<kvmufw:forwards", b"<x").replace(
        b"</kvmufw:forwards>", b"</x>").replace(b'xmlns:kvmufw="urn:kvmufw:1"', b"")


class Bench:
    def __init__(self, reps: int):
        self.reps = reps
        self.tmp = tempfile.mkdtemp(prefix="kvmufw-bench-")
        os.makedirs(f"{self.tmp}/libvirt-network")
        self.env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LC_ALL": "C", "KVMUFW_STATE_DIR": f"{self.tmp}/state",
                    "KVMUFW_LIBVIRT_NETWORK_DIR": f"{self.tmp}/libvirt-network"}
        os.environ.update(self.env)  # for the in-process measurements too

    def once(self, argv, stdin: bytes = b"") -> float:
        start = time.perf_counter()
        proc = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=self.env)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0 or proc.stdout:
            raise SystemExit(f"{argv} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}"
                             f"{proc.stdout.decode()[:200]}")
        return elapsed

    def median(self, argv, stdin: bytes = b"", reps: int | None = None) -> float:
        self.once(argv, stdin)  # warm the page cache and __pycache__
        return statistics.median(self.once(argv, stdin) for _ in range(reps or self.reps))

    def hook(self, kind: str, *argv: str) -> list[str]:
        return [str(HOOKS / kind), *argv]

    def flush(self) -> None:
        from kvmufw_hook.ops import flush
        flush()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21, help="repetitions per median")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/run.py needs root (a scratch network namespace and iptables)",
              file=sys.stderr)
        return 2
    if not args.in_netns:
        return subprocess.call(["unshare", "--net", "--", PY, __file__, "--in-netns",
                                "--reps", str(args.reps), "--json", args.json])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    bench = Bench(args.reps)
    results: dict = {"reps": args.reps, "python": sys.version.split()[0]}
    rows: list[tuple[str, str, str, bool]] = []

    def report(name, value, target, met, **extra):
        rows.append((name, value, target, met))
        results[name] = {"value": value, "target": target, "met": met, **extra}
        print(f"  {name}: {value}  [{target}: {'met' if met else 'NOT MET'}]", flush=True)

    print("measuring…", flush=True)
    # 1. hook calls that need nothing, against the bare interpreter ------------------
    bare = bench.median([PY, "-c", "pass"])
    bench.once(bench.hook("network", "bench", "started", "begin", "-"), NETWORK)
    idle = {
        "qemu started": (bench.hook("qemu", "web1", "started", "begin", "-"),
                         (SAMPLES / "05-qemu.web1.started.xml").read_bytes()),
        "qemu migrate, no metadata": (bench.hook("qemu", "plain", "migrate", "begin", "-"),
                                      plain_domain()),
        "network updated, unchanged": (bench.hook("network", "bench", "updated", "begin", "-"),
                                       NETWORK),
    }
    for label, (argv, stdin) in idle.items():
        took = bench.median(argv, stdin)
        ratio = took / bare
        report(f"idle hook: {label}", f"{ms(took)} = {ratio:.2f}x bare {ms(bare)}", "<= 1.5x",
               ratio <= 1.5, seconds=took, bare_seconds=bare, ratio=ratio)

    # 2. a guest start with 10 forwards: prepare + start + started -------------------
    dom10 = domain("web10", 10)
    totals, per_op = [], {"prepare": [], "start": [], "started": []}
    for _ in range(bench.reps + 1):
        start = time.perf_counter()
        for op in per_op:
            per_op[op].append(bench.once(bench.hook("qemu", "web10", op, "begin", "-"), dom10))
        totals.append(time.perf_counter() - start)
        bench.once(bench.hook("qemu", "web10", "stopped", "end", "-"))
        bench.once(bench.hook("qemu", "web10", "release", "end", "-"))
    total = statistics.median(totals[1:])
    ops_ms = {op: statistics.median(times[1:]) for op, times in per_op.items()}
    report("guest start, 10 forwards (prepare+start+started)",
           f"{ms(total)} (" + ", ".join(f"{op} {ms(t)}" for op, t in ops_ms.items())
           + f"; bare interpreter {ms(bare)})", "<= 80 ms", total <= 0.080, seconds=total,
           bare_seconds=bare, per_op_seconds=ops_ms)

    # 3. firewall processes per apply -------------------------------------------------
    from kvmufw_hook import ops
    from kvmufw_hook.parse import parse_domain_xml
    spawned = {}
    real_popen_init = subprocess.Popen.__init__

    def counting_init(self, argv, *a, **kw):
        counting_init.count += 1
        real_popen_init(self, argv, *a, **kw)

    subprocess.Popen.__init__ = counting_init
    try:
        for n in (1, 100, 2000):
            counting_init.count = 0
            ops.domain_started(parse_domain_xml(domain(f"p{n}", n)), domain(f"p{n}", n))
            spawned[n] = counting_init.count
            ops.domain_stopped(f"p{n}")
    finally:
        subprocess.Popen.__init__ = real_popen_init
    report("firewall processes per apply (1/100/2000 forwards)",
           "/".join(str(spawned[n]) for n in (1, 100, 2000)), "constant, <= 2 per family",
           len(set(spawned.values())) == 1 and max(spawned.values()) <= 2, counts=spawned)

    # 4. 2000 forwards: our hook vs one process per rule vs one raw iptables-restore ----
    from kvmufw_hook.backends.iptables import IptablesBackend
    dom2000 = domain("bulk", 2000)
    ours_runs, raw_runs = [], []
    before = IptablesBackend().read()
    for _ in range(max(3, bench.reps // 4)):
        ours_runs.append(bench.once(bench.hook("qemu", "bulk", "start", "begin", "-"), dom2000))
        bench.once(bench.hook("qemu", "bulk", "stopped", "end", "-"))
    from kvmufw_hook.plan import plan_domain_owner
    from kvmufw_hook.state import load_networks
    rules = {"d=bulk": plan_domain_owner(parse_domain_xml(dom2000), load_networks())}
    payload = IptablesBackend.change(before, rules)
    rule_lines = [l for l in payload.splitlines() if l.startswith("-A KVMUFW-")]
    for _ in range(max(3, bench.reps // 4)):
        start = time.perf_counter()
        subprocess.run(["iptables-restore", "--noflush", "-w"], input=payload.encode(),
                       check=True)
        raw_runs.append(time.perf_counter() - start)
        bench.once(bench.hook("qemu", "bulk", "stopped", "end", "-"))
    # one process per rule, as hand-written scripts and most peers do (measured once)
    subprocess.run(["iptables-restore", "--noflush", "-w"], check=True, input="".join(
        f"{line}\n" for line in payload.splitlines()
        if line.startswith(("*", ":", "COMMIT", "-I "))).encode())
    start = time.perf_counter()
    for line in rule_lines:
        table = "nat" if line.split()[1] in ("KVMUFW-PREROUTING", "KVMUFW-OUTPUT",
                                             "KVMUFW-POSTROUTING") else "filter"
        argv = ["iptables", "-w", "-t", table] + split_rule(line)
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    per_rule = time.perf_counter() - start
    bench.flush()
    ours_med, raw_med = statistics.median(ours_runs), statistics.median(raw_runs)
    report(f"2000 forwards ({len(rule_lines)} rules): vs one iptables process per rule",
           f"{ms(ours_med)} vs {ms(per_rule)} = {per_rule / ours_med:.0f}x faster", ">= 50x",
           per_rule / ours_med >= 50, ours_seconds=ours_med, per_rule_seconds=per_rule,
           rules=len(rule_lines))
    report("2000 forwards: vs one raw iptables-restore of the same payload",
           f"{ms(ours_med)} vs {ms(raw_med)} = {ours_med / raw_med:.2f}x", "<= 3x",
           ours_med / raw_med <= 3, ours_seconds=ours_med, raw_seconds=raw_med)

    # 5. peak memory of one hook call -------------------------------------------------
    bench.once(bench.hook("network", "bench", "started", "begin", "-"), NETWORK)
    bare_rss = max_rss([PY, "-c", "pass"])
    hook_rss = max_rss(bench.hook("qemu", "web10", "start", "begin", "-"), dom10, bench.env)
    report("peak memory, qemu start with 10 forwards", f"{hook_rss / 1024:.1f} MB RSS "
           f"(bare interpreter {bare_rss / 1024:.1f} MB)", "<= 40 MB", hook_rss <= 40 * 1024,
           kib=hook_rss, bare_kib=bare_rss)

    width = max(len(r[0]) for r in rows)
    print("\n" + f"{'benchmark':<{width}}  result  |  target  |  met")
    for name, value, target, met in rows:
        print(f"{name:<{width}}  {value}  |  {target}  |  {'yes' if met else 'NO'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {args.json}")
    return 0 if all(r[3] for r in rows) else 1


def split_rule(line: str) -> list[str]:
    import shlex
    return shlex.split(line)


def max_rss(argv, stdin: bytes = b"", env=None) -> int:
    """Peak RSS in KiB of one run of argv: the largest of it and the processes it ran
    (the kernel's RUSAGE_CHILDREN maximum covers the whole tree that was waited for)."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], "
            "input=sys.stdin.buffer.read(), stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([PY, "-c", code, *argv], input=stdin, capture_output=True, env=env,
                         check=True)
    return int(out.stdout)


if __name__ == "__main__":
    sys.exit(main())
