"""The host checks' test data: the host's and a neighbour's addresses in both families,
guest addresses, a forward built from its parts and the one line that refuses it."""

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from kvmufw_hook.errors import InputError
from kvmufw_hook.host import check_forwards
from kvmufw_hook.model import ForwardSpec, PortRange

V4 = IPv4Address("203.0.113.1")
V6 = IPv6Address("2001:db8:1::1")
OTHER_V6 = IPv6Address("2001:db8:1::2")
GUEST_V4 = IPv4Address("10.0.0.5")
GUEST_V6 = IPv6Address("2001:db8:ca2::5")


def forward(port=8443, proto="tcp", host_ip=None, guest_ips=(), sources=(), **kw):
    return ForwardSpec(proto, PortRange(port, port), PortRange(port, port),
                       guest_ips=tuple(ip_address(a) for a in guest_ips),
                       host_ip=None if host_ip is None else ip_address(host_ip),
                       sources=tuple(ip_network(s) for s in sources), **kw)


def refusal(facts, spec, held=(), families=None):
    """The one line refusing ``spec``, or None if it may be applied."""
    try:
        check_forwards("domain 'web7'", [spec], facts, held,
                       families=None if families is None else [families])
    except InputError as exc:
        text = str(exc)
        assert "\n" not in text
        return text
    return None
