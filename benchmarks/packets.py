#!/usr/bin/python3
"""kvmufw_hook packet benchmark: what a new connection costs through 1 forward and 2,000.

    sudo /usr/bin/python3 benchmarks/packets.py [--reps N] [--json PATH]
    sudo /usr/bin/python3 benchmarks/run.py --packets     (the same, after run.py's lines)

Client -> router -> server triplets of network namespaces, created inside a scratch
network + mount namespace (nothing of the host's firewall is touched), real conntrack on
each router. Each router holds, per backend:
- iptables: the forwards applied by the installed hooks as libvirt calls them (network
  ``started``, then qemu ``start`` per guest): 200 guests x 10 forwards, or the measured
  forward alone. The measured forward is the last guest's last one, so its rules come last.
- nftables: the same forwards through kvmufw_hook's own nftables backend, selected by
  ``firewall_backend = "nftables"`` in the hooks' configuration (left out while the
  registry has no such backend);
- raw nft, exact map / interval map: a bare ``table inet`` with one DNAT map and one accept
  set holding the same elements, keyed exactly (a hash lookup) or with a source prefix
  (``flags interval``: the kernel's pipapo set), the two forms a backend chooses between.
A client process opens ``--conns`` new TCP connections to the router's address and the
measured host port (DNAT'd to the server, which accepts and closes), and times each
``connect`` (SYN out, SYN-ACK back: the router's first-packet path, rule walk included).
The client runs on CPU 0 (a veth path runs on the sender's CPU), the server on CPU 1, so
that its wake-ups never preempt the path measured (else the times split into two modes).
Rounds interleave the four routers so that a noisy moment hits all alike; the ratios come
from medians of the same run. Prints one line per figure; JSON to ``--json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

GUESTS, PER_GUEST = bench.GUESTS, bench.PER_GUEST
LAST = GUESTS - 1  # the guest whose last forward is measured
MEASURED_HOST_PORT = 20000 + PER_GUEST * LAST + PER_GUEST - 1
MEASURED_GUEST_PORTS = (1000, 1000 + PER_GUEST - 1)  # alone: its first; among all: its last
CLIENT, ROUTER_OUT = "198.51.100.2", "198.51.100.1"
BRIDGE, GATEWAY = "virbr9", "10.90.0.1"
SERVER = bench.ip(LAST)

CONNECT = r"""
import json, socket, struct, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
linger = struct.pack("ii", 1, 0)  # close with a RST: no TIME_WAIT, no port reuse
took = []
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    start = time.perf_counter_ns()
    s.connect((host, port))
    took.append(time.perf_counter_ns() - start)
    s.close()
