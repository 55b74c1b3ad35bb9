"""tests/debian13/root.py: this machine's name is added to the root's /etc/hosts by every
ensure_root() (its fast path takes no lock), and the early runs (tests/debian13/early.py)
call ensure_root() from two threads of one process at the same moment: on a machine whose
name the root does not know yet (a fresh CI runner), both add it. Neither fails, and the
name is there once, and no temporary file is left."""

import socket
import threading

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
