"""Hosts where bridged frames go through iptables (br_netfilter), without a kernel: the
hairpin rules are planned only for a guest's own ports into its forwards' bridges, and
doctor says per family whether bridged frames meet iptables. The packets are in
tests/kernel/test_bridge_netfilter.py."""



from bridged import G5, G5_V4_ONLY, HOST_BRIDGE, LAB

from kvmufw_hook.parse import parse_domain_xml, parse_hookdata


def test_hairpin_is_planned_only_for_a_guests_own_ports_into_its_forwards_bridges():
    from kvmufw_hook.hairpin import HairpinPort, plan_hairpin
    from kvmufw_hook.hostplan import owner_rules
    dom = parse_domain_xml(G5.replace(b"</devices>", b"""<interface type='bridge'>
        <source bridge='br0'/><mac address='52:54:00:00:00:99'/><target dev='vnet9'/>
      </interface></devices>"""))
    lab, _ = parse_hookdata(LAB)
    rules = owner_rules(dom, {"lab": lab})
    assert plan_hairpin(dom, rules) == (HairpinPort("vp10005", "virbr1", (4, 6)),)
    assert plan_hairpin(dom, ()) == ()  # no forwards: no hairpin
    v4 = parse_domain_xml(G5_V4_ONLY)
    assert plan_hairpin(v4, owner_rules(v4, {"lab": lab})) == (
        HairpinPort("vp10005", "virbr1", (4,)),)


def test_doctor_says_per_family_whether_bridged_frames_meet_iptables_and_what_follows():
    from kvmufw_hook.commands.doctor_bridges import bridge_findings
    from kvmufw_hook.parse import parse_network_xml
    off = bridge_findings([], [], [], [])
    assert [(f.level, f.check) for f in off] == [("OK", "br_netfilter")]
    assert "off for IPv4 and IPv6" in off[0].detail
    vm = parse_domain_xml(b"""<domain><name>vm</name><devices><interface type='bridge'>
        <source bridge='br0'/><mac address='52:54:00:00:00:99'/><target dev='vnet9'/>
      </interface><interface type='bridge'><source bridge='br1'/>
      <mac address='52:54:00:00:00:98'/></interface></devices></domain>""")
    declared = parse_network_xml(HOST_BRIDGE.replace(b"br0", b"br1"))
    found = bridge_findings([4], [declared], [vm], ["vp10005"])
    assert [(f.level, f.check) for f in found] == [
        ("OK", "br_netfilter"), ("WARN", "hairpin mode"), ("WARN", "bridged guests")]
    assert "IPv4 (net.bridge.bridge-nf-call-iptables = 1)" in found[0].detail
    assert "IPv6" not in found[0].detail
    assert found[1].fix == "kvmufw_hook replay" and "vp10005" in found[1].detail
    # br1 is a libvirt bridge network's: ours to open; br0 is not, and is named
    assert "vm on host bridge br0" in found[2].detail and "br1" not in found[2].detail
    assert found[2].fix.endswith("sysctl -w net.bridge.bridge-nf-call-iptables=0")
