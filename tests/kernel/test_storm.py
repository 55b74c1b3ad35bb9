"""Hook storms in the normal suite: a few fixed seeds of ``tests/support/storm.py`` (real hooks,
real iptables in a namespace this test creates, SIGKILLs, 2-4 concurrent ops, ``ufw
reload`` with MANAGE_BUILTINS=yes, daemon restarts), then ``restore`` and ``replay``
checked against libvirt's truth. The long soak is ``python3 tests/support/storm.py --seeds 1-50
--events 2000`` (README, testing)."""

import pytest
from storm import storm


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_hook_storm_leaves_every_running_owner_exactly_once_and_nothing_stopped(
        seed, netns, tmp_path):
    figures = storm(seed, 40, netns, tmp_path, log=lambda _line: None)
    assert figures.problems == [], "\n".join(figures.problems)
    assert figures.killed > 0 and figures.hooks > 80  # the storm was one
