"""The role's forwards module (contrib/ansible/kvmufw_hook/library/kvmufw_forwards.py):
what it decides to remove and add, from what libvirt holds and what the inventory says.
The whole role runs against real hosts in test_lab_fleet.py."""

import importlib.util

import pytest
from conftest import ROOT

pytest.importorskip("ansible.module_utils.basic")  # Debian's ansible-core (tests/packages.txt)
PATH = ROOT / "contrib" / "ansible" / "kvmufw_hook" / "library" / "kvmufw_forwards.py"
spec = importlib.util.spec_from_file_location("kvmufw_forwards", PATH)
assert spec and spec.loader
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)

SSH = {"host-port": "2222", "guest-port": "22"}
WEB = {"host-port": "8080", "guest-port": "80", "comment": "web"}


def want(*items):
    return [mod.wanted_forward("domain", "web1", item) for item in items]


def test_an_inventory_entry_becomes_the_attributes_the_package_writes():
    assert want({"host_port": 2222, "guest_port": 22, "host_ip": "203.0.113.1",
                 "comment": None}) == [{"host-port": "2222", "guest-port": "22",
                                        "host-ip": "203.0.113.1"}]
    with pytest.raises(mod.Invalid, match="unknown key.*guest_mac"):
        want({"host_port": 1, "guest_mac": "52:54:00:00:00:01"})  # a network's key
    with pytest.raises(mod.Invalid, match="host_port"):
        want({"guest_port": 22})


def test_defaults_make_two_spellings_of_one_forward_equal():
    assert mod.normal({"host-port": "2222", "guest-port": "2222", "proto": "TCP"}) == \
        mod.normal({"host-port": "2222"})
    assert mod.normal({"host-port": "2222", "proto": "udp"}) != mod.normal({"host-port": "2222"})


def test_forwards_already_there_in_every_definition_change_nothing():
    have = {"live": [dict(SSH, proto="tcp")], "persistent": [SSH]}
    assert mod.changes(have, want({"host_port": 2222, "guest_port": 22}), prune=False) == \
        ([], [])


def test_a_forward_missing_from_one_definition_is_added_and_nothing_removed():
    have = {"live": [SSH], "persistent": []}  # added live only, by hand
    assert mod.changes(have, [SSH], prune=False) == ([], [SSH])


def test_a_forward_whose_attributes_changed_is_removed_and_added_again():
    have = {"live": [SSH], "persistent": [SSH]}
    new = dict(SSH, source="198.51.100.0/24")
    assert mod.changes(have, [new], prune=False) == ([SSH], [new])


def test_unlisted_forwards_go_only_when_told():
    have = {"live": [SSH, WEB], "persistent": [SSH, WEB]}
    assert mod.changes(have, [SSH], prune=False) == ([], [])
    assert mod.changes(have, [SSH], prune=True) == ([WEB], [])
    # an object the inventory does not name: untouched, or emptied when told
    assert mod.changes(have, None, prune=False) == ([], [])
    assert mod.changes(have, None, prune=True) == ([SSH, WEB], [])


def test_forwards_are_read_from_our_namespace_only():
    xml = """<domain><name>web1</name><metadata>
      <other:x xmlns:other="urn:other"><forward host-port="1"/></other:x>
      <kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">
        <kvmufw:forward host-port="2222" guest-port="22"/><forward host-port="53" proto="udp"/>
      </kvmufw:forwards></metadata></domain>"""
    assert mod.forwards_in(xml) == [SSH, {"host-port": "53", "proto": "udp"}]
    assert mod.forwards_in("<network><name>n</name></network>") == []


def test_changes_are_the_package_commands():
    uri = "qemu:///system"
    assert mod.command("kvmufw_hook", uri, "domain", "web1", "add",
                       dict(WEB, **{"host-ip": "203.0.113.1"})) == [
        "kvmufw_hook", "forward", "add", "-c", uri, "web1", "8080:80/tcp",
        "--host-ip", "203.0.113.1", "--comment", "web"]
    assert mod.command("kvmufw_hook", uri, "network", "lab", "add",
                       {"host-port": "8081", "guest-mac": "52:54:00:00:00:06"}) == [
        "kvmufw_hook", "forward", "add", "-c", uri, "--network", "lab", "8081/tcp",
        "--guest-mac", "52:54:00:00:00:06"]
    assert mod.command("kvmufw_hook", uri, "domain", "web1", "remove",
                       dict(WEB, proto="udp", **{"host-ip": "203.0.113.1"})) == [
        "kvmufw_hook", "forward", "remove", "-c", uri, "web1", "8080/udp",
        "--host-ip", "203.0.113.1"]
