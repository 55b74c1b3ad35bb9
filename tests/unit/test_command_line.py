"""The command line's shape: every documented command line reaches its command's handler
with the options it typed, a bad one is one line and exit status 2, every ``--help``
works, and a command loads its own module only."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from kvmufw_hook.cli import COMMANDS, build_parser, main


def parsed(line: str):
    return build_parser().parse_args(shlex.split(line)[1:])


def handler(line: str) -> str:
    func = parsed(line).func
    return f"{func.__module__.removeprefix('kvmufw_hook.commands.')}.{func.__name__}"


@pytest.mark.parametrize(("line", "expected"), [
    ("kvmufw_hook plan lab.xml web1.xml", "plan.command"),
    ("kvmufw_hook replay --dry-run", "replay.command"),
    ("kvmufw_hook restore", "restore.command"),
    ("kvmufw_hook restore --jumps-only --watch 30", "restore.command"),
    ("kvmufw_hook status --json", "status.command"),
    ("kvmufw_hook forward add web1 2222:22", "forward.add_command"),
    ("kvmufw_hook forward add --network lab 8080:80 --guest-ip 10.0.0.6",
     "forward.add_command"),
    ("kvmufw_hook forward add -c qemu:///session web1 8080:80/tcp", "forward.add_command"),
    ("kvmufw_hook forward remove web1 2222", "forward.remove_command"),
    ("kvmufw_hook forward remove --network lab 8080 --host-ip 192.0.2.1",
     "forward.remove_command"),
    ("kvmufw_hook forward list web1", "forward.list_command"),
    ("kvmufw_hook forward list --network lab --json", "forward.list_command"),
    ("kvmufw_hook doctor --json", "doctor.command"),
    ("kvmufw_hook flush", "flush.command"),
    ("kvmufw_hook install --packaged", "install.command"),
    ("kvmufw_hook install --source /src --prefix /usr/local", "install.command"),
    ("kvmufw_hook uninstall --root /mnt", "install.command"),
    ("kvmufw_hook ufw-entry add", "install.command"),
    ("kvmufw_hook ufw-entry remove --root /mnt", "install.command"),
])
def test_each_command_line_reaches_its_handler(line, expected):
    assert handler(line) == expected


def test_a_forward_line_carries_what_was_typed():
    args = parsed("kvmufw_hook forward add web1 6000-6002:5000-5002/udp "
                  "--source 198.51.100.0/24 --comment ssh --allow-host-service")
    assert (args.action, args.domain, args.spec, args.network) == (
        "add", "web1", "6000-6002:5000-5002/udp", None)
    assert (args.source, args.comment, args.allow_host_service) == (
        "198.51.100.0/24", "ssh", True)
    args = parsed("kvmufw_hook forward add --network lab 8080:80 --guest-mac 52:54:00:00:00:20")
    assert (args.domain, args.spec, args.network, args.guest_mac) == (
        None, "8080:80", "lab", "52:54:00:00:00:20")
    assert parsed("kvmufw_hook forward add web1 22").connect == "qemu:///system"


def test_options_and_positionals_go_in_any_order():
    for line in ("kvmufw_hook forward add web1 2222:22 --comment ssh",
                 "kvmufw_hook forward add web1 --comment ssh 2222:22",
                 "kvmufw_hook forward add --comment ssh web1 2222:22"):
        args = parsed(line)
        assert (args.domain, args.spec, args.comment) == ("web1", "2222:22", "ssh"), line


def test_every_readme_command_line_parses():
    text = (ROOT / "README.md").read_text()
    lines = [line for block in re.findall(r"```sh\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    commands = [words for words in (shlex.split(line, comments=True) for line in lines)
                if words[:1] == ["kvmufw_hook"] or words[:2] == ["sudo", "kvmufw_hook"]]
    assert len(commands) >= 10
    modules = {name: module for name, module, _help in COMMANDS}
    for words in commands:
        words = words[words.index("kvmufw_hook") + 1:]
        args = build_parser().parse_args(words)
        assert args.func.__module__ == f"kvmufw_hook.commands.{modules[words[0]]}", words


def test_only_changes_need_root():
    needs_root = {line: parsed(line).needs_root for line in (
        "kvmufw_hook plan a.xml", "kvmufw_hook forward list", "kvmufw_hook forward add w 22",
        "kvmufw_hook forward remove w 22", "kvmufw_hook status", "kvmufw_hook doctor",
        "kvmufw_hook restore", "kvmufw_hook install --packaged")}
    assert [line for line, root in needs_root.items() if not root] == [
        "kvmufw_hook plan a.xml", "kvmufw_hook forward list"]


@pytest.mark.parametrize(("argv", "says"), [
    (["nonsense"], "invalid choice: 'nonsense'"),
    (["forward"], "forward: the following arguments are required: ACTION"),
    (["forward", "move", "web1", "22"], "forward: argument ACTION: invalid choice: 'move'"),
    (["forward", "add", "web1", "2222:22", "extra"],
     "forward add: unrecognized arguments: extra (see kvmufw_hook forward add --help)"),
    (["forward", "remove", "web1", "80", "--source", "10.0.0.0/8"],
     "forward remove: unrecognized arguments: --source"),
    (["forward", "add", "web1"], "usage: kvmufw_hook forward add DOMAIN SPEC | --network"),
    (["forward", "add", "--network", "lab", "web1", "80"], "usage: kvmufw_hook forward add"),
    (["forward", "list", "web1", "--network", "lab"], "forward list [DOMAIN | --network NAME]"),
    (["forward", "add", "web1", "22abc"], "expected HOST_PORT[:GUEST_PORT][/PROTO]"),
    (["forward", "add", "--network", "lab", "8080:80"],
     "a network forward needs --guest-ip or --guest-mac"),
    (["status", "--bogus"], "status: unrecognized arguments: --bogus"),
    (["restore", "--watch", "soon"], "restore: argument --watch: invalid float value"),
    (["restore", "--watch", "3"], "--watch goes with --jumps-only"),
    (["plan"], "plan: the following arguments are required: XML"),
    (["ufw-entry", "toggle"], "ufw-entry: argument action: invalid choice: 'toggle'"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(argv, says, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("kvmufw_hook: ") and captured.err.count("\n") == 1
    assert says in captured.err, captured.err


@pytest.mark.parametrize("argv", [[], *([name] for name, _m, _h in COMMANDS),
                                  ["forward", "add"], ["forward", "remove"],
                                  ["forward", "list"]])
def test_every_help_says_what_the_command_does(argv, capsys):
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['kvmufw_hook', *argv])} ")
    assert "example" in out
    if not argv:
        for name, _module, what in COMMANDS:
            assert re.search(rf"^    {re.escape(name)} +{re.escape(what[:20])}", out, re.M)


def test_a_command_loads_its_own_module_only():
    script = ("import sys\nfrom kvmufw_hook.cli import build_parser\n"
              "build_parser().parse_args(sys.argv[1:])\n"
              "print(' '.join(sorted(m for m in sys.modules "
              "if m.startswith('kvmufw_hook.commands.'))))")
    for argv, loaded in ((["restore"], "kvmufw_hook.commands.restore"),
                         (["forward", "list"], "kvmufw_hook.commands.forward "
                                               "kvmufw_hook.commands.table"),
                         (["plan", "a.xml"], "kvmufw_hook.commands.plan")):
        proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT,
                              capture_output=True, text=True, check=False)
        assert proc.stdout.strip() == loaded, (argv, proc.stdout, proc.stderr)
