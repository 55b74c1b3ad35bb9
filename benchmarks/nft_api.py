#!/usr/bin/python3
"""One ``nft`` process against libnftables through Debian's python3-nftables, for a guest
start's transaction (10 forwards: their DNAT map and accept set elements) amid 2,000.

    sudo /usr/bin/python3 benchmarks/nft_api.py [--reps N] [--json PATH]
    sudo /usr/bin/python3 benchmarks/run.py --packets     (with the packet benchmark)

Each variant is a whole process as a hook is one (``python3 -IS``, as the shims start):
- ``nft -f``: the interpreter spawns one ``nft -f FILE`` (``os.posix_spawn``, as
  ``process.py`` does) and waits;
- ``libnftables``: the interpreter imports ``nftables`` (from the distribution's
  dist-packages, which the hooks, run with -S, do not have on sys.path), makes a
  context and runs ``cmd`` on the text.
A third process imports ``json`` only (which imports ``re``, as a hook that parses XML
does anyway): libnftables' cost beyond it is what a start would pay. Each alternates an
add and a delete of the same 20 elements, interleaved with a bare
interpreter, in a scratch network namespace; medians. The in-process cost (a warm
context's ``cmd`` against a spawn of ``nft``) is printed beside it.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import packets
import run as bench

DIST = "/usr/lib/python3/dist-packages"
SPAWN = ("import os, sys; pid = os.posix_spawn('/usr/sbin/nft', ['nft', '-f', sys.argv[1]],"
         " {}); sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")
LIBRARY = (f"import sys; sys.path.append({DIST!r}); from nftables import Nftables; "
           "rc, out, err = Nftables().cmd(open(sys.argv[1]).read()); "
           "sys.exit(rc and sys.stderr.write(err) and 1)")


def transactions(scratch: str) -> dict[str, str]:
    """The add and the delete of a guest's 10 forwards, as files."""
    forwards = [(30000 + k, "10.90.7.7", 1000 + k) for k in range(10)]
    dnat = ", ".join(f"tcp . {h} : {g} . {p}" for h, g, p in forwards)
    allow = ", ".join(f"{g} . tcp . {p}" for _, g, p in forwards)
    paths = {}
    for verb in ("add", "delete"):
        path = f"{scratch}/{verb}.nft"
        Path(path).write_text(f"{verb} element inet kvmufwbench dnat4 {{ {dnat} }}\n"
                              f"{verb} element inet kvmufwbench allow4 {{ {allow} }}\n")
        paths[verb] = path
    return paths


def measure(reps: int, scratch: str, report) -> dict:
    try:
        import nftables
    except ImportError:
        sys.path.append(DIST)
        try:
            import nftables  # noqa: F401
        except ImportError:
            report("nft process vs libnftables", "python3-nftables is not installed",
                   "informative", True)
            return {}
    from nftables import Nftables

    subprocess.run(["nft", "-f", "-"], input=packets.raw_nft(packets.all_forwards(
        packets.GUESTS)).encode(), check=True)
    files = transactions(scratch)
    variants = {"bare": [bench.PY, "-IS", "-c", "pass"],
                "bare + json": [bench.PY, "-IS", "-c", "import json"],
                "nft -f": [bench.PY, "-IS", "-c", SPAWN],
                "libnftables": [bench.PY, "-IS", "-c", LIBRARY]}
    times: dict[str, list[float]] = {label: [] for label in variants}
    for round_ in range(reps + 1):
        for label, argv in variants.items():
            for verb in ("add", "delete"):
                start = time.perf_counter()
                subprocess.run([*argv, files[verb]], check=True)
                if round_:
                    times[label].append(time.perf_counter() - start)
    ctx = Nftables()
    warm: dict[str, list[float]] = {"nft -f": [], "libnftables": []}
    texts = {verb: Path(path).read_text() for verb, path in files.items()}
    for _ in range(reps):
        for verb in ("add", "delete"):
            start = time.perf_counter()
            subprocess.run(["nft", "-f", files[verb]], check=True)
            warm["nft -f"].append(time.perf_counter() - start)
        for verb in ("add", "delete"):
            start = time.perf_counter()
            rc, _, err = ctx.cmd(texts[verb])
            warm["libnftables"].append(time.perf_counter() - start)
            assert rc == 0, err
    subprocess.run(["nft", "delete", "table", "inet", "kvmufwbench"], check=True)
    med = {label: statistics.median(t) for label, t in times.items()}
    inproc = {label: statistics.median(t) for label, t in warm.items()}
    bare = med["bare"]
    for label in ("nft -f", "libnftables"):
        report(f"guest-start transaction (20 elements amid 4,000) by {label}, whole process",
               f"{med[label] * 1000:.1f} ms = {med[label] / bare:.2f}x bare "
               f"{bare * 1000:.1f} ms (in a warm process: {inproc[label] * 1000:.2f} ms)",
               "informative", True, seconds=med[label], bare_seconds=bare,
               warm_seconds=inproc[label])
    marginal = med["libnftables"] - med["bare + json"]
    report("libnftables in a process that imports json (re) anyway",
           f"{marginal * 1000:.1f} ms more than that process, against "
           f"{(med['nft -f'] - bare) * 1000:.1f} ms for spawning nft", "informative", True,
           seconds=marginal)
    faster = min(("nft -f", "libnftables"), key=lambda label: med[label])
    report("faster for a hook", f"{faster} ({med['nft -f'] * 1000:.1f} ms vs "
           f"{med['libnftables'] * 1000:.1f} ms a call)", "informative", True)
    return {"process_seconds": med, "warm_seconds": inproc, "faster": faster}


def main() -> int:
    parser = bench.arguments(__doc__, 21, "nft_api.json")
    args = parser.parse_args()
    status = bench.in_scratch(__file__, args.in_netns, "a scratch network namespace")
    if status is not None:
        return status
    report = bench.Report()
    report.results["figures"] = measure(args.reps, args.in_netns, report)
    return report.write(args.json)


if __name__ == "__main__":
    sys.exit(main())
