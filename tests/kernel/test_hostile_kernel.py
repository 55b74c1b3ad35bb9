"""Hostile and broken input in the kernel: names the parser accepts are accepted by
iptables too, and the hook entry (the real shims, in a network namespace this test
creates) never crashes, never prints, never half-applies whatever the XML. The pure
property-based tests are in tests/unit/test_hostile.py."""


import pytest
from conftest import SAMPLES
from hookrun import run_hook
from hostile_input import HOSTILE_NAMES, TAG, domain_with, forward_elements, xml_attr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def test_hostile_names_are_accepted_by_the_kernel(netns, state_env):
    run_hook("network", ["lab", "started", "begin", "-"],
             (SAMPLES / "16-network.lab.started.xml").read_bytes(), state_env, netns)
    for i, name in enumerate(HOSTILE_NAMES):
        xml = domain_with(f'<kvmufw:forward host-port="{3000 + i}" guest-port="22"/>',
                          name=xml_attr(name))
        proc = run_hook("qemu", [name, "start", "begin", "-"], xml.encode(), state_env, netns)
        assert proc.returncode == 0, (name, proc.stderr)
    save = netns.save()
    assert len(set(TAG.findall(save))) == len(HOSTILE_NAMES) + 1  # + the network
    for name in HOSTILE_NAMES:
        proc = run_hook("qemu", [name, "stopped", "end", "-"], b"", state_env, netns)
        assert proc.returncode == 0
    assert {t.split(",")[0] for t in TAG.findall(netns.save())} == {"kvmufw:n=lab"}


VALIDATING = ["prepare", "start", "migrate"]
NEVER_FAIL = ["reconnect", "stopped", "release", "restore"]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(elements=st.lists(forward_elements(), min_size=1, max_size=3),
       op=st.sampled_from(VALIDATING + NEVER_FAIL),
       mangle=st.sampled_from(["none", "truncate", "namespace", "doctype", "huge-comment"]))
def test_hook_entry_never_crashes_never_prints_never_half_applies(
        hook_ns, elements, op, mangle):
    netns, env = hook_ns
    xml = domain_with("".join(elements))
    if mangle == "truncate":
        xml = xml[: len(xml) // 2]
    elif mangle == "namespace":
        xml = xml.replace("urn:kvmufw:1", "urn:kvmufw:2", 1)
    elif mangle == "doctype":
        xml = '<!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>' + xml
    elif mangle == "huge-comment":
        xml = xml.replace("<devices>", "<devices><!--" + "x" * 200000 + "-->")
    before = netns.save()
    proc = run_hook("qemu", ["web1", op, "begin", "-"], xml.encode(), env, netns)
    err = proc.stderr.decode()
    assert proc.stdout == b""
    assert "Traceback" not in err and "internal error" not in err, err
    if op in NEVER_FAIL:
        assert proc.returncode == 0, err
    else:
        assert proc.returncode in (0, 2), err
    if proc.returncode:
        assert err.count("\n") == 1
        assert netns.save() == before  # refused: nothing of it applied
    run_hook("qemu", ["web1", "stopped", "end", "-"], b"", env, netns)


@pytest.fixture(scope="module")
def hook_ns(tmp_path_factory):
    from conftest import need_root_tools
    need_root_tools("ip", "iptables-restore", "iptables-save")
    from netlab import Netns
    ns = Netns.create("fuzz")
    state = tmp_path_factory.mktemp("fuzzstate")
    (state / "libvirt-network").mkdir()
    env = {"KVMUFW_STATE_DIR": str(state / "state"),
           "KVMUFW_LIBVIRT_NETWORK_DIR": str(state / "libvirt-network")}
    try:
        run_hook("network", ["lab", "started", "begin", "-"],
                 (SAMPLES / "16-network.lab.started.xml").read_bytes(), env, ns)
        yield ns, env
    finally:
        ns.destroy()
