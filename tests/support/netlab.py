"""Network namespaces and veth topologies for kernel tests, and a tiny packet peer.

Every namespace is created by the test and removed afterwards, with the processes
started in it (ended by pid). Traffic only flows between these namespaces.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PEER = str(Path(__file__).resolve().parent / "peer.py")
_counter = itertools.count()


class Netns:
    def __init__(self, name: str):
        self.name = name
        self.procs: list[subprocess.Popen] = []

    @classmethod
    def create(cls, role: str) -> Netns:
        name = f"kvmufw-{os.getpid()}-{next(_counter)}-{role}"[:40]
        subprocess.run(["ip", "netns", "add", name], check=True)
        ns = cls(name)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str, check: bool = True, input: str | None = None,
            env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.prefix, *argv], capture_output=True, text=True,
                              input=input, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} in {self.name} failed "
                                 f"({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sh(self, script: str) -> None:
        for line in script.strip().splitlines():
            line = line.strip()
            if line:
                self.run(*line.split())

    def save(self, family: int = 4) -> str:
        """iptables-save (ip6tables-save for family 6) without its timestamp comments
        or packet counters."""
        out = self.run("iptables-save" if family == 4 else "ip6tables-save").stdout
        return "\n".join(l for l in out.splitlines() if not l.startswith("#")) + "\n"

    def spawn(self, *argv: str) -> subprocess.Popen:
        proc = subprocess.Popen([*self.prefix, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def serve(self, proto: str, *ports: int, with_port: bool = False) -> subprocess.Popen:
        """A peer that answers each connection/datagram with the address it saw (and
        ``:port``, the source port, ``with_port``)."""
        proc = self.spawn(sys.executable, PEER, "serve-port" if with_port else "serve", proto,
                          *map(str, ports))
        line = proc.stdout.readline()  # "ready"
        assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() else "")
        return proc

    def ask(self, proto: str, host: str, port: int, timeout: float = 2.0,
            source: str | None = None) -> str | None:
        """The address the server saw, or None if nothing answered; ``host`` and
        ``source`` (the address to send from, if given) of either family."""
        proc = self.run(sys.executable, PEER, "ask", proto, host, str(port), str(timeout),
                        *([source] if source else []), check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def veth(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """A veth pair with one end in each namespace (created in a, moved to b)."""
    tmp = f"kv{os.getpid() % 10000}{next(_counter)}"[:15]
    a.run("ip", "link", "add", a_if, "type", "veth", "peer", "name", tmp)
    a.run("ip", "link", "set", tmp, "netns", b.name)
    b.run("ip", "link", "set", tmp, "name", b_if)
    a.run("ip", "link", "set", a_if, "up")
    b.run("ip", "link", "set", b_if, "up")


class Topology:
    """host: uplink eth0 203.0.113.1/24 to ``inet`` (.2), bridge virbr1 10.0.0.1/24 with
    guests ``g5`` (10.0.0.5) and ``g6`` (10.0.0.6) plugged in. ip_forward on; FORWARD
    policy DROP and libvirt-like REJECTs seeded, as on a UFW host."""

    def __init__(self, host: Netns):
        self.host = host
        self.extra: list[Netns] = []
        self.inet = self._ns("inet")
        host.sh("""
            ip link add virbr1 type bridge
            ip addr add 10.0.0.1/24 dev virbr1
            ip link set virbr1 up
        """)
        veth(host, "eth0", self.inet, "eth0")
        host.run("ip", "addr", "add", "203.0.113.1/24", "dev", "eth0")
        self.inet.run("ip", "addr", "add", "203.0.113.2/24", "dev", "eth0")
        self.inet.run("ip", "route", "add", "default", "via", "203.0.113.1")
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.guests = {}
        for last in (5, 6):
            self.guests[last] = self.add_guest(f"10.0.0.{last}", "virbr1", "10.0.0.1", 24)

    def _ns(self, role: str) -> Netns:
        ns = Netns.create(role)
        self.extra.append(ns)
        return ns

    def add_bridge(self, name: str, address: str) -> None:
        """Another bridge on the host, with the host's ``address`` (CIDR) on it."""
        self.host.run("ip", "link", "add", name, "type", "bridge")
        self.host.run("ip", "addr", "add", address, "dev", name)
        self.host.run("ip", "link", "set", name, "up")

    def add_guest(self, ip: str, bridge: str, gateway: str, prefix: int) -> Netns:
        guest = self._ns("g" + ip.rsplit(".", 1)[1])
        port = f"vp{ip.replace('.', '')}"[-15:]
        veth(self.host, port, guest, "eth0")
        self.host.run("ip", "link", "set", port, "master", bridge)
        guest.run("ip", "addr", "add", f"{ip}/{prefix}", "dev", "eth0")
        guest.run("ip", "route", "add", "default", "via", gateway)
        return guest

    def destroy(self) -> None:
        for ns in self.extra:
            ns.destroy()


