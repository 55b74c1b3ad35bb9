"""The guest start's two tricks in hook.py: the stand-in for ``inspect``
(``_defer_inspect``) answers what the dataclasses ask exactly as ``inspect`` would, and
anything else loads the real module; the dataclasses' methods compiled on first call
(``_lazy_dataclass_methods``) behave as those compiled at once. The start budget itself
(what a real start loads) is tests/kernel/test_hook.py's."""

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


PLAN = """
import sys
sys.path.insert(0, sys.argv[1])
from kvmufw_hook import hook
if sys.argv[2] == "tricks":
    hook._defer_inspect()
    hook._lazy_dataclass_methods()
import dataclasses
from pathlib import Path
from kvmufw_hook.hostplan import compose
from kvmufw_hook.parse import parse_domain_xml, parse_hookdata
from kvmufw_hook.errors import InputError
samples = Path(sys.argv[1], "tests", "fixtures", "samples")
net, _ = parse_hookdata((samples / "16-network.lab.started.xml").read_bytes())
dom = parse_domain_xml((samples / "04-qemu.web1.start.xml").read_bytes())
composed = [compose(net, {net.name: net}), compose(dom, {net.name: net})]
print(repr(net), repr(dom), repr(composed))
rules = [r for c in composed for r in c.rules]
copies = [dataclasses.replace(r) for r in rules]
print(rules == copies, [hash(r) == hash(c) for r, c in zip(rules, copies)] == [True] * len(rules),
      len(set(rules + copies)) == len(set(rules)), dom != dataclasses.replace(dom, name="x"))
try:
    dom.name = "x"
except dataclasses.FrozenInstanceError as exc:
    print("frozen", exc)
try:
    parse_domain_xml(b"<domain><name>d</name><metadata><forwards xmlns='urn:kvmufw:1'>"
                     b"<forward host-port='x'/></forwards></metadata></domain>")
except InputError as exc:
    print(exc)
for call in (lambda: dataclasses.replace(dom, nosuch=1), lambda: type(rules[0])()):
    try:
        call()
    except TypeError as exc:  # a bug's message names the class's method, as at once
        print("type error", exc)
print(sys.modules.get("inspect") is None or type(sys.modules["inspect"]).__name__)
"""


def test_lazily_compiled_dataclass_methods_behave_as_those_compiled_at_once():
    def run(mode: str) -> list[str]:
        return subprocess.run([sys.executable, "-IS", "-c", PLAN, str(ROOT), mode],
                              capture_output=True, text=True, check=True).stdout.splitlines()

    plain, tricks = run("plain"), run("tricks")
    assert tricks[:-1] == plain[:-1]  # reprs, equality, hashes, frozen, errors: the same
    assert "Forward(" in plain[0] and plain[1] == "True True True True", plain
    if sys.version_info < (3, 13):  # 3.13 compiles a class's methods at once: no stand-in
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from kvmufw_hook import hook; "
                "hook._defer_inspect(); hook._lazy_dataclass_methods(); "
                "from kvmufw_hook.model import PortRange; "
                "print(PortRange.__init__.__code__.co_varnames[:2])")
        out = subprocess.run([sys.executable, "-IS", "-c", code, str(ROOT)],
                             capture_output=True, text=True, check=True).stdout
        assert "args_" in out  # the stand-in really was in place
