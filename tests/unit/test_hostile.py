"""Hostile and broken input: property-based tests over the parser, the planner's names and
the hook entry (the real shims, run in a network namespace this test creates)."""

import re
import string

import pytest
from conftest import SAMPLES
from hookrun import run_hook
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmufw_hook.backends.iptables import render_rule
from kvmufw_hook.errors import InputError
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata, parse_network_xml
from kvmufw_hook.plan import check_conflicts, plan_domain_owner, plan_network_owner

LAB = parse_network_xml((SAMPLES / "net-lab.xml").read_bytes())
START = (SAMPLES / "04-qemu.web1.start.xml").read_text()
TAG = re.compile(r'--comment "(kvmufw:[A-Za-z0-9._~=,/:-]+)"')

ports = st.one_of(
    st.integers(-5, 70000).map(str),
    st.tuples(st.integers(0, 66000), st.integers(0, 66000)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.sampled_from(["22abc", "", " 22", "22 ", "0x16", "1e3", "२२", "22-", "-22", "1--2"]),
)
addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
    st.sampled_from(["10.0.0.300", "10.0.0", "::ffff:10.0.0.5", "10.0.0.5/24", "", "localhost"]),
)
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
attr_values = st.one_of(ports, addresses, texts)


def xml_attr(value: str) -> str:
    """An attribute value as XML text, every character kept (newlines included)."""
    out = []
    for ch in value:
        code = ord(ch)
        if ch in "<&\"" or code < 0x20 or 0xFFFE <= code <= 0xFFFF:
            out.append(f"&#{code};")
        else:
            out.append(ch)
    text = "".join(out)
    return text if all(_xml_char(ord(c)) for c in value) else "x"


def _xml_char(code: int) -> bool:
    return code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD \
        or 0x10000 <= code <= 0x10FFFF


@st.composite
def forward_elements(draw):
    names = ["proto", "host-port", "guest-port", "guest-ip", "mac", "host-ip", "source",
             "comment", "colour", "kvmufw:host-port"]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
    attrs = []
    for name in chosen:
        if name == "proto":
            value = draw(st.sampled_from(["tcp", "udp", "sctp", "TCP", "icmp", "", "tcp "]))
        elif name == "mac":
            value = draw(st.sampled_from(["52:54:00:00:00:20", "52-54-00-00-00-20", "zz"]))
        elif name == "source":
            value = ",".join(draw(st.lists(addresses, min_size=0, max_size=3)))
        else:
            value = draw(attr_values)
        attrs.append(f'{name}="{xml_attr(value)}"')
    prefix = draw(st.sampled_from(["", "kvmufw:"]))
    return f"<{prefix}forward {' '.join(attrs)}/>"


def domain_with(forwards: str, name: str = "web1") -> str:
    head, rest = START.split("<kvmufw:forwards", 1)
    tail = rest.split("</kvmufw:forwards>", 1)[1]
    xml = (head + f'<kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">{forwards}</kvmufw:forwards>'
           + tail)
    return xml.replace("<name>web1</name>", f"<name>{name}</name>")


@settings(max_examples=400, deadline=None)
@given(st.lists(forward_elements(), min_size=1, max_size=4))
def test_parser_and_planner_accept_or_refuse_in_one_line(elements):
    xml = domain_with("".join(elements))
    try:
        dom = parse_domain_xml(xml)
        check_conflicts("domain 'web1'", dom.forwards, [])
        rules = plan_domain_owner(dom, {"lab": LAB})
    except InputError as exc:
        text = str(exc)
        assert "\n" not in text and text.startswith("domain 'web1': ")
        assert len(text) < 600
        return
    for rule in rules:  # whatever was accepted renders into valid, bounded rule text
        line = render_rule(rule)[1]
        assert "\n" not in line and TAG.search(line) and len(TAG.search(line).group(1)) <= 256


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_arbitrary_bytes_never_crash_the_parser(data):
    for parse in (parse_domain_xml, parse_network_xml, parse_hookdata):
        try:
            parse(data)
        except InputError as exc:
            assert "\n" not in str(exc)


HOSTILE_NAMES = ['we"b1', "we'b1", "web\n1", "wéb☃", "a" * 300, "x y", "$(reboot)", "-j ACCEPT",
                 "web1,b=evil", "kvmufw:n=lab"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_make_safe_tags(name):
    dom = parse_domain_xml(domain_with('<kvmufw:forward host-port="2222" guest-port="22"/>',
                                       name=xml_attr(name)))
    rules = plan_domain_owner(dom, {"lab": LAB})
    net = parse_network_xml((SAMPLES / "net-lab.xml").read_text().replace(
        "<name>lab</name>", f"<name>{xml_attr(name)}</name>"))
    for rule in rules + plan_network_owner(net):
        comment = TAG.search(render_rule(rule)[1]).group(1)
        assert len(comment) <= 256 and set(comment) <= set(string.printable)
        owner = comment.split(",")[0]
        assert owner in (f"kvmufw:d={rule.owner[2:]}", f"kvmufw:n={rule.owner[2:]}")
        assert ",b=evil" not in owner and "\n" not in owner


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