# What a UFW host looks like to guests once libvirt's ACCEPTs are gone (as after a
# reload with MANAGE_BUILTINS=yes and a libvirt restart that put only its rejects back):
# forward policy DROP, libvirt's REJECTs for the bridge, UFW's chain last.
SEED = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:LIBVIRT_FWI - [0:0]
:LIBVIRT_FWO - [0:0]
:LIBVIRT_FWX - [0:0]
:ufw-before-forward - [0:0]
-A FORWARD -j LIBVIRT_FWX
-A FORWARD -j LIBVIRT_FWI
-A FORWARD -j LIBVIRT_FWO
-A FORWARD -j ufw-before-forward
-A LIBVIRT_FWI -o virbr1 -j REJECT --reject-with icmp-port-unreachable
-A LIBVIRT_FWO -i virbr1 -j REJECT --reject-with icmp-port-unreachable
-A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:LIBVIRT_PRT - [0:0]
-A POSTROUTING -j LIBVIRT_PRT
-A LIBVIRT_PRT -s 10.0.0.0/24 -d 224.0.0.0/24 -j RETURN
COMMIT
"""


def settle(namespaces) -> None:
    """Wait until no address is tentative (link-locals doing DAD): until then the
    kernel neither sends from them nor answers neighbour solicitations for them."""
    deadline = time.monotonic() + 10
    for ns in namespaces:
        while ns.run("ip", "-6", "addr", "show", "tentative").stdout.strip():
            assert time.monotonic() < deadline, ns.run("ip", "-6", "addr").stdout
            time.sleep(0.1)

# The libvirt network of ``Topology`` (bridge virbr1, 10.0.0.0/24, guests .5 and .6
# reserved), with one network forward 8080 -> 10.0.0.5:80.
TOPOLOGY_NET = b"""<network><name>lab</name>
  <metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="8080" guest-port="80" guest-ip="10.0.0.5"/>
  </forwards></metadata>
  <forward mode='nat' dev='eth0'/><bridge name='virbr1'/>
  <ip address='10.0.0.1' prefix='24'><dhcp>
    <host mac='52:54:00:00:00:05' ip='10.0.0.5'/><host mac='52:54:00:00:00:06' ip='10.0.0.6'/>
  </dhcp></ip></network>"""

# libvirt's nftables backend for ``Topology``'s bridge (as libvirt 11 writes it, abridged):
# guest_input rejects whatever enters virbr1 that is not a reply.
TOPOLOGY_LIBVIRT_NFT = """table ip libvirt_network {
  chain guest_output {
    iif "virbr1" ip saddr 10.0.0.0/24 accept
    iif "virbr1" reject
  }
  chain guest_input {
    oif "virbr1" ip daddr 10.0.0.0/24 ct state established,related accept
    oif "virbr1" reject
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    jump guest_output
    jump guest_input
  }
}
"""
