"""The br_netfilter tests' XML: network ``lab`` (nat, dual-stack) with guest g5 and its
forward (also IPv4-only), and a host bridge network on br0."""

LAB = b"""<network><name>lab</name>
  <forward mode='nat' dev='eth0'/><bridge name='virbr1'/>
  <ip address='10.0.0.1' prefix='24'><dhcp>
    <host mac='52:54:00:00:00:05' ip='10.0.0.5'/><host mac='52:54:00:00:00:06' ip='10.0.0.6'/>
  </dhcp></ip>
  <ip family='ipv6' address='fd00:10::1' prefix='64'><dhcp>
    <host name='g5' ip='fd00:10::5'/>
  </dhcp></ip></network>"""
G5 = b"""<domain><name>g5</name><metadata><forwards xmlns="urn:kvmufw:1">
    <forward host-port="2222" guest-port="22"/>
  </forwards></metadata><devices><interface type='network'>
    <source network='lab' bridge='virbr1'/><mac address='52:54:00:00:00:05'/>
    <target dev='vp10005'/>
  </interface></devices></domain>"""
G5_V4_ONLY = G5.replace(b'guest-port="22"/>', b'guest-port="22" host-ip="203.0.113.1"/>')


HOST_BRIDGE = b"""<network><name>host-bridge</name><forward mode='bridge'/>
  <bridge name='br0'/></network>"""
