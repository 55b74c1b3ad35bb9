"""Two forwards to one guest port render each rule once (the crash-safety tests with
real iptables are in tests/kernel/test_crash_safety.py)."""

from __future__ import annotations

from lifecycle import LAB, WEB1

from kvmufw_hook.backends.iptables import IptablesBackend
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata
from kvmufw_hook.plan import plan_forwards, resolve_domain_forwards

# ---------------------------------------------------------------------- identical rules

def test_two_forwards_to_one_guest_port_render_each_rule_once():
    net, _ = parse_hookdata(LAB)
    dom = parse_domain_xml(WEB1.replace(
        b'<kvmufw:forward proto="tcp" host-port="2222" guest-port="22"/>',
        b'<kvmufw:forward proto="tcp" host-port="2222" guest-port="22"/>'
        b'<kvmufw:forward proto="tcp" host-port="2223" guest-port="22"/>'))
    rules = plan_forwards("d=web1", resolve_domain_forwards(dom, {"lab": net}))
    assert len(rules) == len(set(rules))
    text = IptablesBackend.render({"d=web1": rules})
    body = [line for line in text.splitlines() if line.startswith("-A KVMUFW")]
    assert len(body) == len(set(body))
    assert sum("--dport 2223" in line for line in body) == 2  # its own DNATs stay
