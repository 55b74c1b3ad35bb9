"""Every command the README shows (its ```sh blocks) is run by a test: each is mapped to
the test that runs it, and that test's own source holds the command's words (its
subcommands and options). A command added to the README without a test fails here."""

from __future__ import annotations

import ast
import re
import shlex

from conftest import ROOT

# the start of a README command -> the test (tests/FILE::FUNCTION) that runs it
RUN_BY = {
    "./build-deb.sh": "test_package.py::deb",
    "apt install": "test_package.py::test_the_package_takes_over_an_install_sh_install_without_losing_a_forward",
    "apt remove": "test_package.py::test_remove_takes_the_rules_away_and_keeps_the_configuration",
    "apt purge": "test_package.py::test_purge_after_the_admins_ufw_entry_remove_leaves_nothing_of_ours",
    "kvmufw_hook ufw-entry add": "test_package.py::test_the_package_takes_over_an_install_sh_install_without_losing_a_forward",
    "kvmufw_hook ufw-entry remove": "test_package.py::test_purge_after_the_admins_ufw_entry_remove_leaves_nothing_of_ours",
    "./install.sh --uninstall": "test_install.py::test_an_upgrade_from_the_previous_install_sh",
    "./install.sh": "test_package.py::host",
    "virsh metadata": "test_lab.py::test_forward_from_domain_metadata",
    "kvmufw_hook forward add --network": "test_lab.py::test_a_network_forward_survives_replay_reloads_and_a_libvirt_restart",
    "kvmufw_hook forward add": "test_lab.py::test_forward_add_and_remove_on_a_running_guest",
    "kvmufw_hook forward remove": "test_lab.py::test_forward_add_and_remove_on_a_running_guest",
    "kvmufw_hook forward list": "test_lab.py::test_forward_add_and_remove_on_a_running_guest",
    "kvmufw_hook status": "test_lab.py::test_status_flush_and_replay_from_the_command_line",
    "kvmufw_hook flush": "test_lab.py::test_status_flush_and_replay_from_the_command_line",
    "kvmufw_hook replay": "test_lab.py::test_status_flush_and_replay_from_the_command_line",
    "kvmufw_hook doctor": "test_lab.py::test_doctor_on_a_healthy_host_and_after_a_reload_that_wiped_libvirt",
    "kvmufw_hook restore": "test_host_safety.py::test_restore_puts_rules_back_from_state_without_libvirt",
    "kvmufw_hook plan": "test_kernel.py::test_plan_output_passes_iptables_restore_test",
}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "sudo":
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def words_to_find(words: list[str]) -> list[str]:
    """The subcommands and options: what a test must say to run this command (names,
    ports, paths and XML are examples)."""
    return [w for w in words[1:] if re.fullmatch(r"(--)?[a-z][a-z-]*", w)]


def source_of(name: str) -> str:
    module, function = name.split("::")
    source = next((ROOT / "tests").glob("*/" + module)).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return ast.get_source_segment(source, node) or ""
    raise AssertionError(f"{name}: no such test")


def test_every_readme_command_is_run_by_a_test():
    commands = readme_commands()
    assert len(commands) > 15
    for words in commands:
        line = " ".join(words)
        prefix = max((p for p in RUN_BY if line == p or line.startswith(p + " ")),
                     key=len, default=None)
        assert prefix, f"README command run by no test: {line}"
        source = source_of(RUN_BY[prefix])
        if words[0] != "kvmufw_hook":  # tests call the command through helpers
            assert words[0].lstrip("./") in source, (line, RUN_BY[prefix])
        for word in words_to_find(words):
            assert f'"{word}"' in source or f" {word}" in source, (line, word, RUN_BY[prefix])


def test_the_readmes_configuration_example_is_what_the_parser_reads():
    """The configuration block under the README's "Configuration" heading parses, and
    grants exactly what its comments say: the named owners their ports, nobody else."""
    from kvmufw_hook import config
    from kvmufw_hook.names import domain_owner, network_owner

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Configuration"):]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "no configuration example under the Configuration heading"
    conf = config.parse(block.group(1), "README.md")
    assert conf.firewall_backend == "iptables"
    assert conf.consents(domain_owner("web1"), "tcp", 22)
    assert conf.consents(network_owner("lab"), "udp", 5005)
    assert not conf.consents(domain_owner("web1"), "udp", 22)
    assert not conf.consents(domain_owner("web2"), "tcp", 22)
    assert not conf.consents(network_owner("lab"), "udp", 5011)
