import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))  # lab, netlab, fakebackend...

FIXTURES = ROOT / "tests" / "fixtures"
SAMPLES = FIXTURES / "samples"


def need_root_tools(*tools: str) -> None:
    """Kernel and lab tests need root and real tools. Elsewhere they skip with the
    reason; CI sets KVMUFW_REQUIRE_LAB=1, so there a missing tool is a failure."""
    reason = None
    missing = [t for t in tools if shutil.which(t, path="/usr/sbin:/sbin:/usr/bin:/bin") is None]
    if os.geteuid() != 0:
        reason = "needs root (network namespaces, iptables, libvirtd)"
    elif missing:
        reason = "missing tools: " + ", ".join(missing) + " (tests/run installs them)"
    if reason and os.environ.get("KVMUFW_REQUIRE_LAB"):
        pytest.fail(reason + "; KVMUFW_REQUIRE_LAB=1 forbids skipping", pytrace=False)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def state_env(tmp_path, monkeypatch):
    """An empty state dir and libvirt network dir for ops/hooks run in this process; no
    configuration file (``KVMUFW_CONFIG``, absent) and no dnsmasq leases yet."""
    state = tmp_path / "state"
    libvirt_net = tmp_path / "libvirt-network"
    libvirt_net.mkdir()
    dnsmasq = tmp_path / "dnsmasq"
    dnsmasq.mkdir()
    env = {"KVMUFW_STATE_DIR": str(state), "KVMUFW_LIBVIRT_NETWORK_DIR": str(libvirt_net),
           "KVMUFW_CONFIG": str(tmp_path / "kvmufw_hook.conf"),
           "KVMUFW_DNSMASQ_DIR": str(dnsmasq)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def netns():
    """A fresh network namespace with iptables; removed afterwards."""
    need_root_tools("ip", "iptables-restore", "iptables-save")
    from netlab import Netns
    ns = Netns.create("host")
    try:
        yield ns
    finally:
        ns.destroy()


@pytest.fixture(scope="module")
def lab():
    """The standard lab (tests/support/lab.py: networks lab, routed and opennet, UFW,
    kvmufw_hook installed), one libvirtd per module. A module with another topology
    defines its own ``lab``."""
    import lab as lab_module
    need_root_tools(*lab_module.PACKAGES_TOOLS)
    the_lab = lab_module.make_lab(install=True)
    yield the_lab
    the_lab.destroy()


@pytest.fixture
def guest(lab):
    """Define and start guests in this module's lab; every guest is destroyed and
    undefined afterwards."""
    names = []

    def start(name, nics, metadata=""):
        lab.define_domain(name, nics, metadata)
        names.append(name)
        lab.virsh("start", name)

    yield start
    for name in names:
        lab.virsh("destroy", name, check=False)
        lab.virsh("undefine", name, check=False)


@pytest.fixture
def host():
    """A private host without libvirtd running (tests/support/lab.py): its own /etc,
    /usr/local, /var/lib, /run; a fresh one per test (0.2 s)."""
    import lab as lab_module
    need_root_tools(*lab_module.PACKAGES_TOOLS)
    the_lab = lab_module.Lab()
    yield the_lab
    the_lab.destroy()


# The tier of a test is its folder: ``pytest -m unit`` is tests/unit, and so on. The
# Debian 13 run is a lab test (it runs the lab inside a Debian 13 root).
TIERS = {"unit": "unit", "kernel": "kernel", "lab": "lab", "boot": "boot",
         "corpus": "corpus", "debian13": "lab"}
# fixtures that need root: a unit test asking for one is in the wrong folder
ROOT_FIXTURES = {"netns", "lab", "guest", "host", "hook_ns", "topo"}


def pytest_collection_modifyitems(items):
    """Tiers by folder: ``unit`` (no root, milliseconds: the quick loop is ``pytest -m
    unit``), ``kernel`` (a network namespace, real iptables/nft), ``lab`` (a real
    libvirtd), ``boot``, ``corpus``. A test whose run in the Debian 13 root starts early
    (tests/debian13/early.py) goes last: by then its run has had the whole session."""
    items.sort(key=lambda item: hasattr(getattr(item, "obj", None), "start_early"))
    for item in items:
        folder = item.path.parent.name
        callspec = getattr(item, "callspec", None)
        params = set(callspec.params) if callspec else set()  # a parameter, not a fixture
        wants_root = ROOT_FIXTURES & set(getattr(item, "fixturenames", ())) - params
        tier = TIERS.get(folder)
        if tier is None:  # a new module not yet placed in its folder: by its fixtures
            tier = ("lab" if {"lab", "guest", "host"} & wants_root else
                    "kernel" if wants_root else "unit")
        if tier == "unit" and wants_root:
            raise pytest.UsageError(f"{item.nodeid}: a unit test needs no root, but asks "
                                    f"for {', '.join(sorted(wants_root))}: tests/kernel "
                                    "or tests/lab is its place")
        item.add_marker(getattr(pytest.mark, tier))


# The Debian 13 root's runs wait for the boot test: its VM (TCG, two vCPUs) takes both
# cores, and a run beside it starved its vCPUs once (the guest hung in its first phase).
_EARLY: list = []  # the session's items until the runs begin


def pytest_collection_finish(session):
    """Begin the Debian 13 root's runs of the selected tests beside the rest of the
    session (tests/debian13/early.py): now, or when the first test outside tests/boot
    starts, where the boot test is selected."""
    if session.config.option.collectonly or not any(
            hasattr(getattr(item, "obj", None), "start_early") for item in session.items):
        return
    _EARLY[:] = [session]
    if not any(item.path.parent.name == "boot" for item in session.items):
        _start_early()


def pytest_runtest_setup(item):
    if _EARLY and item.path.parent.name != "boot":
        _start_early()


def _start_early() -> None:
    session = _EARLY.pop()
    from debian13 import early
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for nodeid in early.start_selected(session.items):
        if reporter is not None:
            reporter.write_line(f"{nodeid}: its run in the Debian 13 root begins now, "
                                "beside the other tests")


def pytest_sessionfinish(session):
    """A run begun early and not waited for (^C, -x, a failed session) ends with it."""
    early = sys.modules.get("debian13.early")
    if early is not None:
        early.stop_all()
