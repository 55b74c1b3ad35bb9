"""The suite's release-dependent part again on Debian 13 (libvirt 11.3, iptables 1.8.11,
nftables 1.1, Python 3.13), inside a debootstrapped root entered with unshare + pivot_root
(tests/debian13/root.py), when this machine runs another Debian release. On Debian 13 the
suite already runs natively and this test skips. KVMUFW_* variables (KVMUFW_REQUIRE_LAB)
pass in. The inner run's summary is printed; on failure its whole output is the message."""

import pytest
from conftest import need_root_tools

from debian13 import early
from debian13.root import os_release

INNER_TIMEOUT = 40 * 60  # from the run's start: at collection, beside the host's tests
# What runs again inside the root: what depends on the release. Unit tests (Python 3.13,
# cheap), every kernel test (iptables 1.8.11 prints and restores rules its own way, nft
# 1.1, conntrack, the shims on Python 3.13), libvirt 11's own corpus, and the labs of
# libvirt 11 (its hooks, reloads and firewall), trixie's UFW, apt and Docker, and the
# fleet's Ansible. Not again: the boot test (it boots its own Debian 12 VM),
# test_lab_nft.py (its own test runs it in this very root), and what decides nothing by
# release: tests/lab/test_adversarial.py (our policy against an adversary, proven natively).
INNER = ["tests/unit", "tests/kernel", "tests/corpus", "tests/lab"]
NOT_INNER = ["tests/lab/test_lab_nft.py", "tests/lab/test_adversarial.py"]


def why_no_debian13_run() -> str | None:
    """Why the suite does not run again in a Debian 13 root here (None: it does)."""
    release = os_release()
    if release.get("ID") != "debian":
        return ("the Debian 13 root is built from Debian's archive; "
                f"this is {release.get('ID')}")
    if release.get("VERSION_ID") == "13":
        return "this machine is Debian 13: the suite ran natively"
    return None


def need_debian13_root() -> None:
    why = why_no_debian13_run()
    if why:
        pytest.skip(why)
    need_root_tools("debootstrap", "unshare", "pivot_root")


# What tests/support/lab.py does: a holder in new mount + net namespaces, then nsenter -m -n into it.
# After a plain chroot that would land on the host's root and run the host's binaries.
NSENTER_PROBE = """
unshare --mount --net --propagation private sleep 60 &
holder=$!
while [ "$(readlink /proc/$holder/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.01; done
nsenter -t $holder -m -n -- sh -c 'cat /etc/debian_version; libvirtd --version; iptables --version'
python3 -c 'import sys; print(sys.version_info[:2])'
kill $holder
"""


def test_the_lab_entered_with_nsenter_inside_the_root_is_debian13():
    need_debian13_root()
    from debian13.root import ensure_root, run_in_root
    ensure_root()
    proc = run_in_root(["bash", "-c", NSENTER_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    release, libvirtd, iptables, python = proc.stdout.splitlines()
    assert release.startswith("13.")
    assert libvirtd.startswith("libvirtd (libvirt) 11.")
    assert iptables.startswith("iptables v1.8.11")
    assert python == "(3, 13)"


def start_inner_suite() -> early.Run | None:
    """The inner suite's run, begun at collection (tests/debian13/early.py: it overlaps
    the host's tests) or when the test starts; None where the test skips or fails first."""
    if why_no_debian13_run() or not early.can_enter_root():
        return None
    return early.run("inner suite",
                     ["python3", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra",
                      *(f"--ignore={path}" for path in NOT_INNER), *INNER], INNER_TIMEOUT)


@early.starts_early(start_inner_suite)
def test_the_release_dependent_suite_passes_in_a_debian13_root(capsys):
    need_debian13_root()
    inner = start_inner_suite()
    assert inner is not None
    result = inner.wait()
    if result.returncode is None:
        pytest.fail(f"the suite inside the Debian 13 root took over {INNER_TIMEOUT}s:\n"
                    f"{result.stdout[-30000:]}", pytrace=False)
    lines = result.stdout.rstrip().splitlines()
    summary = lines[-1] if lines else "(no output)"
    with capsys.disabled():
        print(f"\nDebian 13 root: root ready in {result.ready:.0f}s, inner suite "
              f"{result.ran:.0f}s: {summary}")
    assert result.returncode == 0, (f"the suite failed inside the Debian 13 root "
                                    f"(exit {result.returncode}):\n{result.stdout[-30000:]}\n"
                                    f"{result.stderr[-5000:]}")
