"""What an adversary who writes XML, or a careless admin, cannot make the policy do:
fences between networks that hold whatever order networks start in, addresses that belong
to another guest, failing closed when a forward is unavailable, ``forward add`` refused
before any write, and a configuration file others may write that grants nothing. ops run
on iptables in memory (tests/support/fakebackend.py); the same promises with real packets
are in tests/kernel/test_policy_kernel.py.
"""

from ipaddress import IPv4Address, ip_address

import pytest
from fakebackend import FakeBackend

from kvmufw_hook import host, ops, policy, state
from kvmufw_hook.errors import InputError
from kvmufw_hook.parse import parse_domain_xml, parse_network_xml

FORWARDS = '<kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">{}</kvmufw:forwards>'
WEB1_MAC, DB_MAC, EVIL_MAC = "52:54:00:00:00:20", "52:54:00:00:00:30", "52:54:00:00:00:66"


@pytest.fixture
def quiet_host(monkeypatch, state_env):
    """A host with one address and no services: what /proc would say is not the test."""
    facts = host.HostFacts(frozenset({IPv4Address("203.0.113.1")}), ())
    monkeypatch.setattr(host.HostFacts, "read", classmethod(lambda cls, prefix=(): facts))


OPEN = (b"<network><name>lab</name><forward mode='open'/><bridge name='virbr1'/>"
        b"<ip address='10.0.0.1' prefix='24'/>"
        b"<ip family='ipv6' address='fd00:10::1' prefix='64'/></network>")


def meta(*forwards: str) -> str:
    if not forwards:
        return ""
    body = "".join(f"<kvmufw:forward {f}/>" for f in forwards)
    return f"<metadata>{FORWARDS.format(body)}</metadata>"


def nat_net(*forwards: str, name: str = "lab", bridge: str = "virbr1",
            prefix: str = "10.0.0") -> bytes:
    """A nat network without ``<forward dev=...>`` (libvirt's ``default`` is one)."""
    return (f"<network><name>{name}</name>{meta(*forwards)}<forward mode='nat'/>"
            f"<bridge name='{bridge}'/><ip address='{prefix}.1' prefix='24'><dhcp>"
            f"<host mac='{WEB1_MAC}' name='web1' ip='{prefix}.20'/>"
            f"<host mac='{DB_MAC}' name='db' ip='{prefix}.30'/></dhcp></ip>"
            "</network>").encode()


def isolated_net(name: str = "iso", bridge: str = "virbr2") -> bytes:
    return (f"<network><name>{name}</name><bridge name='{bridge}'/>"
            "<ip address='10.0.2.1' prefix='24'/></network>").encode()


def dom_xml(name: str, mac: str, *forwards: str, network: str = "lab") -> bytes:
    return (f"<domain type='kvm'><name>{name}</name>{meta(*forwards)}"
            f"<devices><interface type='network'><mac address='{mac}'/>"
            f"<source network='{network}'/></interface></devices></domain>").encode()


def start_net(fake, raw: bytes, log=lambda _line: None) -> None:
    ops.network_started(parse_network_xml(raw), raw, backend=fake, log=log)


def start_dom(fake, raw: bytes) -> None:
    ops.domain_started(parse_domain_xml(raw), raw, backend=fake)


def fences(fake, owner: str, bridge: str) -> list[str]:
    """The RETURN lines of ``owner`` that send traffic bound for ``bridge`` back to
    libvirt's rules (``plan_network``'s fences between networks)."""
    return [line for line in fake.save().splitlines()
            if f"kvmufw:{owner}," in line and f"-o {bridge}" in line and "RETURN" in line]


# --------------------------------------------------------------------------- between networks

def test_a_network_started_after_a_nat_network_gets_its_fence(quiet_host):
    """The control for the next test: ``lab`` (nat, no dev) started first gets a fence
    for ``iso``'s bridge when ``iso`` starts."""
    fake = FakeBackend()
    start_net(fake, nat_net())
    start_net(fake, isolated_net())
    assert fences(fake, "n=lab", "virbr2")


