"""libvirt's own test corpus through the hooks and ``plan``: every domain XML of libvirt's
test suite (tests/qemuxmlconfdata, tests/qemuxml2argvdata before libvirt 10) and every
network XML (tests/networkxml2xmlin), from the source of the libvirt this machine runs,
fetched with apt's source tooling into a cache outside the repository."""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, need_root_tools

CACHE = Path(os.environ.get("KVMUFW_TEST_CACHE", "/var/tmp/kvmufw-test-cache"))
DOMAIN_DIRS = ("tests/qemuxmlconfdata", "tests/qemuxml2argvdata")
NETWORK_DIR = "tests/networkxml2xmlin"


def _apt_sources(dest: Path) -> Path:
    """A private deb-src list made from this machine's own apt sources (nothing in /etc
    changes): the same mirrors and suites, source packages instead of binaries."""
    parts = dest / "sources.list.d"
    parts.mkdir(parents=True, exist_ok=True)
    found = False
    for src in Path("/etc/apt/sources.list.d").glob("*.sources"):
        text = src.read_text()
        if "Types: deb" in text:
            (parts / src.name).write_text(text.replace("Types: deb\n", "Types: deb-src\n"))
            found = True
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        lines = [l.replace("deb ", "deb-src ", 1) for l in legacy.read_text().splitlines()
                 if l.startswith("deb ")]
        if lines:
            (parts / "legacy.list").write_text("\n".join(lines) + "\n")
            found = True
    if not found:
        pytest.skip("no apt sources on this machine to fetch libvirt's source from")
    return parts


def libvirt_corpus() -> tuple[Path, Path]:
    version, full = subprocess.run(
        ["dpkg-query", "-W", "-f", "${source:Upstream-Version} ${source:Version}",
         "libvirt-daemon"], capture_output=True, text=True).stdout.split() or ("", "")
    if not version:
        pytest.skip("libvirt-daemon is not installed (tests/run installs it)")
    base = CACHE / f"libvirt-{version}"
    if not (base / NETWORK_DIR).is_dir():
        work = CACHE / "apt"
        parts = _apt_sources(work)
        (work / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        options = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={parts}",
                   "-o", f"Dir::State::Lists={work}/lists", "-o", f"Dir::Cache={work}/cache",
                   "-o", "APT::Sandbox::User=root", "-qq"]
        download = CACHE / "download"
        download.mkdir(parents=True, exist_ok=True)
        steps = (["apt-get", *options, "update"],
                 ["apt-get", *options, "source", "--download-only", f"libvirt={full}"])
        for argv in steps:
            proc = subprocess.run(argv, cwd=download, capture_output=True, text=True,
                                  timeout=600)
        # only the upstream tarball is read: a mirror without the .dsc or .asc still serves
        origs = [p for p in download.glob(f"libvirt_{version}.orig.tar.*")
                 if not p.name.endswith(".asc")]
        if proc.returncode and not origs:
            pytest.skip(f"cannot fetch libvirt {version}'s source with apt: "
                        f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        [orig] = origs
        with tarfile.open(orig) as tar:
            wanted = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")
                      and any(f"/{d}/" in m.name for d in (*DOMAIN_DIRS, NETWORK_DIR))]
            for member in wanted:
                member.name = member.name.split("/", 1)[1]
                tar.extract(member, base)
    domains = next((base / d for d in DOMAIN_DIRS if (base / d).is_dir()), None)
    if domains is None:
        pytest.skip(f"libvirt {version}'s source has none of {', '.join(DOMAIN_DIRS)}")
    return domains, base / NETWORK_DIR


def test_libvirt_test_corpus_through_hooks_and_plan(netns):
    need_root_tools("apt-get", "dpkg-query")
    domains, networks = libvirt_corpus()
    proc = subprocess.run([*netns.prefix, "/usr/bin/python3", str(ROOT / "tests" / "corpus" / "corpus_driver.py"),
                           str(domains), str(networks)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    counts = report["counts"]
    print(f"libvirt corpus: {counts}")
    assert counts["domains"] > 500 and counts["networks"] > 20
    assert report["failures"] == [], json.dumps(report["failures"][:10], indent=1)
