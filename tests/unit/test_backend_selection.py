"""Root's configuration picks the firewall backend every hook and command uses."""

import pytest

from kvmufw_hook import backends
from kvmufw_hook.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.fixture
def conf(tmp_path, monkeypatch):
    path = tmp_path / "kvmufw_hook.conf"
    monkeypatch.setenv("KVMUFW_CONFIG", str(path))
    return path


def test_without_a_configuration_the_backend_is_iptables(conf):
    assert backends.default_backend().name == "iptables"


def test_the_configured_backend_is_the_one_the_registry_holds_under_that_name(
        conf, monkeypatch):
    monkeypatch.setitem(backends.REGISTRY, "nftables", ("nft", "NftBackend"))
    monkeypatch.setattr(backends, "get", lambda name, prefix=(): f"backend {name}")
    conf.write_text('firewall_backend = "nftables"\n')
    assert backends.default_backend() == "backend nftables"
    conf.write_text('firewall_backend = "iptables"  # back\n')
    assert backends.default_backend() == "backend iptables"


def test_a_configured_backend_missing_from_this_build_is_one_line_naming_the_file(
        conf, monkeypatch):
    conf.write_text('firewall_backend = "nftables"\n')
    monkeypatch.delitem(backends.REGISTRY, "nftables", raising=False)
    with pytest.raises(ConfigError) as err:
        backends.default_backend()
    assert str(err.value) == (f'{conf}: firewall_backend "nftables" has no backend in this '
                              "build of kvmufw_hook")


def test_a_wrong_configuration_selects_no_backend(conf):
    conf.write_text('firewall_backend = "pf"\n')
    with pytest.raises(ConfigError, match="line 1"):
        backends.default_backend()


BOTH = ("iptables", "nftables")


def test_doctor_names_the_backend_in_use_and_where_it_is_chosen(conf):
    from kvmufw_hook.commands.doctor import check_backend
    found = check_backend("iptables", 3, "iptables", BOTH)
    assert found.level == "OK"
    assert found.detail == f"iptables (firewall_backend in {conf})"
    assert check_backend("nftables", 5000, "nftables", BOTH).detail.startswith("nftables (")


@pytest.mark.parametrize("forwards,libvirt,reason", [
    (100, "iptables", "100 forwards: every new connection walks their iptables rules"),
    (0, "nftables", "libvirt uses its nftables backend"),
])
def test_doctor_recommends_nftables_where_it_helps(conf, forwards, libvirt, reason):
    from kvmufw_hook.commands.doctor import check_backend
    found = check_backend("iptables", forwards, libvirt, BOTH)
    assert found.level == "WARN" and reason in found.detail
    assert found.fix == f'firewall_backend = "nftables" in {conf}, then kvmufw_hook replay'


def test_doctor_recommends_nothing_for_few_forwards_or_a_build_without_nftables(conf):
    from kvmufw_hook.commands.doctor import check_backend
    assert check_backend("iptables", 99, "iptables", BOTH).level == "OK"
    assert check_backend("iptables", 5000, "nftables", ("iptables",)).level == "OK"
    assert check_backend("nftables", 5000, "nftables", BOTH).level == "OK"


def test_doctor_reports_a_wrong_configuration_and_checks_the_rest(conf, monkeypatch):
    from kvmufw_hook.commands import doctor
    conf.write_text('firewall_backend = "pf"\n')
    monkeypatch.setattr(doctor.backends, "get", lambda name="iptables", prefix=(): Broken())
    findings = doctor.run("test:///default")
    assert findings[0].level == "FAIL" and findings[0].check == "configuration"
    assert "line 1" in findings[0].detail
    assert findings[-1].check == "firewall"  # went on with the default backend


class Broken:
    def read(self, families=()):
        from kvmufw_hook.errors import ApplyError
        raise ApplyError("no firewall here")


def test_other_backends_are_every_registered_one_but_the_selected_in_the_same_place():
    selected = backends.get("iptables", ["ip", "netns", "exec", "x"])
    found = backends.others(selected)
    assert [name for name, _ in found] == [n for n in backends.names() if n != "iptables"]
    assert all(list(other.prefix) == ["ip", "netns", "exec", "x"] for _, other in found)


def test_a_stand_in_backend_has_no_others_to_clear():
    """A test's fake must never make a replay clear the real host's firewall."""
    class StandIn:
        name, prefix = "fake", ()
    assert backends.others(StandIn()) == []


def test_the_traces_a_hook_probes_are_the_backends_own_names():
    from kvmufw_hook.backends import TRACES, iptables, nft
    ours = {(table, chain) for table, _, chain in iptables.JUMPS}
    assert {(t, c) for _, t, c in TRACES["iptables"]} <= ours
    assert TRACES["nftables"] == ((1, nft.TABLE, ""),)
    assert set(TRACES) == set(backends.names())


def test_what_proves_a_backend_empty_is_every_chain_and_table_it_may_hold():
    from kvmufw_hook.backends import HOLDINGS, TRACES, iptables
    chains = {(table, chain) for table, _, chain in iptables.JUMPS}
    held = HOLDINGS["iptables"]
    assert {(f, t, c) for f in (2, 10) for t, c in chains} <= set(held)
    assert {(f, t, c) for f, t, c in held if not c} == {(2, "libvirt_network", ""),
                                                       (10, "libvirt_network", "")}
    assert HOLDINGS["nftables"] == TRACES["nftables"] and set(HOLDINGS) == set(TRACES)
