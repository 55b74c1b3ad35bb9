"""A forward reaches only what its owner owns, through the hook entry: the real shims in a
network namespace this test creates refuse a wildcard bridge and a forward to another
guest's reservation, a whitespace twin neither replaces nor outlives its namesake, and
error lines escape control characters. The pure side is tests/unit/test_security.py."""


from conftest import SAMPLES
from hostile_input import START, xml_text


def _start(name: str, port: int, netns, env):
    from hookrun import run_hook
    xml = START.replace("<name>web1</name>", f"<name>{xml_text(name)}</name>")
    head, rest = xml.split("<kvmufw:forwards", 1)
    xml = (head + '<kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">'
           f'<kvmufw:forward host-port="{port}" guest-port="22"/></kvmufw:forwards>'
           + rest.split("</kvmufw:forwards>", 1)[1])
    return run_hook("qemu", [name, "start", "begin", "-"], xml.encode(), env, netns)


def test_a_whitespace_twin_neither_replaces_nor_outlives_its_namesake(netns, state_env):
    from hookrun import kvmufw_lines, run_hook, sample
    assert run_hook(*sample("16-network.lab.started"), state_env, netns).returncode == 0
    assert _start("victim", 2222, netns, state_env).returncode == 0
    victims = kvmufw_lines(netns)
    # the same port: refused as a conflict, not a replacement of victim's rules
    proc = _start("victim ", 2222, netns, state_env)
    assert proc.returncode == 2 and b"already forwarded by domain 'victim'" in proc.stderr
    assert kvmufw_lines(netns) == victims
    # another port: both run; stopping the twin (by its argv name) removes exactly its own
    assert _start("victim ", 3333, netns, state_env).returncode == 0
    assert any("d=victim~20," in line for line in kvmufw_lines(netns))
    for op in ("stopped", "release"):
        proc = run_hook("qemu", ["victim ", op, "end", "-"], b"", state_env, netns)
        assert proc.returncode == 0, proc.stderr
    assert kvmufw_lines(netns) == victims


def test_network_hook_refuses_a_wildcard_bridge(netns, state_env):
    from hookrun import kvmufw_lines, run_hook
    xml = (SAMPLES / "16-network.lab.started.xml").read_bytes().replace(
        b"name='virbr1'", b"name='vir+'")
    for op in ("start", "started"):
        proc = run_hook("network", ["lab", op, "begin", "-"], xml, state_env, netns)
        assert proc.returncode == 2 and b"iptables reads '+' as a wildcard" in proc.stderr
    assert kvmufw_lines(netns) == []


def test_the_hook_refuses_a_forward_to_another_guests_reservation(netns, state_env):
    from hookrun import kvmufw_lines, run_hook
    started = (SAMPLES / "16-network.lab.started.xml").read_text()
    xml = started.replace("</dhcp>", "<host mac='52:54:00:00:00:77' name='db2' "
                                     "ip='10.0.0.7'/></dhcp>").encode()
    assert run_hook("network", ["lab", "started", "begin", "-"], xml, state_env,
                    netns).returncode == 0
    before = kvmufw_lines(netns)
    head, rest = START.split("<kvmufw:forwards", 1)
    dom = (head + '<kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1"><kvmufw:forward '
           'host-port="3306" guest-ip="10.0.0.7"/></kvmufw:forwards>'
           + rest.split("</kvmufw:forwards>", 1)[1])
    proc = run_hook("qemu", ["web1", "start", "begin", "-"], dom.encode(), state_env, netns)
    assert proc.returncode == 2
    assert b"guest-ip 10.0.0.7 is reserved for another guest" in proc.stderr
    assert kvmufw_lines(netns) == before


def test_the_hook_refuses_a_forward_to_another_guests_static_address(netns, state_env):
    """The real shims, as libvirt runs them on a host: ``victim``'s port on lab has MAC
    :31 (port-created), and the host's neighbour table (read by the hook itself, one
    netlink dump) has the static 10.0.0.31 and the stable-privacy fd00:10::31 at that
    MAC. ``evil``'s forward to either is refused in one line saying whose it is; the
    victim's own forward to the same addresses is applied."""
    from hookrun import (
        dnat_owners,
        domain_xml,
        hook_ok,
        lab_network,
        port_created,
        run_hook,
        started_lab,
    )
    mac = "52:54:00:00:00:31"
    netns.run("ip", "link", "add", "virbr1", "type", "bridge")
    netns.run("ip", "addr", "add", "10.0.0.1/24", "dev", "virbr1")
    netns.run("ip", "addr", "add", "fd00:10::1/64", "dev", "virbr1", "nodad")
    netns.run("ip", "link", "set", "virbr1", "up")
    started_lab(netns, state_env)
    hook_ok(netns, state_env, "network", ["lab", "port-created", "begin", "-"],
            port_created(lab_network(), "victim", mac))
    for address, port in (("10.0.0.31", 2231), ("fd00:10::31", 2232)):
        netns.run("ip", "neigh", "replace", address, "lladdr", mac, "dev", "virbr1",
                  "nud", "stale")
        evil = domain_xml("evil", "52:54:00:00:00:66",
                          f'host-port="{port}" guest-port="22" guest-ip="{address}"')
        proc = run_hook("qemu", ["evil", "start", "begin", "-"], evil, state_env, netns)
        assert proc.returncode == 2, proc.stderr
        assert (f"domain 'evil': forward tcp {port}->22: guest {address} on network 'lab' "
                "is another guest's (the host's neighbour table has it at MAC "
                f"{mac}, the MAC of domain 'victim''s port)").encode() in proc.stderr
        family = 6 if ":" in address else 4
        assert "d=evil" not in netns.save(family)
    own = domain_xml("victim", mac, 'host-port="2231" guest-port="22" '
                                    'guest-ip="10.0.0.31,fd00:10::31"')
    hook_ok(netns, state_env, "qemu", ["victim", "start", "begin", "-"], own)
    assert dnat_owners(netns, 2231) == {"d=victim"}
    assert "d=victim" in netns.save(6)


def test_hook_error_lines_escape_control_characters(netns, state_env):
    from hookrun import run_hook
    name = "evil\x1b[2J\x9b1A"
    xml = START.replace("<name>web1</name>", f"<name>{name}</name>").replace(
        'host-port="2222"', 'host-port="22abc"')
    proc = run_hook("qemu", [name, "start", "begin", "-"], xml.encode(), state_env, netns)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "\x1b" not in err and "\x9b" not in err and err.count("\n") == 1
    assert err.startswith("kvmufw_hook: qemu start evil\\x1b[2J\\x9b1A: domain ")