def test_an_open_networks_accept_into_its_bridge_returns_what_other_bridges_send():
    """Plan level: an open network (libvirt adds no rule for it) beside an isolated and
    a nat network first returns what comes out of their bridges into its own to
    libvirt's rules, in both families, ahead of its accept from any interface."""
    from kvmufw_hook.plan import plan_network
    nets = {n.name: n for n in map(parse_network_xml, (
        OPEN, isolated_net(), nat_net(name="nat", bridge="virbr3", prefix="10.0.1")))}
    from kvmufw_hook.backends.rules import netfilter_rules
    from kvmufw_hook.intents import Egress
    intents = plan_network(nets["lab"], nets)
    egress = [i for i in intents if isinstance(i, Egress)]
    assert sorted(i.family for i in egress) == [4, 6]
    assert all(i.fence_inbound == ("virbr2", "virbr3") and i.dev is None for i in egress)
    rules = netfilter_rules(intents)  # as the iptables backend expands them
    inbound = [r for r in rules if r.stage == "forward" and r.oif == "virbr1"
               and r.iif != "virbr1"]
    for family in (4, 6):
        mine = [(r.iif, r.verdict) for r in inbound if r.family == family]
        assert mine == [("virbr2", "RETURN"), ("virbr3", "RETURN"), (None, "ACCEPT")], mine


def test_a_network_kept_for_availability_is_still_fenced_from_a_network_started_later(
        quiet_host):
    """``lab``'s metadata gains a forward whose host port a guest holds (a plain
    ``virsh net-update``/metadata edit: the ``updated`` event keeps lab's current rules,
    as it should). From then on every re-check of ``lab`` is refused as Unavailable, and
    ``_recheck`` keeps *all* of lab's rules, so the isolated network ``iso`` started
    next gets no RETURN fence in lab's accept out of virbr1 to anywhere: lab's guests
    reach iso's guests, which libvirt alone refuses."""
    fake = FakeBackend()
    start_net(fake, nat_net())
    start_dom(fake, dom_xml("web1", WEB1_MAC, 'host-port="8080" guest-port="80"'))
    said: list[str] = []
    updated = nat_net('host-port="8080" guest-port="80" guest-ip="10.0.0.30"')
    ops.network_port(parse_network_xml(updated), updated, None, False, backend=fake,
                     log=said.append)
    assert any("keeping the current rules" in line for line in said), said
    start_net(fake, isolated_net(), log=said.append)
    assert fences(fake, "n=lab", "virbr2"), said



def test_a_typo_in_roots_configuration_does_not_unfence_a_network(quiet_host, state_env):
    """The same with no guest involved: a typo in ``kvmufw_hook.conf`` makes every
    re-check of an owner with forwards a ``ConfigError``, which keeps its current rules:
    ``lab`` (with a forward of its own) gets no fence for ``iso`` started next."""
    fake = FakeBackend()
    start_net(fake, nat_net('host-port="8080" guest-port="80" guest-ip="10.0.0.30"'))
    with open(state_env["KVMUFW_CONFIG"], "w") as fh:
        fh.write("allow_host_servce = [ ]\n")  # the typo
    said: list[str] = []
    start_net(fake, isolated_net(), log=said.append)
    assert fences(fake, "n=lab", "virbr2"), said


def test_a_forward_refused_for_availability_keeps_the_rules_it_has(quiet_host, state_env):
    """With root's file wrong, lab's forward (applied before) keeps its DNAT while its
    bridge rules are re-planned with the fence for ``iso``: only what is refused for
    availability keeps its current rules, and those are kept whole."""
    fake = FakeBackend()
    start_net(fake, nat_net('host-port="8080" guest-port="80" guest-ip="10.0.0.30"'))
    with open(state_env["KVMUFW_CONFIG"], "w") as fh:
        fh.write("allow_host_servce = [ ]\n")
    start_net(fake, isolated_net())
    assert fences(fake, "n=lab", "virbr2")
    assert any("kvmufw:n=lab," in line and "DNAT" in line and "10.0.0.30" in line
               for line in fake.save().splitlines())


def test_restore_puts_a_networks_own_rules_back_after_a_flush(quiet_host):
    """The control: without the clash, restore puts lab's masquerade back."""
    fake = FakeBackend()
    start_net(fake, nat_net())
    start_dom(fake, dom_xml("web1", WEB1_MAC, 'host-port="8080" guest-port="80"'))
    ops.flush(fake)
    ops.restore(backend=fake)
    assert any("kvmufw:n=lab," in line and "MASQUERADE" in line
               for line in fake.save().splitlines())


def test_restore_puts_a_networks_own_rules_back_when_a_forward_of_it_is_unavailable(
        quiet_host):
    """lab's metadata gained a forward on a host port the guest web1 holds (kept, as
    above). A ``ufw reload`` with MANAGE_BUILTINS=yes takes every rule away (here:
    ``flush``), then UFW's after.init runs ``restore``: ``plan_host`` marks lab failed
    and leaves "its rules as they are", i.e. none: lab's guests lose their way out
    (masquerade, accepts) and their DHCP/DNS, for a port clash of one forward."""
    fake = FakeBackend()
    start_net(fake, nat_net())
    start_dom(fake, dom_xml("web1", WEB1_MAC, 'host-port="8080" guest-port="80"'))
    updated = nat_net('host-port="8080" guest-port="80" guest-ip="10.0.0.30"')
    ops.network_port(parse_network_xml(updated), updated, None, False, backend=fake)
    ops.flush(fake)
    done = ops.restore(backend=fake)
    assert any("kvmufw:n=lab," in line and "MASQUERADE" in line
               for line in fake.save().splitlines()), done.problems

