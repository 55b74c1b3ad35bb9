"""Dual-stack network and domain XML of the IPv6 tests: web1 and db reserved in both
families, a wider routed network over lab's subnet."""

FORWARDS = '<kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">{}</kvmufw:forwards>'
WEB1_MAC, DB_MAC, EVIL_MAC = "52:54:00:00:00:20", "52:54:00:00:00:30", "52:54:00:00:00:66"


def net_xml(*forwards: str, v6hosts: str = "", v4hosts: str = "", name: str = "lab",
            bridge: str = "virbr1", v6: str = "fd00:10::1", nat: str = "",
            web1_v6: bool = True) -> bytes:
    """A dual-stack nat network: web1 and db reserved in both families (IPv4 by MAC,
    IPv6 by name, as libvirt matches them)."""
    meta = (f"<metadata>{FORWARDS.format(''.join(f'<kvmufw:forward {f}/>' for f in forwards))}"
            "</metadata>") if forwards else ""
    return (f"<network><name>{name}</name>{meta}<forward mode='nat'>{nat}</forward>"
            f"<bridge name='{bridge}'/>"
            "<ip address='10.0.0.1' prefix='24'><dhcp>"
            f"<host mac='{WEB1_MAC}' name='web1' ip='10.0.0.20'/>"
            f"<host mac='{DB_MAC}' name='db' ip='10.0.0.30'/>{v4hosts}</dhcp></ip>"
            f"<ip family='ipv6' address='{v6}' prefix='64'><dhcp>"
            + ("<host name='web1' ip='fd00:10::20'/>" if web1_v6 else "")
            + "<host name='db' ip='fd00:10::30'/>"
            f"{v6hosts}</dhcp></ip></network>").encode()


def dom_xml(name: str, mac: str, *forwards: str, network: str = "lab") -> bytes:
    body = "".join(f"<kvmufw:forward {f}/>" for f in forwards)
    return (f"<domain type='qemu'><name>{name}</name><metadata>{FORWARDS.format(body)}"
            f"</metadata><devices><interface type='network'><mac address='{mac}'/>"
            f"<source network='{network}'/></interface></devices></domain>").encode()


# --------------------------------------------------------------------------- a wider subnet

WIDE = (b"<network><name>wide</name><forward mode='route'/><bridge name='virbr9'/>"
        b"<ip family='ipv6' address='fd00::1' prefix='8'/></network>")


def wide_with_forward() -> bytes:
    return WIDE.replace(b"<bridge", b"<metadata>" + FORWARDS.format(
        '<kvmufw:forward host-port="2222" guest-port="22" guest-ip="fd00:10::20"/>'
    ).encode() + b"</metadata><bridge")
