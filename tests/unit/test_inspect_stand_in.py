"""The hook's stand-in for ``inspect`` (``hook._defer_inspect``): while a guest's start
loads the model's dataclasses it answers what they ask exactly as ``inspect`` would, and
anything else loads the real module. The start budget itself (no ``inspect`` loaded by a
real start) is tests/kernel/test_hook.py's."""

import json
import subprocess
import sys

from conftest import ROOT

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import hook
hook._defer_inspect()
stand_in = sys.modules["inspect"]
import dataclasses, json
import kvmufw_hook.ops, kvmufw_hook.backends.nft, kvmufw_hook.backends.iptables
loaded_while_planning = sys.modules.get("inspect") is not stand_in
classes = {f"{c.__module__}.{c.__qualname__}": c for m in list(sys.modules.values())
           if getattr(m, "__name__", "").startswith("kvmufw_hook")
           for c in vars(m).values() if isinstance(c, type) and dataclasses.is_dataclass(c)}
answers = {name: stand_in.get_annotations(c) for name, c in classes.items()}
still_deferred = sys.modules.get("inspect") is stand_in
signature = str(stand_in.signature(lambda a, b=1: None))  # anything else: the real one
import inspect
print(json.dumps({
    "loaded_while_planning": loaded_while_planning, "still_deferred": still_deferred,
    "classes": len(classes), "signature": signature, "real_now": inspect is not stand_in,
    "same": all(answers[n] == inspect.get_annotations(c) for n, c in classes.items())}))
"""


def test_the_inspect_stand_in_answers_as_inspect_while_the_dataclasses_load():
    out = subprocess.run([sys.executable, "-IS", "-c", PROBE, str(ROOT)], capture_output=True,
                         text=True, check=True).stdout
    seen = json.loads(out)
    assert not seen["loaded_while_planning"]  # the start path's dataclasses needed nothing
    assert seen["still_deferred"] and seen["classes"] >= 20, seen
    assert seen["same"]
    assert seen["signature"] == "(a, b=1)" and seen["real_now"]