# --------------------------------------------------------------------------- whose address

def v6_net() -> bytes:
    """A dual-stack nat network with a DHCPv6 range, as libvirt's docs show it."""
    return (b"<network><name>lab</name><forward mode='nat'/><bridge name='virbr1'/>"
            b"<ip address='10.0.0.1' prefix='24'><dhcp>"
            b"<range start='10.0.0.100' end='10.0.0.200'/></dhcp></ip>"
            b"<ip family='ipv6' address='fd00:10::1' prefix='64'><dhcp>"
            b"<range start='fd00:10::100' end='fd00:10::1ff'/></dhcp></ip>"
            b"</network>")


def test_a_domain_cannot_forward_to_another_guests_dhcpv6_lease(state_env):
    """libvirt's leaseshelper records a DHCPv6 lease with ``iaid``, ``client-id`` (the
    DUID, here a DUID-LLT holding db's MAC) and ``hostname``, and a ``mac-address``
    only when dnsmasq knows one. ``read_leases`` gives such a lease MAC None ("IPv6
    leases carry no MAC") and ``check_own_addresses`` skips every lease with MAC None:
    ``evil`` publishes db's DHCPv6 address fd00:10::1a7 on host port 2222, the IPv6
    half of the DHCP leases' attribution."""
    import json
    import os
    leases = [{"ip-address": "10.0.0.150", "mac-address": DB_MAC, "hostname": "db",
               "expiry-time": 4102444800},
              {"ip-address": "fd00:10::1a7", "iaid": "5517384", "hostname": "db",
               "client-id": "00:01:00:01:2c:8f:11:22:" + DB_MAC,
               "server-duid": "00:01:00:01:2c:8f:00:01:52:54:00:aa:bb:cc",
               "expiry-time": 4102444800}]
    with open(os.path.join(state_env["KVMUFW_DNSMASQ_DIR"], "virbr1.status"), "w") as fh:
        json.dump(leases, fh)
    net = parse_network_xml(v6_net())
    evil = parse_domain_xml(dom_xml("evil", EVIL_MAC, 'host-port="2222" guest-port="22" '
                                    'guest-ip="fd00:10::1a7"'))
    assert (ip_address("10.0.0.150"), DB_MAC) in host.network_leases(net)  # read at all
    with pytest.raises(InputError, match="another guest"):
        policy.resolve_domain(evil, {"lab": net}, lambda _n: [], host.network_leases)


# --------------------------------------------------------------------------- fail closed

WEB1_MAC2 = "52:54:00:00:00:21"


def lab_with(extra_hosts: str = "") -> bytes:
    return nat_net().replace(b"</dhcp>", extra_hosts.encode() + b"</dhcp>")


def two_nic_web1(*forwards: str) -> bytes:
    return (f"<domain type='kvm'><name>web1</name>{meta(*forwards)}<devices>"
            f"<interface type='network'><mac address='{WEB1_MAC}'/>"
            "<source network='lab'/></interface>"
            f"<interface type='network'><mac address='{WEB1_MAC2}'/>"
            "<source network='lab2'/></interface></devices></domain>").encode()


TO_50 = 'host-port="2222" guest-port="22" guest-ip="10.0.0.50"'
ON_LAB2 = f'host-port="2221" guest-port="22" mac="{WEB1_MAC2}" guest-ip="10.0.1.21"'
RESERVED_50 = f"<host mac='{DB_MAC}' name='db2' ip='10.0.0.50'/>"


def dnat_to_50(fake) -> list[str]:
    return [line for line in fake.save().splitlines()
            if "kvmufw:d=web1," in line and "10.0.0.50" in line]


def reserve_50_for_another_guest(fake, said: list[str]) -> None:
    """``virsh net-update lab add ip-dhcp-host`` of 10.0.0.50 for another MAC: libvirt
    runs the network ``updated`` hook with the new XML."""
    updated = lab_with(RESERVED_50)
    ops.network_port(parse_network_xml(updated), updated, None, False, backend=fake,
                     log=said.append)


