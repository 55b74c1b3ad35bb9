"""tests/debian13/root.py: this machine's name is added to the root's /etc/hosts by every
ensure_root() (its fast path takes no lock), and the early runs (tests/debian13/early.py)
call ensure_root() from two threads of one process at the same moment: on a machine whose
name the root does not know yet (a fresh CI runner), both add it. Neither fails, and the
name is there once, and no temporary file is left."""

import socket
import threading
import time

from debian13 import root


def test_two_threads_adding_the_hostname_at_once_neither_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(root, "ROOT", tmp_path)
    (tmp_path / "etc").mkdir()
    hosts = tmp_path / "etc" / "hosts"
    name = socket.gethostname()
    failures: list[BaseException] = []

    def add(barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            root._hostname_in_hosts()
        except BaseException as exc:  # what the test counts
            failures.append(exc)

    for _attempt in range(300):
        hosts.write_text("127.0.0.1\tlocalhost\n")
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=add, args=(barrier,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        lines = [line for line in hosts.read_text().splitlines() if name in line.split()[1:]]
        assert len(lines) == 1
    assert not [p for p in (tmp_path / "etc").iterdir() if p.name != "hosts"]


def test_two_threads_of_a_ready_root_fetch_dockers_debs_once(monkeypatch, tmp_path):
    """A ready root whose Docker debs are missing (its /var/tmp cache emptied): the
    early runs' two threads both found them missing, and both fetched them into the
    same directory at the same time. One fetches; the other then finds them."""
    monkeypatch.setattr(root, "CACHE", tmp_path)
    monkeypatch.setattr(root, "ROOT", tmp_path / "root")
    monkeypatch.setattr(root, "STAMP", tmp_path / "root" / ".stamp")
    monkeypatch.setattr(root, "stamp_text", lambda: "ready")
    monkeypatch.setattr(root, "_hostname_in_hosts", lambda: None)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / ".stamp").write_text("ready")
    dockerd = tmp_path / "root/var/tmp/kvmufw-test-cache/docker/root/usr/sbin/dockerd"
    fetches: list[str] = []

    def step(title, _argv, _network, _log):
        fetches.append(title)
        time.sleep(0.2)  # the fetch takes a while
        dockerd.parent.mkdir(parents=True, exist_ok=True)
        dockerd.write_text("")

    monkeypatch.setattr(root, "_step", step)
    threads = [threading.Thread(target=root.ensure_root) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fetches) == 1
