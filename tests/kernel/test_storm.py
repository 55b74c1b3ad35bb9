"""Hook storms in the normal suite: a few fixed seeds of ``tests/support/storm.py`` (real hooks,
real iptables in a namespace this test creates, SIGKILLs, 2-4 concurrent ops, ``ufw
reload`` with MANAGE_BUILTINS=yes, daemon restarts), then ``restore`` and ``replay``
checked against libvirt's truth, with each backend chosen in root's configuration. The
long soak is ``python3 tests/support/storm.py --seeds 1-50 --events 2000 [--backend
nftables]`` (README, testing)."""

import pytest
from conftest import need_root_tools
from storm import storm


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_hook_storm_leaves_every_running_owner_exactly_once_and_nothing_stopped(
        seed, backend, netns, tmp_path):
    if backend == "nftables":
        need_root_tools("nft")
    figures = storm(seed, 40, netns, tmp_path, log=lambda _line: None, backend=backend)
    assert figures.problems == [], "\n".join(figures.problems)
    # the storm was one: hooks were killed, and more ran than there were events (how many
    # depends on the timing: a seed that toggles networks often starts few guests)
    assert figures.killed > 0 and figures.hooks > 40