def test_a_forward_to_an_address_reserved_later_for_another_guest_is_withdrawn(quiet_host):
    """The control: web1's forward to 10.0.0.50 (no reservation yet) goes as soon as
    10.0.0.50 is reserved for another MAC (the withdrawal holds on its own)."""
    fake = FakeBackend()
    start_net(fake, nat_net())
    start_net(fake, nat_net(name="lab2", bridge="virbr3", prefix="10.0.1"))
    start_dom(fake, two_nic_web1(ON_LAB2, TO_50))
    assert dnat_to_50(fake)
    said: list[str] = []
    reserve_50_for_another_guest(fake, said)
    assert not dnat_to_50(fake), said


def test_a_forward_on_a_stopped_network_does_not_shield_one_reaching_another_guest(
        quiet_host):
    """The same, after web1's second network ``lab2`` stopped: resolving forward #1
    (``mac=`` of the NIC on lab2) now raises Unavailable before forward #2 is looked at,
    ``_recheck`` reads that as "keep the current rules", and web1's DNAT to 10.0.0.50,
    now db2's reservation, stays: db2's port 22 is published on host port 2222."""
    fake = FakeBackend()
    start_net(fake, nat_net())
    lab2 = nat_net(name="lab2", bridge="virbr3", prefix="10.0.1")
    start_net(fake, lab2)
    start_dom(fake, two_nic_web1(ON_LAB2, TO_50))
    ops.network_stopped(parse_network_xml(lab2), backend=fake)
    assert dnat_to_50(fake)  # web1's forward on lab is not lab2's: it stays, rightly
    said: list[str] = []
    reserve_50_for_another_guest(fake, said)
    assert not dnat_to_50(fake), said


def test_a_reconnect_withdraws_a_forward_reaching_another_guest_beside_an_unavailable_one(
        quiet_host):
    """The same through qemu ``reconnect`` (libvirtd restarted while lab2 is down and
    10.0.0.50 has become db2's): ``domain_started(running=True)`` raises Unavailable for
    forward #1 and withdraws nothing."""
    fake = FakeBackend()
    start_net(fake, nat_net())
    lab2 = nat_net(name="lab2", bridge="virbr3", prefix="10.0.1")
    start_net(fake, lab2)
    start_dom(fake, two_nic_web1(ON_LAB2, TO_50))
    ops.network_stopped(parse_network_xml(lab2), backend=fake)
    state.save_network("lab", lab_with(RESERVED_50))
    raw = two_nic_web1(ON_LAB2, TO_50)
    try:
        ops.domain_started(parse_domain_xml(raw), raw, backend=fake, running=True)
    except InputError:
        pass  # refused (reconnect's hook exits 0 whatever happens): what matters is next
    assert not dnat_to_50(fake)


def test_restore_withdraws_a_forward_reaching_another_guest_beside_an_unavailable_one(
        quiet_host):
    """The same through ``restore`` (``replay`` shares ``plan_host``): the ``updated``
    hook saves lab's new XML first and is killed before its re-check (a hook storm),
    so the state says 10.0.0.50 is db2's. ``restore`` must withdraw web1's forward to
    it; ``plan_host`` marks web1 failed (forward #1: lab2 is down) and leaves all of
    web1's rules in the kernel."""
    fake = FakeBackend()
    start_net(fake, nat_net())
    lab2 = nat_net(name="lab2", bridge="virbr3", prefix="10.0.1")
    start_net(fake, lab2)
    start_dom(fake, two_nic_web1(ON_LAB2, TO_50))
    ops.network_stopped(parse_network_xml(lab2), backend=fake)
    state.save_network("lab", lab_with(RESERVED_50))  # the killed ``updated`` hook's write
    done = ops.restore(backend=fake)
    assert not dnat_to_50(fake), done.problems


def test_restore_withdraws_a_forward_reaching_another_guest(quiet_host):
    """The control: with web1's second network up, ``restore`` withdraws it."""
    fake = FakeBackend()
    start_net(fake, nat_net())
    start_net(fake, nat_net(name="lab2", bridge="virbr3", prefix="10.0.1"))
    start_dom(fake, two_nic_web1(ON_LAB2, TO_50))
    state.save_network("lab", lab_with(RESERVED_50))
    done = ops.restore(backend=fake)
    assert not dnat_to_50(fake), done.problems



# --------------------------------------------------------------------------- forward add

class _LibvirtError(Exception):
    pass


class _Net:
    """A libvirt network object as ``edit`` uses it: one XML, live and persistent."""

    def __init__(self, name: str, xml: bytes) -> None:
        self.xml, self._name = xml.decode(), name

    def name(self) -> str:
        return self._name

    def XMLDesc(self, _flags: int = 0) -> str:
        return self.xml

    def isActive(self) -> bool:
        return True


