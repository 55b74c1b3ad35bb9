"""``far_test``: whether a DNAT entry's host ports overlap none of a start's forwards,
asked of thousands of entries; it must answer as checking against every one of them."""

import random
from types import SimpleNamespace

from kvmufw_hook.backends.iptables import far_test
from kvmufw_hook.model import PortRange


def _spec(proto: str, first: int, last: int) -> SimpleNamespace:
    return SimpleNamespace(proto=proto, host_port=PortRange(first, last))


def _brute(near: list[SimpleNamespace], proto: str, first: int, last: int) -> bool:
    return not any(s.proto == proto and s.host_port.first <= last and first <= s.host_port.last
                   for s in near)


def test_far_test_answers_as_checking_against_every_forward():
    rng = random.Random(21)
    for _ in range(300):
        near = []
        for _ in range(rng.randrange(0, 6)):
            first = rng.randrange(1, 60)
            last = first if rng.random() < 0.7 else first + rng.randrange(0, 5)
            near.append(_spec(rng.choice(("tcp", "udp")), first, last))
        far = far_test(near)
        for _ in range(40):
            first = rng.randrange(1, 66)
            last = first if rng.random() < 0.6 else first + rng.randrange(0, 5)
            proto = rng.choice(("tcp", "udp", "sctp"))
            assert far(proto, first, last) == _brute(near, proto, first, last), (near, proto,
                                                                                  first, last)
