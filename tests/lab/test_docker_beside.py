"""Docker beside KVM, with Docker's real rules: dockerd from Debian's ``docker.io``
(20.10 on Debian 12) runs inside a lab (mount + network namespace, /etc and /var/lib
overlays, /run a tmpfs; ``--iptables=true``, no container needed) and installs its chains,
its FORWARD DROP policy and its jumps, with UFW enabled and br_netfilter on (as dockerd
leaves it). Our network's egress, a guest's forward, its hairpin from another guest and
from the guest itself keep working through a dockerd restart (DOCKER-USER's jump first
again) and a ``ufw reload``; a "container" (a namespace on docker0 at 172.17.0.2) keeps
its egress through Docker's own rules; and no Docker chain ever changes.

The .debs come from the machine's apt sources (``apt-get download``: nothing installed,
no maintainer script run, no dockerd on the machine) and are unpacked once into
/var/tmp/kvmufw-test-cache/docker. The hooks' operations run in this process against
the lab's namespaces (``nsenter`` as the backend's prefix), as the kernel tests do.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import lab as lab_module
import pytest
from conftest import need_root_tools
from lab import Lab

from kvmufw_hook import backends, ops
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata

CACHE = Path("/var/tmp/kvmufw-test-cache/docker")
PACKAGES = ("docker.io", "containerd", "runc")
LAB_NET = b"""<network><name>lab</name>
  <forward mode='nat' dev='eth0'/><bridge name='virbr1'/>
  <ip address='10.0.0.1' prefix='24'><dhcp>
    <host mac='52:54:00:00:00:05' ip='10.0.0.5'/>
  </dhcp></ip></network>"""


def docker_root() -> Path:
    """Debian's dockerd, containerd and runc, unpacked (not installed) once."""
    root = CACHE / "root"
    if (root / "usr/sbin/dockerd").exists():
        return root
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, capture_output=True,
                         text=True, timeout=600)
    if got.returncode != 0:
        reason = f"apt-get download {' '.join(PACKAGES)} failed: {got.stderr.strip()[-300:]}"
        if os.environ.get("KVMUFW_REQUIRE_LAB"):
            pytest.fail(reason + "; KVMUFW_REQUIRE_LAB=1 forbids skipping", pytrace=False)
        pytest.skip(reason)
    unpacked = CACHE / "root.tmp"
    subprocess.run(["rm", "-rf", str(unpacked)], check=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    unpacked.rename(root)
    return root


class DockerLab:
    """The lab, dockerd in it, and our rules applied through its namespaces."""

    def __init__(self, lab: Lab, root: Path, state: Path) -> None:
        self.lab, self.root, self.state = lab, root, state
        self.backend = backends.get("iptables", prefix=["nsenter", "-t", str(lab.pid), "-m", "-n", "--"])

    def start_dockerd(self) -> None:
        path = f"{self.root}/usr/bin:{self.root}/usr/sbin:$PATH"
        self.lab.sh(f"PATH={path} setsid dockerd --iptables=true --storage-driver=vfs "
                    "-H unix:///run/docker.sock --pidfile /run/docker.pid "
                    ">>/run/dockerd.log 2>&1 </dev/null &")
        deadline = time.monotonic() + 60
        while "API listen on" not in (log := self.lab.run("cat", "/run/dockerd.log").stdout):
            assert time.monotonic() < deadline and "failed to start daemon" not in log, \
                log[-3000:]
            time.sleep(0.1)

    def stop_dockerd(self) -> None:
        pid = int(self.lab.run("cat", "/run/docker.pid").stdout)
        assert pid in self.lab.lab_pids()  # the lab's own dockerd, never another
        self.lab.run("kill", str(pid))
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.lab.sh("> /run/dockerd.log")

    def docker_rules(self) -> list[str]:
        """Every line of Docker's chains, and Docker's jumps from the built-in chains."""
        saved = self.lab.save(4)
        return [line for line in saved.splitlines() if "DOCKER" in line
                or ("docker0" in line and "KVMUFW" not in line)]

    def probes(self) -> dict[str, str | None]:
        ask = self.lab.ask
        return {
            "egress": ask("g5", "tcp", "203.0.113.2", 9000),
            "dnat": ask("inet", "tcp", "203.0.113.1", 2222),
            "hairpin": ask("g6", "tcp", "203.0.113.1", 2222),
            "own_forward": ask("g5", "tcp", "203.0.113.1", 2222),
            "container_egress": ask("c1", "tcp", "203.0.113.2", 9000),
        }


WORKING = {"egress": "203.0.113.1", "dnat": "203.0.113.2", "hairpin": "10.0.0.1",
           "own_forward": "10.0.0.1", "container_egress": "203.0.113.1"}


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    need_root_tools(*lab_module.PACKAGES_TOOLS, "apt-get", "dpkg-deb")
    root = docker_root()
    lab = Lab()
    state = tmp_path_factory.mktemp("state")
    patch = pytest.MonkeyPatch()
    patch.setenv("KVMUFW_STATE_DIR", str(state / "run"))
    patch.setenv("KVMUFW_LIBVIRT_NETWORK_DIR", str(state))
    try:
        lab.run("mount", "-t", "sysfs", "sysfs", "/sys")  # the lab's own interfaces
        # dockerd >= 23 wants the devices cgroup mounted (cgroup v1) or cgroup2; it
        # creates nothing there until a container runs, and none does here
        lab.sh("mount -t tmpfs cgroups /sys/fs/cgroup && mkdir /sys/fs/cgroup/devices && "
               "(mount -t cgroup -o devices cgroup /sys/fs/cgroup/devices || "
               "mount -t cgroup2 cgroup2 /sys/fs/cgroup/devices)")
        lab.sh("ufw --force enable >/dev/null")  # UFW first, as at boot
        env = DockerLab(lab, root, state)
        env.start_dockerd()
        lab.sh("""
            ip link add virbr1 type bridge
            ip addr add 10.0.0.1/24 dev virbr1
            ip link set virbr1 up
        """)
        lab.add_guest_ns("g5", "virbr1", "10.0.0.5", 24, "10.0.0.1")
        lab.add_guest_ns("g6", "virbr1", "10.0.0.6", 24, "10.0.0.1")
        lab.add_guest_ns("c1", "docker0", "172.17.0.2", 16, "172.17.0.1")
        lab.serve("g5", "tcp", 22)
        lab.serve("inet", "tcp", 9000)
        yield env
    finally:
        patch.undo()
        lab.destroy()


def guest_xml(port: str) -> bytes:
    return f"""<domain><name>g5</name><metadata><forwards xmlns="urn:kvmufw:1">
        <forward host-port="2222" guest-port="22"/></forwards></metadata><devices>
        <interface type='network'><source network='lab' bridge='virbr1'/>
        <mac address='52:54:00:00:00:05'/><target dev='{port}'/></interface>
        </devices></domain>""".encode()


def test_guests_and_containers_keep_working_through_dockerd_restart_and_ufw_reload(docker):
    lab, backend = docker.lab, docker.backend
    assert lab.run("sysctl", "-n", "net.bridge.bridge-nf-call-iptables").stdout.strip() == "1"
    saved = lab.save(4)
    assert ":FORWARD DROP" in saved and "-A FORWARD -j DOCKER-USER" in saved
    theirs = docker.docker_rules()
    assert docker.probes()["container_egress"] == "203.0.113.1"

    net, _ = parse_hookdata(LAB_NET)
    ops.network_started(net, LAB_NET, backend=backend)
    xml = guest_xml(lab.guests["g5"])
    ops.domain_started(parse_domain_xml(xml), xml, backend=backend)
    assert docker.probes() == WORKING
    assert docker.docker_rules() == theirs  # never a Docker chain, rule or jump changed

    # dockerd restarts: it puts DOCKER-USER's jump first again, above ours
    docker.stop_dockerd()
    docker.start_dockerd()
    forward = re.findall(r"^-A FORWARD (.*)$", lab.save(4), re.M)
    assert forward[0] == "-j DOCKER-USER" and "-j KVMUFW-FORWARD" in forward
    assert docker.probes() == WORKING  # Docker's rules match only its own bridges
    ops.restore(jumps_only=True, backend=backend)  # libvirt's unit, or any hook, later
    forward = re.findall(r"^-A FORWARD (.*)$", lab.save(4), re.M)
    assert forward[0] == "-j KVMUFW-FORWARD"
    assert docker.docker_rules() == theirs
    assert docker.probes() == WORKING

    lab.sh("ufw reload >/dev/null")
    assert docker.probes() == WORKING
    assert docker.docker_rules() == theirs

    ops.flush(backend=backend)
    assert docker.docker_rules() == theirs
    assert docker.probes()["container_egress"] == "203.0.113.1"
