"""Scale and speed by construction: what keeps hooks, status and replay fast, checked
for behaviour (timings belong to benchmarks/run.py; these machines are too noisy)."""

import os
import re
import sys
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmufw_hook import policy
from kvmufw_hook.backends.iptables import (
    Snapshot,
    comment,
)
from kvmufw_hook.errors import InputError
from kvmufw_hook.model import ForwardSpec, PortRange
from kvmufw_hook.plan import check_conflicts
from kvmufw_hook.process import communicate

# --------------------------------------------------------------------------- process

def test_communicate_feeds_and_drains_large_streams_without_deadlock():
    data = os.urandom(3 * 1024 * 1024)  # far beyond a pipe's buffer, both ways
    status_, out, err = communicate(["cat"], data)
    assert (status_, out, err) == (0, data, b"")
    status_, out, err = communicate(["sh", "-c", "cat >&2; echo done; exit 3"], data)
    assert (status_, out, err) == (3, b"done\n", data)


def test_communicate_never_hands_over_the_callers_stdin():
    status_, out, _err = communicate(["cat"])  # /dev/null: returns at once
    assert (status_, out) == (0, b"")


def test_communicate_when_the_command_stops_reading_missing_or_slow():
    status_, _out, _err = communicate(["true"], b"x" * (1 << 20))  # EPIPE is not an error
    assert status_ == 0
    with pytest.raises(FileNotFoundError):
        communicate(["kvmufw-no-such-command"])
    with pytest.raises(TimeoutError):
        communicate([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert communicate(["sh", "-c", "kill -9 $$"])[0] == -9


# --------------------------------------------------------------------------- comments

OLD_COMMENT = re.compile(r'--comment (?:"((?:[^"\\]|\\.)*)"|(\S+))')


def old_comment(line: str):
    match = OLD_COMMENT.search(line)
    if not match:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


@given(st.lists(st.sampled_from(['"', "\\", " ", "a", "--comment ", "kvmufw:d=x,", ","]),
                max_size=14))
def test_comment_reads_tags_as_the_regular_expression_did(parts):
    line = "-A KVMUFW-FORWARD " + "".join(parts)
    ours = [c if c and c.startswith("kvmufw:") else None
            for c in (comment(line), old_comment(line))]
    assert ours[0] == ours[1]


# --------------------------------------------------------------------------- conflicts

ports = st.integers(1, 60).flatmap(lambda a: st.tuples(st.just(a), st.integers(a, a + 8)))
forward = st.builds(lambda p, proto, ip: ForwardSpec(proto, PortRange(*p), PortRange(*p),
                                                     host_ip=ip),
                    ports, st.sampled_from(["tcp", "udp"]),
                    st.sampled_from([None, None, IPv4Address("192.0.2.1"),
                                     IPv4Address("192.0.2.2")]))


@settings(max_examples=300, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(forward, max_size=4), max_size=8))
def test_claims_index_answers_as_checking_against_everything(owners):
    """plan_host checks each owner against the claims near its ports only: the same
    owners fail, with the same messages, as against every claim."""
    claimed_all, index = [], policy._Claimed()
    for n, forwards in enumerate(owners):
        label = f"domain 'g{n}'"
        answers = []
        for others in (claimed_all, index.near(forwards)):
            try:
                check_conflicts(label, forwards, others)
                answers.append(None)
            except InputError as exc:
                answers.append(str(exc))
        assert answers[0] == answers[1]
        if answers[0] is None:
            claimed_all.append((label, forwards))
            index.add(label, forwards)


def test_a_snapshot_builds_its_set_of_our_lines_once():
    text = "*nat\n:KVMUFW-OUTPUT - [0:0]\n-A KVMUFW-OUTPUT -j ACCEPT\nCOMMIT\n"
    snap = Snapshot.parse(text)
    assert snap.our_lines() is snap.our_lines()
    assert snap.our_lines() == {"-A KVMUFW-OUTPUT -j ACCEPT"}
