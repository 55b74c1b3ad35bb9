"""``doctor``'s findings about bridged frames meeting iptables (br_netfilter): whether it
is on, per family, and what that means for this host's guests.

With ``net.bridge.bridge-nf-call-iptables`` (``-ip6tables``) on, as Docker sets it, every
frame crossing a Linux bridge also goes through ip(6)tables' FORWARD. kvmufw_hook then
turns hairpin mode on for the bridge ports of guests with forwards (``hairpin.py``) and
accepts what merely crosses the bridge of a libvirt ``<forward mode='bridge'>`` network
(``plan.plan_bridged``). A guest plugged straight into a host bridge that no libvirt
network declares (``<interface type='bridge'>``) is not ours to open: doctor says so.
Docker's own nftables table, where Docker >= 29 keeps its rules, is checked here too: its
forward policy can drop our guests' traffic (``docker_nft_finding``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .. import state
from ..backends.base import AnyBackend
from ..errors import ApplyError, InputError
from ..model import Domain, Network
from .doctor import Finding

SYSCTL_NAMES = {4: "net.bridge.bridge-nf-call-iptables", 6: "net.bridge.bridge-nf-call-ip6tables"}
# Docker >= 29 with --firewall-backend=nftables: its table and its forward base chain
DOCKER_TABLE, DOCKER_FORWARD = "docker-bridges", "filter-FORWARD"


def bridge_findings(on: Sequence[int], networks: Iterable[Network],
                    domains: Iterable[Domain], hairpin_off: Sequence[str]) -> list[Finding]:
    """The findings from the facts: the families where br_netfilter is on, libvirt's
    active networks and running guests, and the guests' ports that need hairpin mode
    and do not have it."""
    if not on:
        return [Finding("OK", "br_netfilter", "off for IPv4 and IPv6: frames crossing a "
                        "bridge never meet iptables; guests reach their own forwards "
                        "through the host's addresses as it routes them")]
    which = " and ".join(f"IPv{f} ({SYSCTL_NAMES[f]} = 1)" for f in on)
    out = [Finding("OK", "br_netfilter", f"on for {which}, as Docker sets it: frames "
                   "crossing a bridge go through FORWARD too. kvmufw_hook turns hairpin mode "
                   "on for the bridge ports of guests with forwards (their own forwards "
                   "through the host's addresses) and accepts what merely crosses the bridge "
                   "of libvirt bridge networks; routed traffic stays the firewall's")]
    if hairpin_off:
        out.append(Finding("WARN", "hairpin mode", "off on " + ", ".join(hairpin_off)
                           + ": those guests cannot reach their own forwards through the "
                           "host's addresses (br_netfilter turned on after they started?)",
                           "kvmufw_hook replay"))
    declared = {n.bridge for n in networks if n.bridge and n.with_rules}
    loose: dict[str, set[str]] = {}
    for dom in domains:
        for nic in dom.nics:
            if nic.type == "bridge" and nic.bridge and nic.bridge not in declared:
                loose.setdefault(nic.bridge, set()).add(dom.name)
    for bridge, names in sorted(loose.items()):
        sysctls = " and ".join(f"{SYSCTL_NAMES[f]}=0" for f in on)
        out.append(Finding(
            "WARN", "bridged guests", f"{', '.join(sorted(names))} on host bridge {bridge} "
            "(<interface type='bridge'>): their frames go through FORWARD, where a DROP "
            "policy (UFW's) drops them; kvmufw_hook opens only bridges a libvirt network "
            "declares", f"define a libvirt network <forward mode='bridge'/><bridge "
            f"name='{bridge}'/> and attach the guests to it (<interface type='network'>), or, "
            f"if nothing on this host needs br_netfilter (Docker does), sysctl -w {sysctls}"))
    return out


def _hairpin_off(backend: AnyBackend) -> list[str]:
    """The ports our state says need hairpin mode now and lack it."""
    from ..backends.bridgeports import BridgePorts
    from ..hairpin import plan_host_hairpin
    from ..hostplan import plan_host
    domains = state.load_domains()
    wanted = plan_host_hairpin(domains, plan_host(state.load_networks(), domains).rules)
    ports = BridgePorts.beside(backend)
    on, found = ports.read(sorted({p.port for owned in wanted.values() for p in owned}))
    return sorted(p.port for owned in wanted.values() for p in owned
                  if not set(p.families).isdisjoint(on) and (now := found.get(p.port))
                  and now[1] == p.bridge and not now[2])


T = TypeVar("T")


def _parsed(raws: Iterable[bytes], parse: Callable[[bytes], T]) -> list[T]:
    """Each document that parses (the forwards check reports those that do not)."""
    out = []
    for raw in raws:
        try:
            out.append(parse(raw))
        except InputError:
            continue
    return out


def check_bridge_netfilter(uri: str, backend: AnyBackend) -> list[Finding]:
    from ..backends.bridgeports import BridgePorts
    from ..parse import parse_domain_xml, parse_network_xml
    try:
        on = BridgePorts.beside(backend).netfilter()
        hairpin_off = _hairpin_off(backend) if on else []
    except (OSError, ApplyError, InputError) as exc:
        return [Finding("WARN", "br_netfilter", f"not checked: {exc}")]
    networks: list[Network] = []
    domains: list[Domain] = []
    if on:
        from ..virt import live_xml
        try:
            nets, doms = live_xml(uri)
        except ApplyError:
            nets, doms = [], []  # the forwards check says libvirt cannot be asked
        networks, domains = _parsed(nets, parse_network_xml), _parsed(doms, parse_domain_xml)
    return bridge_findings(on, networks, domains, hairpin_off) + docker_nft_finding(
        docker_nft_policies(backend))


def docker_nft_finding(policies: dict[int, str]) -> list[Finding]:
    """Docker's nftables backend (Docker >= 29, ``--firewall-backend=nftables``): its own
    ``table ip docker-bridges`` (``ip6`` too) hooks forward with a base chain whose
    verdict maps jump only for Docker's bridges. Its policy is accept unless dockerd
    turned IP forwarding on itself: then drop, and a drop in another table's base chain
    drops our guests' forwarded traffic whatever iptables accepts (as libvirt's nftables
    reject does). ``policies``: family -> that chain's policy, for the tables present."""
    if not policies:
        return []
    dropping = sorted(f for f, policy in policies.items() if policy == "drop")
    if not dropping:
        return [Finding("OK", "Docker's nftables rules", "table docker-bridges, policy accept: "
                        "they judge only Docker's bridges")]
    families = " and ".join(f"IPv{f}" for f in dropping)
    return [Finding("FAIL", "Docker's nftables rules", f"{DOCKER_FORWARD} of table "
                    f"docker-bridges ({families}) has policy drop (dockerd turned IP "
                    "forwarding on itself): guests' forwarded traffic is dropped there, "
                    "whatever iptables accepts, and kvmufw_hook never writes into Docker's "
                    "tables", "turn IP forwarding on before dockerd starts (sysctl.d: "
                    "net.ipv4.ip_forward=1, net.ipv6.conf.all.forwarding=1) or start dockerd "
                    "with --ip-forward-no-drop, then restart dockerd")]


def docker_nft_policies(backend: AnyBackend) -> dict[int, str]:
    """family -> the policy of Docker's forward base chain, where its table exists (one
    netlink request per family on the host; ``nft`` only where the table is there)."""
    from ..backends.nftprobe import IPV4, IPV6, table_in_kernel
    from ..process import run
    prefix = list(backend.prefix)
    out = {}
    for family, nfproto, name in ((4, IPV4, "ip"), (6, IPV6, "ip6")):
        if not prefix and not table_in_kernel(nfproto, DOCKER_TABLE):
            continue
        try:
            text = run([*prefix, "nft", "list", "chain", name, DOCKER_TABLE, DOCKER_FORWARD],
                       name="nft")
        except ApplyError:
            continue  # no such table (or no nft): nothing of Docker's in nftables
        found = re.search(r"policy (\w+);", text)
        if found:
            out[family] = found.group(1)
    return out