class _Conn:
    """libvirt as ``edit_network`` talks to it: active networks, no running guest;
    what it is asked to define is kept."""

    def __init__(self, nets: dict[str, bytes]) -> None:
        self.nets = {name: _Net(name, xml) for name, xml in nets.items()}
        self.defined: list[str] = []

    def listAllNetworks(self, _flags: int = 0):
        return list(self.nets.values())

    def listAllDomains(self, _flags: int = 0):
        return []

    def networkDefineXML(self, xml: str) -> None:
        self.defined.append(xml)

    def close(self) -> None:
        pass


def _libvirt_is(conn: _Conn, fake, monkeypatch) -> None:
    """``edit`` talks to ``conn`` as to libvirt, and the hooks it runs to ``fake``."""
    import types

    from kvmufw_hook.commands import forward as edit
    module = types.SimpleNamespace(VIR_NETWORK_XML_INACTIVE=1,
                                   VIR_CONNECT_LIST_NETWORKS_ACTIVE=1,
                                   VIR_CONNECT_LIST_DOMAINS_ACTIVE=1,
                                   libvirtError=_LibvirtError)
    monkeypatch.setattr(edit, "libvirt_module", lambda: module)
    monkeypatch.setattr(edit, "connect", lambda _uri, readonly=True: conn)
    monkeypatch.setattr(edit, "lookup", lambda c, _kind, name: c.nets[name])
    monkeypatch.setattr(ops, "default_backend", lambda: fake)


NARROW = (b"<network><name>narrow</name><forward mode='route'/><bridge name='virbr5'/>"
          b"<ip address='10.0.0.2' prefix='29'/></network>")


def test_a_refused_network_forward_add_changes_nothing(quiet_host, monkeypatch):
    """``forward add --network lab 2222:22 --guest-ip 10.0.0.5`` while the route network
    ``narrow`` (10.0.0.0/29) is active: the kernel routes 10.0.0.5 to narrow, and
    ``network_started`` refuses the forward (``_routed_elsewhere``). ``edit_network``
    runs the same checks first (``ops.network_arriving``): neither the persistent
    definition nor the override is written."""
    from kvmufw_hook.commands import forward as edit
    fake = FakeBackend()
    start_net(fake, nat_net())
    start_net(fake, NARROW)
    conn = _Conn({"lab": nat_net(), "narrow": NARROW})
    _libvirt_is(conn, fake, monkeypatch)
    with pytest.raises(InputError, match="narrow"):
        edit.edit_network("qemu:///system", "lab", "add",
                          {"host-port": "2222", "guest-port": "22", "guest-ip": "10.0.0.5"})
    assert conn.defined == [] and state.network_override("lab") is None

def test_a_network_forward_add_refused_by_the_apply_defines_nothing(quiet_host, monkeypatch):
    """Every check of ``edit`` passes but the hook's apply refuses (another owner took
    the port under the lock meanwhile): neither the definition nor the override stays."""
    from kvmufw_hook.commands import forward as edit
    from kvmufw_hook.errors import Unavailable
    fake = FakeBackend()
    start_net(fake, nat_net())
    conn = _Conn({"lab": nat_net()})
    _libvirt_is(conn, fake, monkeypatch)

    def refused(*_args, **_kwargs):
        raise Unavailable("network 'lab': host port already taken meanwhile")

    monkeypatch.setattr(ops, "network_started", refused)
    with pytest.raises(InputError, match="meanwhile"):
        edit.edit_network("qemu:///system", "lab", "add",
                          {"host-port": "2222", "guest-port": "22", "guest-ip": "10.0.0.5"})
    assert conn.defined == [] and state.network_override("lab") is None


# --------------------------------------------------------------------------- root's file

def test_a_configuration_file_others_may_write_grants_nothing(tmp_path):
    """``allow_host_service`` lives in root's file because guest-writable XML must never
    be enough; ``config.load`` trusts the file whatever its mode or
    owner, so a world- (or libvirt-group-) writable file is as good as the XML was.
    Refuse it in one line (as sshd's StrictModes does), or read it as no consent."""
    import os

    from kvmufw_hook import config
    from kvmufw_hook.errors import ConfigError
    path = tmp_path / "kvmufw_hook.conf"
    path.write_text('allow_host_service = [ "domain:evil:tcp:22" ]\n')
    os.chmod(path, 0o666)
    try:
        loaded = config.load(str(path))
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert not loaded.consents("d=evil", "tcp", 22)
