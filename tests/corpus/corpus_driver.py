"""Runs libvirt's own test XML through the hook entry and ``plan``, in-process, inside the
network namespace it was started in (tests/corpus/test_corpus.py starts it with ip netns exec).

    corpus_driver.py DOMAIN_DIR NETWORK_DIR  ->  JSON summary on stdout

Each domain XML goes through qemu prepare, start, reconnect, stopped and release twice:
as libvirt wrote it, and with our metadata added (so the parser and planner run on
every shape of domain libvirt knows). Each network XML goes through ``plan`` and the
network hook's start, started and stopped. A failure is: an exception escaping, a
byte on stdout, a traceback or internal error on stderr, or an exit status outside
what the contract allows for that op.
"""

import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

QEMU_OPS = {"prepare": (0, 2), "start": (0, 2), "reconnect": (0,), "stopped": (0,),
            "release": (0,)}
NETWORK_OPS = {"start": (0, 2), "started": (0, 2), "stopped": (0,)}
METADATA = ('<metadata><kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">'
            '<kvmufw:forward host-port="2222" guest-port="22"/>'
            '<kvmufw:forward proto="udp" host-port="5000-5002" guest-ip="192.168.122.9"/>'
            '</kvmufw:forwards></metadata>')


def with_metadata(xml: str) -> str:
    if "<metadata>" in xml:
        return xml.replace("<metadata>", METADATA[:-len("</metadata>")], 1)
    head, sep, tail = xml.partition("</name>")
    return head + sep + METADATA + tail if sep else xml


def call(fn, *args):
    """(exit status, stdout text, stderr text) of fn(*args), exceptions included."""
    out, err = io.StringIO(), io.StringIO()
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        status = fn(*args)
    except BaseException as exc:
        status = f"exception {type(exc).__name__}: {exc}"
    finally:
        sys.stdout, sys.stderr = real
    return status, out.getvalue(), err.getvalue()


def check(label, allowed, status, out, err, failures):
    if status not in allowed or out or "Traceback" in err or "internal error" in err:
        failures.append({"case": label, "status": str(status), "stdout": out[:200],
                         "stderr": err[-400:]})


def main() -> int:
    domains, networks = Path(sys.argv[1]), Path(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="kvmufw-corpus-")
    # anything written to file descriptor 1 (by us or a child) lands here and is a failure
    report_fd = os.dup(1)
    sink = os.open(f"{tmp}/fd1", os.O_WRONLY | os.O_CREAT, 0o600)
    os.dup2(sink, 1)
    os.environ["KVMUFW_STATE_DIR"] = f"{tmp}/state"
    os.environ["KVMUFW_LIBVIRT_NETWORK_DIR"] = f"{tmp}/none"
    from kvmufw_hook import cli, hook
    # syslog from thousands of calls would flood the machine's log: keep it in memory
    hook.log = lambda message, error=False: None
    failures: list = []
    counts = {"domains": 0, "networks": 0, "calls": 0}
    for path in sorted(domains.glob("*.xml")):
        counts["domains"] += 1
        original = path.read_text(errors="surrogateescape")
        for variant, xml in (("as is", original), ("with metadata", with_metadata(original))):
            data = xml.encode("utf-8", "surrogateescape")
            for op, allowed in QEMU_OPS.items():
                counts["calls"] += 1
                result = call(hook.main, "qemu", [path.stem, op, "begin", "-"], data)
                check(f"{path.name} ({variant}) qemu {op}", allowed, *result, failures)
    for path in sorted(networks.glob("*.xml")):
        counts["networks"] += 1
        counts["calls"] += 1
        status, out, err = call(cli.main, ["plan", str(path)])
        if status not in (0, 2) or "Traceback" in err:
            failures.append({"case": f"{path.name} plan", "status": str(status),
                             "stderr": err[-400:]})
        data = b"<hookData>" + path.read_bytes() + b"</hookData>"
        for op, allowed in NETWORK_OPS.items():
            counts["calls"] += 1
            result = call(hook.main, "network", [path.stem, op, "begin", "-"], data)
            check(f"{path.name} network {op}", allowed, *result, failures)
    os.dup2(report_fd, 1)
    leaked = Path(f"{tmp}/fd1").read_bytes()
    if leaked:
        failures.append({"case": "file descriptor 1", "stdout": leaked[:400].decode("replace")})
    with os.fdopen(report_fd, "w") as report:
        json.dump({"counts": counts, "failures": failures}, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
