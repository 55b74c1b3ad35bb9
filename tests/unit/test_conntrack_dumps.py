"""Ending the conntrack flows of removed forwards, planned without a kernel: few IPv4
guests get a filtered dump each, the rest one dump per family. The flows themselves are
in tests/kernel/test_conntrack.py."""


import pytest

from kvmufw_hook import conntrack


@pytest.mark.unit
def test_few_ipv4_guests_get_a_filtered_dump_each_the_rest_one_per_family():
    v4 = [(4, 6, 22, 22, bytes([10, 0, 0, i]), None) for i in range(1, 3)]
    v6 = [(6, 6, 22, 22, bytes(15) + b"\x05", None)]
    assert conntrack._dumps(v4 + v6) == [(4, v4[0][4], v4[:1]), (4, v4[1][4], v4[1:]),
                                          (6, None, v6)]
    many = [(4, 6, 22, 22, bytes([10, 0, 0, i]), None)
            for i in range(1, conntrack.FILTERED_DUMPS + 2)]
    assert conntrack._dumps(many) == [(4, None, many)]
