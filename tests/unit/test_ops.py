"""ops on iptables in memory (tests/support/fakebackend.py): what each hook op and command
changes, the revert path across tables, and state that follows the kernel. No root, no
kernel: the fast tier (``pytest -m unit``)."""

import pytest
from conftest import SAMPLES
from fakebackend import FakeBackend

from kvmufw_hook import host, ops, state
from kvmufw_hook.errors import ApplyError, InputError
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata


@pytest.fixture(autouse=True)
def quiet_host(monkeypatch, state_env):
    """A host with one address and no services: what /proc would say is not the test."""
    from ipaddress import IPv4Address
    facts = host.HostFacts(frozenset({IPv4Address("203.0.113.1")}), ())
    monkeypatch.setattr(host.HostFacts, "read", classmethod(lambda cls, prefix=(): facts))


def lab_started(backend):
    raw = (SAMPLES / "16-network.lab.started.xml").read_bytes()
    net, _port = parse_hookdata(raw)
    ops.network_started(net, raw, backend=backend)


def web1():
    raw = (SAMPLES / "04-qemu.web1.start.xml").read_bytes()
    return parse_domain_xml(raw), raw


def owners(backend) -> set[str]:
    return {l.split("kvmufw:")[1].split(",")[0] for l in backend.save().splitlines()
            if "kvmufw:" in l}


def test_start_and_stop_add_and_remove_exactly_the_guests_rules():
    backend = FakeBackend()
    lab_started(backend)
    before = backend.save()
    dom, raw = web1()
    ops.domain_started(dom, raw, backend=backend)
    assert owners(backend) == {"n=lab", "d=web1"}
    assert state.has_domain("web1")
    assert ops.domain_started(dom, raw, backend=backend).payload == ""  # twice: nothing
    ops.domain_stopped("web1", backend=backend)
    assert backend.save() == before and not state.has_domain("web1")
    assert ops.domain_stopped("web1", backend=backend).payload == ""


def test_a_refused_table_reverts_the_other_and_state_follows_the_kernel():
    backend = FakeBackend()
    lab_started(backend)
    before = backend.save()
    backend.fail_tables = {"nat"}
    dom, raw = web1()
    with pytest.raises(ApplyError):
        ops.domain_started(dom, raw, backend=backend)
    assert backend.save() == before  # filter was committed, then reverted
    assert not state.has_domain("web1")  # nothing of it in the kernel: no state either


def test_a_failed_update_keeps_the_state_of_rules_still_in_the_kernel():
    """reconnect with new metadata whose write fails: the old rules are back, and the
    state stays so that stopped/release remove them later."""
    backend = FakeBackend()
    lab_started(backend)
    dom, raw = web1()
    ops.domain_started(dom, raw, backend=backend)
    changed = raw.replace(b'host-port="2222"', b'host-port="2223"')
    backend.fail_tables = {"nat"}
    with pytest.raises(ApplyError):
        ops.domain_started(parse_domain_xml(changed), changed, backend=backend)
    assert "d=web1" in owners(backend) and state.has_domain("web1")
    backend.fail_tables = set()
    ops.domain_stopped("web1", backend=backend)
    assert "d=web1" not in owners(backend)


def test_a_conflict_is_refused_before_anything_is_written():
    backend = FakeBackend()
    lab_started(backend)
    dom, raw = web1()
    ops.domain_started(dom, raw, backend=backend)
    writes = len(backend.writes)
    other = raw.replace(b"<name>web1</name>", b"<name>web2</name>")
    with pytest.raises(InputError, match="already forwarded by domain 'web1'"):
        ops.domain_started(parse_domain_xml(other), other, backend=backend)
    assert len(backend.writes) == writes and not state.has_domain("web2")


def test_restore_jumps_only_and_network_stop():
    backend = FakeBackend()
    lab_started(backend)
    backend.tables["filter"]["LIBVIRT_FWX"] = []
    backend.tables["filter"]["FORWARD"].insert(0, "-A FORWARD -j LIBVIRT_FWX")
    assert backend.entry_problems(backend.read()) == ["FORWARD (filter)"]
    ops.restore(jumps_only=True, backend=backend)
    assert backend.entry_problems(backend.read()) == []
    assert backend.tables["filter"]["FORWARD"][0] == "-A FORWARD -j KVMUFW-FORWARD"
    net, _ = parse_hookdata((SAMPLES / "14-network.lab.stopped.xml").read_bytes())
    ops.network_stopped(net, backend=backend)
    assert "KVMUFW" not in backend.save(4) + backend.save(6)


class LibvirtRestarts(FakeBackend):
    """libvirt's start as seen from iptables: a few reads after the unit started, its
    network reload puts its jump at position 1 of FORWARD again."""

    def __init__(self, reload_at: int) -> None:
        super().__init__()
        self.reads, self.reload_at = 0, reload_at

    def read(self, families=()):
        self.reads += 1
        if self.reads == self.reload_at:
            self.tables["filter"].setdefault("LIBVIRT_FWX", [])
            self.tables["filter"]["FORWARD"].insert(0, "-A FORWARD -j LIBVIRT_FWX")
        return super().read(families)


def test_watch_puts_our_jumps_back_after_libvirts_late_reload():
    backend = LibvirtRestarts(reload_at=4)
    lab_started(backend)
    assert ops.watch_jumps(1.0, interval=0.1, backend=backend) == 1
    assert backend.tables["filter"]["FORWARD"][0] == "-A FORWARD -j KVMUFW-FORWARD"
    assert backend.entry_problems(backend.read()) == []
