"""tests/debian13/early.py: a run stopped (the session's end, ^C, -x: ``stop_all``)
while its root is still being made ready begins no command afterwards: nothing is left
running behind the session. The root and its command stand in for the real ones here
(``ensure_root`` waits for the test; the command records that it began)."""

import os
import threading
import time

from debian13 import early


def test_a_run_stopped_while_its_root_is_made_ready_begins_nothing(monkeypatch, tmp_path):
    began = tmp_path / "began"
    entered, release = threading.Event(), threading.Event()

    def ensure_root():
        entered.set()
        release.wait(10)

    monkeypatch.setattr(early, "ensure_root", ensure_root)
    monkeypatch.setattr(early, "root_env", lambda: dict(os.environ))
    monkeypatch.setattr(early, "root_command", lambda argv: [
        "sh", "-c", f"echo $$ > {began}; exec sleep 30"])
    run = early.Run("stopped early", ["true"], timeout=30)
    run.start()
    try:
        assert entered.wait(10)
        run.stop()  # stop_all() at the session's end: the root not ready yet
        release.set()
        assert run._done.wait(10), "the run went on after stop()"
        time.sleep(0.2)
        assert not began.exists(), "a command began after the run was stopped"
    finally:
        release.set()
        run.stop()  # ours, by its process group, if it began
