"""Hooks and the CLI run as libvirt and admins run them: the real shims in hooks/ (a
subprocess with libvirt's argv, XML on stdin and a cleared environment), optionally inside
a network namespace a test created; the samples of a real libvirt 9.0 lifecycle and the
lab network and domains the kernel tests start."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests" / "fixtures" / "samples"
HOOKS = ROOT / "hooks"


def run_hook(kind, argv, stdin: bytes, env: dict, netns=None):
    """Run hooks/KIND like libvirt does: argv, XML on stdin, a cleared environment."""
    prefix = netns.prefix if netns else []
    clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LC_ALL": "C", **env}
    return subprocess.run([*prefix, str(HOOKS / kind), *argv], input=stdin,
                          capture_output=True, env=clean, timeout=60, check=False)


PYTHON = "/usr/bin/python3 -IS"  # what qemu's hook (a shell script) execs for the ops that matter


def installed_hook(kind: str, directory, lib=ROOT, python: str = PYTHON) -> Path:
    """hooks/KIND as the installer writes it (``install_files.hook_text``: LIB a constant,
    here ``lib``) in ``directory``; ``python`` stands for the interpreter qemu's hook execs
    (say with ``-X importtime``, or a program that records that it ran)."""
    from kvmufw_hook.commands.install_files import hook_text
    text = hook_text(str(ROOT), kind, str(lib))
    if python != PYTHON:
        assert f"exec {PYTHON} " in text, kind
        text = text.replace(f"exec {PYTHON} ", f"exec {python} ", 1)
    path = Path(directory, kind)
    path.write_text(text)
    path.chmod(0o755)
    return path


def sample(name):
    argv = (SAMPLES / f"{name}.argv").read_text().split()
    kind = name.split("-", 1)[1].split(".")[0]
    return kind, argv, (SAMPLES / f"{name}.xml").read_bytes()


def kvmufw_lines(netns):
    return [l for l in netns.save().splitlines() if "kvmufw:" in l]


def owners(netns):
    return {l.split('kvmufw:')[1].split(",")[0] for l in kvmufw_lines(netns)}


def default_started_xml():
    """The default network's hookData as at `started` (the port sample minus its port)."""
    xml = (SAMPLES / "02-network.default.port-created.xml").read_text()
    return (xml.split("<networkport>")[0] + "</hookData>").encode()


FORWARDS = '<kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">{}</kvmufw:forwards>'


def domain_xml(name: str, mac: str, *forwards: str, network: str = "lab",
               bridge: str = "virbr1") -> bytes:
    body = "".join(f"<kvmufw:forward {f}/>" for f in forwards)
    return (f"<domain type='qemu'><name>{name}</name><metadata>{FORWARDS.format(body)}"
            f"</metadata><devices><interface type='network'><mac address='{mac}'/>"
            f"<source network='{network}' bridge='{bridge}'/></interface></devices>"
            "</domain>").encode()


def lab_network(*forwards: str) -> bytes:
    """The lab network of the samples, two more reservations (:21 .21, :22 .22) and
    network forwards."""
    xml = (SAMPLES / "16-network.lab.started.xml").read_text().replace(
        "<host mac='52:54:00:00:00:20' name='db1' ip='10.0.0.5'/>",
        "<host mac='52:54:00:00:00:20' name='db1' ip='10.0.0.5'/>"
        "<host mac='52:54:00:00:00:21' ip='10.0.0.21'/>"
        "<host mac='52:54:00:00:00:22' ip='10.0.0.22'/>")
    if forwards:
        body = "".join(f"<kvmufw:forward {f}/>" for f in forwards)
        xml = xml.replace("<name>lab</name>",
                          f"<name>lab</name><metadata>{FORWARDS.format(body)}</metadata>")
    return xml.encode()


def cli(netns, env, *args, extra_path=None, user=None, timeout=60):
    """``kvmufw_hook ARGS`` as an admin runs it, in the test's network namespace."""
    path = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    code = (f"import sys; sys.path[:0] = {path!r}; from kvmufw_hook.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    prefix = netns.prefix + (["setpriv", f"--reuid={user}", f"--regid={user}",
                              "--clear-groups"] if user else [])
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={"PATH": os.environ["PATH"], "LC_ALL": "C", **env})


def dnat_owners(netns, port: int) -> set[str]:
    return {l.split("kvmufw:")[1].split(",")[0] for l in netns.save().splitlines()
            if "-j DNAT" in l and f"--dport {port} " in l and "KVMUFW-PREROUTING" in l}


def port_created(network_xml: bytes, owner: str, mac: str, bridge: str = "virbr1") -> bytes:
    """The hookData of ``port-created``: the network and the new port of ``owner``."""
    text = network_xml.decode()
    port = (f"<networkport><uuid>574a15fc-18cc-4338-87ff-85d7caa2a145</uuid><owner>"
            f"<name>{owner}</name><uuid>fea4d738-cef0-4b4d-8bdd-5ec70873bef7</uuid></owner>"
            f"<mac address='{mac}'/><plug type='network' bridge='{bridge}'/></networkport>")
    return text.replace("</hookData>", port + "</hookData>").encode()


def hook_ok(netns, env, kind, argv, stdin):
    proc = run_hook(kind, argv, stdin, env, netns)
    assert proc.returncode == 0, proc.stderr
    return proc


def started_lab(netns, env, *forwards):
    hook_ok(netns, env, "network", ["lab", "started", "begin", "-"], lab_network(*forwards))