print(json.dumps(took))
"""

SERVE = r"""
import select, socket, sys
socks = []
for port in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(1024)
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        s.accept()[0].close()
"""


def sh(*argv: str, stdin: bytes | None = None, env: dict | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): "
                         f"{proc.stderr.decode()[-800:]}")
    return proc.stdout.decode()


class Triplet:
    """client -> router -> server namespaces; the router's link to the server is named
    as the libvirt bridge, with the bridge's address, and the server holds the guest's."""

    def __init__(self, label: str, scratch: str, index: int):
        self.label = label
        self.ns = {role: f"kvpk{os.getpid()}-{index}{role[0]}"
                   for role in ("client", "router", "server")}
        self.scratch = f"{scratch}/{index}"
        os.makedirs(f"{self.scratch}/libvirt-network")
        self.env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LC_ALL": "C", "KVMUFW_STATE_DIR": f"{self.scratch}/state",
                    "KVMUFW_LIBVIRT_NETWORK_DIR": f"{self.scratch}/libvirt-network",
                    "KVMUFW_CONFIG": f"{self.scratch}/kvmufw_hook.conf"}
        self.server: subprocess.Popen | None = None

    def run(self, role: str, *argv: str, stdin: bytes | None = None) -> str:
        return sh("ip", "netns", "exec", self.ns[role], *argv, stdin=stdin, env=self.env)

    def build(self) -> None:
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
        c, r, s = self.ns["client"], self.ns["router"], self.ns["server"]
        sh("ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "r0", "netns", r)
        sh("ip", "link", "add", BRIDGE, "netns", r, "type", "veth", "peer", "s0", "netns", s)
        for role, link, addr, via in (("client", "c0", f"{CLIENT}/24", ROUTER_OUT),
                                      ("router", "r0", f"{ROUTER_OUT}/24", None),
                                      ("router", BRIDGE, f"{GATEWAY}/16", None),
                                      ("server", "s0", f"{SERVER}/16", GATEWAY)):
            self.run(role, "ip", "addr", "add", addr, "dev", link)
            self.run(role, "ip", "link", "set", link, "up")
            self.run(role, "ip", "link", "set", "lo", "up")
            if via:
                self.run(role, "ip", "route", "add", "default", "via", via)
        self.run("router", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", s, "taskset", "-c", "1", bench.PY, "-c", SERVE,
             *map(str, MEASURED_GUEST_PORTS)], stdout=subprocess.PIPE)
        assert self.server.stdout is not None
        self.server.stdout.readline()  # "ready"

    def destroy(self) -> None:
        if self.server is not None:
            self.server.kill()  # the one process this triplet started
            self.server.wait()
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], check=False,
                           stderr=subprocess.DEVNULL)  # those it made before a failure

    def connects(self, count: int) -> list[int]:
        """Nanoseconds of each of ``count`` new connections through the router."""
        # on one CPU: a veth path is run by the sender's CPU, so every router is
        # measured on the same core (else the medians follow where the scheduler put it)
        return json.loads(self.run("client", "taskset", "-c", "0", bench.PY, "-c", CONNECT,
                                   ROUTER_OUT,
                                   str(MEASURED_HOST_PORT), str(count)))


def hooks_apply(t: Triplet, guests: int, backend: str) -> None:
    """The forwards as libvirt's calls to the installed hooks apply them: the network
    started, then each guest's ``start`` (``prepare`` and ``started`` do nothing)."""
    Path(t.env["KVMUFW_CONFIG"]).write_text(f'firewall_backend = "{backend}"\n')
    os.chmod(t.env["KVMUFW_CONFIG"], 0o644)
    net = bench.network(GUESTS)
    Path(t.env["KVMUFW_LIBVIRT_NETWORK_DIR"], "bench.xml").write_bytes(net)
    t.run("router", *bench.hook("network", "bench", "started", "begin", "-"),
          stdin=bench.hookdata(net))
    first = LAST if guests == 1 else 0
    for i in range(first, GUESTS):
        # alone: the measured forward only (host port MEASURED_HOST_PORT -> 1000)
        xml = (bench.domain(f"g{i:03d}", 1, MEASURED_HOST_PORT, nic=i) if guests == 1
               else bench.domain(f"g{i:03d}", PER_GUEST, 20000 + PER_GUEST * i, nic=i))
        t.run("router", *bench.hook("qemu", f"g{i:03d}", "start", "begin", "-"), stdin=xml)


def raw_nft(forwards: list[tuple[int, str, int]], interval: bool = False) -> str:
    """One table with a DNAT map and an accept set of ``forwards`` (host port, guest
    address, guest port): the shape issue 21 asks of a backend, without the backend.
    Exact keys are a hash lookup; ``interval``: the same elements keyed by a source
    prefix too (``0.0.0.0/0``: anyone), which makes the kernel use its pipapo set (the
    form a per-forward ``source`` needs), whose lookup grows with the elements."""
    source, any_, flags = ("ip saddr . ", "0.0.0.0/0 . ", " flags interval;") if interval \
        else ("", "", "")
    dnat = ", ".join(f"{any_}tcp . {h} : {g} . {p}" for h, g, p in forwards)
    allow = ", ".join(f"{any_}{g} . tcp . {p}" for _, g, p in forwards)
    key = "ipv4_addr . " if interval else ""
    return f"""table inet kvmufwbench {{
  map dnat4 {{ type {key}inet_proto . inet_service : ipv4_addr . inet_service;{flags}
    elements = {{ {dnat} }}; }}
  set allow4 {{ type {key}ipv4_addr . inet_proto . inet_service;{flags}
    elements = {{ {allow} }}; }}
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local meta l4proto {{ tcp, udp }} \\
      dnat ip to {source}meta l4proto . th dport map @dnat4; }}
  chain forward_in {{ type filter hook forward priority filter; policy accept;
    ct status dnat meta l4proto {{ tcp, udp }} \\
      {source}ip daddr . meta l4proto . th dport @allow4 accept; }}
}}
"""


