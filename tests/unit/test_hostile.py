"""Hostile and broken input: property-based tests over the parser, the planner's names and
the hook entry (the real shims, run in a network namespace this test creates)."""

import string

import pytest
from conftest import SAMPLES
from hostile_input import HOSTILE_NAMES, TAG, domain_with, forward_elements, xml_attr
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmufw_hook.backends.iptables import render_rule
from kvmufw_hook.backends.rules import netfilter_rules
from kvmufw_hook.errors import InputError
from kvmufw_hook.hostplan import owner_rules
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata, parse_network_xml
from kvmufw_hook.plan import check_conflicts

LAB = parse_network_xml((SAMPLES / "net-lab.xml").read_bytes())


@settings(max_examples=400, deadline=None)
@given(st.lists(forward_elements(), min_size=1, max_size=4))
def test_parser_and_planner_accept_or_refuse_in_one_line(elements):
    xml = domain_with("".join(elements))
    try:
        dom = parse_domain_xml(xml)
        check_conflicts("domain 'web1'", dom.forwards, [])
        rules = owner_rules(dom, {"lab": LAB})
    except InputError as exc:
        text = str(exc)
        assert "\n" not in text and text.startswith("domain 'web1': ")
        assert len(text) < 600
        return
    for rule in netfilter_rules(rules):  # whatever was accepted renders into valid, bounded text
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


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_make_safe_tags(name):
    dom = parse_domain_xml(domain_with('<kvmufw:forward host-port="2222" guest-port="22"/>',
                                       name=xml_attr(name)))
    rules = owner_rules(dom, {"lab": LAB})
    net = parse_network_xml((SAMPLES / "net-lab.xml").read_text().replace(
        "<name>lab</name>", f"<name>{xml_attr(name)}</name>"))
    for rule in netfilter_rules(rules + owner_rules(net)):
        comment = TAG.search(render_rule(rule)[1]).group(1)
        assert len(comment) <= 256 and set(comment) <= set(string.printable)
        owner = comment.split(",")[0]
        assert owner in (f"kvmufw:d={rule.owner[2:]}", f"kvmufw:n={rule.owner[2:]}")
        assert ",b=evil" not in owner and "\n" not in owner
