"""Ending the conntrack flows of removed forwards (``conntrack.py``), in a network
namespace of the test's own: loopback UDP flows stand for DNAT'd ones (their replies
come from the address a forward would translate to, as a guest's do)."""

import json
import sys
from pathlib import Path

from kvmufw_hook import conntrack

ROOT = Path(__file__).resolve().parents[2]
# In the namespace: track new flows, send one UDP packet to each address on port 7000,
# end the flows of the guests given, print (deleted, addresses whose flow is left).
SCRIPT = """
import json, socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import conntrack
guests, ended = json.loads(sys.argv[2]), json.loads(sys.argv[3])
for tool in ("iptables", "ip6tables"):
    subprocess.run([tool, "-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW"], check=True)
for address in guests:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    socket.socket(family, socket.SOCK_DGRAM).sendto(b"x", (address, 7000))
def raw(address):
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
flows = [(6 if ":" in a else 4, 17, 7000, 7000, raw(a), None) for a in ended]
deleted = conntrack.end_flows(flows)
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 12)
left = [a for a in guests if conntrack._dump(sock, 9, 6 if ":" in a else 4,
                                             [(6 if ":" in a else 4, 17, 7000, 7000,
                                               raw(a), None)])]
print(json.dumps([deleted, left]))
"""


def _end(netns, guests: list[str], ended: list[str]) -> tuple[int, list[str]]:
    for address in guests:
        if ":" in address:
            netns.run("ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
    out = netns.run(sys.executable, "-c", SCRIPT, str(ROOT), json.dumps(guests),
                    json.dumps(ended)).stdout
    deleted, left = json.loads(out)
    return deleted, left


def test_a_stop_ends_its_guests_flows_and_no_other(netns):
    """One guest's flows, found by a dump the kernel filters to that guest."""
    guests = ["127.0.0.5", "127.0.0.6", "127.0.1.5"]
    assert _end(netns, guests, ["127.0.0.5"]) == (1, ["127.0.0.6", "127.0.1.5"])


def test_many_guests_flows_are_ended_from_one_whole_dump(netns):
    """More guests than filtered dumps pay for (a flush, a replay): one dump, same answer."""
    guests = [f"127.0.0.{i}" for i in range(2, 2 + conntrack.FILTERED_DUMPS + 3)]
    ended = guests[:-1]
    assert _end(netns, guests, ended) == (len(ended), guests[-1:])


def test_ipv6_flows_are_ended_for_their_guest_only(netns):
    """The kernel's IPv6 address filter answers the other way round: IPv6 flows are
    matched from a whole dump, the guest's ended and its neighbour's kept."""
    guests = ["fd00::5", "fd00::6", "127.0.0.5"]
    assert _end(netns, guests, ["fd00::5", "127.0.0.5"]) == (2, ["fd00::6"])