def all_forwards(guests: int) -> list[tuple[int, str, int]]:
    if guests == 1:
        return [(MEASURED_HOST_PORT, SERVER, MEASURED_GUEST_PORTS[0])]
    return [(20000 + PER_GUEST * i + k, bench.ip(i), 1000 + k)
            for i in range(GUESTS) for k in range(PER_GUEST)]


def nft_backend_available() -> bool:
    """Whether root's configuration may select kvmufw_hook's own nftables backend."""
    from kvmufw_hook import backends
    return "nftables" in backends.names()


# what each router holds: (label, how its forwards are applied)
KINDS = (("iptables", "hooks"), ("nftables", "hooks"),
         ("raw nft, exact map", "exact"), ("raw nft, interval map", "interval"))


def measure(reps: int, conns: int, scratch: str, report) -> dict:
    """Builds a router per kind and count (1 forward, 2,000), measures, reports;
    returns the figures. Without kvmufw_hook's nftables backend in the registry, its
    line is left out and the raw maps stand for it."""
    if not bench.INSTALLED:
        bench.install_hooks(scratch)
    kinds = [k for k in KINDS if k[0] != "nftables" or nft_backend_available()]
    many = GUESTS * PER_GUEST
    setups = [(label, how, n) for label, how in kinds for n in (1, many)]
    triplets = [Triplet(f"{label} {n}", scratch, i) for i, (label, _, n) in enumerate(setups)]
    try:
        started = time.perf_counter()
        for t, (label, how, n) in zip(triplets, setups, strict=True):
            t.build()
            guests = 1 if n == 1 else GUESTS
            if how == "hooks":
                hooks_apply(t, guests, label)
            else:
                t.run("router", "nft", "-f", "-",
                      stdin=raw_nft(all_forwards(guests), how == "interval").encode())
        apply_seconds = time.perf_counter() - started
        times: dict[str, list[int]] = {t.label: [] for t in triplets}
        for round_ in range(reps + 1):
            for t in triplets:
                took = t.connects(conns)
                if round_:  # the first round warms caches and the route
                    times[t.label].extend(took)
        med = {label: statistics.median(t) / 1000 for label, t in times.items()}
        spread = {label: [round(q / 1000, 1) for q in statistics.quantiles(t, n=4)]
                  for label, t in times.items()}
    finally:
        for t in triplets:
            t.destroy()
    figures: dict = {"connections_each": reps * conns, "apply_seconds": apply_seconds,
                     "median_us": med, "quartiles_us": spread}
    for label, _ in kinds:
        one, lots = med[f"{label} 1"], med[f"{label} {many}"]
        target = "<= 1.2x" if label == "nftables" else "informative"
        met = lots / one <= 1.2 if label == "nftables" else True
        figures[f"{label} ratio"] = lots / one
        report(f"new connection through {many} forwards vs 1, {label}",
               f"{lots:.1f} us vs {one:.1f} us = {lots / one:.2f}x", target, met,
               seconds=lots / 1e6, one_seconds=one / 1e6, ratio=lots / one)
    best = kinds[1][0]  # nftables, or the exact raw map without it
    ipt, nft = med[f"iptables {many}"], med[f"{best} {many}"]
    report(f"new connection through {many} forwards, iptables vs {best}",
           f"{ipt:.1f} us vs {nft:.1f} us = {ipt / nft:.2f}x", "informative", True,
           ratio=ipt / nft)
    return figures


def main() -> int:
    parser = bench.arguments(__doc__, 7, "packets.json")
    parser.add_argument("--conns", type=int, default=200, help="connections per round")
    args = parser.parse_args()
    status = bench.in_scratch(__file__, args.in_netns, "network namespaces")
    if status is not None:
        return status
    report = bench.Report()
    print("applying each router's forwards, then measuring…", flush=True)
    report.results["figures"] = measure(args.reps, args.conns, args.in_netns, report)
    return report.write(args.json)


if __name__ == "__main__":
    sys.exit(main())
