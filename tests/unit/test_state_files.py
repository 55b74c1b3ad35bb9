"""The state files ``replay`` reads and rewrites: the guests our state holds are named
without parsing again what libvirt's live XML already gave, and a file that already holds
what it should is left as it is."""

import os

from conftest import SAMPLES

from kvmufw_hook import state

WEB1 = (SAMPLES / "04-qemu.web1.start.xml").read_bytes()


def named(xml: bytes, name: str) -> bytes:
    return xml.replace(b"<name>web1</name>", f"<name>{name}</name>".encode(), 1)


def test_domain_names_are_load_domains_names_whatever_the_files_hold(state_env):
    state.save_domain("web1", WEB1)  # exactly the live XML
    state.save_domain("web2", named(WEB1, "web2") + b"\n")  # another text of it
    state.save_domain("gone", named(WEB1, "gone"))  # no longer running
    state.save_domain("bad", b"<domain>")  # corrupt: reported, not a name
    live = {"web1": WEB1, "web2": named(WEB1, "web2")}
    said: list[str] = []
    assert state.domain_names(live, said.append) == set(state.load_domains(said.append))
    assert state.domain_names(live) == {"web1", "web2", "gone"}
    assert len(said) == 2 and all("bad.xml" in line for line in said)


def test_a_file_the_same_as_the_live_xml_is_not_parsed_again(state_env, monkeypatch):
    from kvmufw_hook import parse
    state.save_domain("web1", WEB1)
    state.save_domain("web2", named(WEB1, "web2") + b"\n")
    parsed: list[bytes] = []
    real = parse.parse_domain_xml
    monkeypatch.setattr(parse, "parse_domain_xml", lambda xml: parsed.append(xml) or real(xml))
    assert state.domain_names({"web1": WEB1, "web2": named(WEB1, "web2")}) == {"web1", "web2"}
    assert parsed == [named(WEB1, "web2") + b"\n"]


def test_replace_all_rewrites_only_what_differs_and_never_keeps_a_symlink(state_env, tmp_path):
    state.replace_all({}, {"web1": WEB1, "web2": named(WEB1, "web2")})
    path1, path2 = state.domain_path("web1"), state.domain_path("web2")
    inode1 = os.stat(path1).st_ino
    os.unlink(path2)
    target = tmp_path / "elsewhere"
    target.write_bytes(named(WEB1, "web2"))
    os.symlink(target, path2)  # planted, holding the very same bytes
    state.replace_all({}, {"web1": WEB1, "web2": named(WEB1, "web2")})
    assert os.stat(path1).st_ino == inode1  # the same file: not written again
    assert not os.path.islink(path2) and open(path2, "rb").read() == named(WEB1, "web2")
    assert target.read_bytes() == named(WEB1, "web2")
    state.replace_all({}, {"web1": named(WEB1, "web1") + b" "})
    assert open(path1, "rb").read() == WEB1 + b" " and not os.path.exists(path2)


def test_the_files_domain_names_found_the_same_are_not_read_again(state_env, monkeypatch):
    """``replay`` hands ``replace_all`` the files ``domain_names`` found holding their
    live XML under the same lock: only the others are read (and rewritten) again."""
    state.save_domain("web1", WEB1)
    state.save_domain("web2", named(WEB1, "web2") + b"\n")
    live = {"web1": WEB1, "web2": named(WEB1, "web2")}
    same: set[str] = set()
    assert state.domain_names(live, same=same) == {"web1", "web2"}
    assert same == {state.domain_path("web1")}
    read: list[str] = []
    real = state._read
    monkeypatch.setattr(state, "_read", lambda path: read.append(path) or real(path))
    state.replace_all({}, live, unchanged=same)
    assert read == [state.domain_path("web2")]
    assert open(state.domain_path("web2"), "rb").read() == named(WEB1, "web2")


def _network(name: str, bridge: str) -> bytes:
    return (f"<network><name>{name}</name><forward mode='nat'/><bridge name='{bridge}'/>"
            "<ip address='10.7.0.1' prefix='24'/></network>").encode()


def test_networks_come_from_our_state_first_then_from_libvirts_files(state_env, monkeypatch):
    """Our state's copy wins; libvirt's status file of a network we hold is not parsed
    only to be dropped, but is read where our copy is missing or corrupt."""
    from pathlib import Path

    from kvmufw_hook import parse
    theirs = Path(state_env["KVMUFW_LIBVIRT_NETWORK_DIR"])
    state.save_network("ours", _network("ours", "virbr1"))
    (theirs / "ours.xml").write_bytes(_network("ours", "virbr9"))  # libvirt's, older
    state.save_network("broken", b"<network>")  # corrupt: libvirt's copy stands in
    (theirs / "broken.xml").write_bytes(_network("broken", "virbr2"))
    (theirs / "only.xml").write_bytes(_network("only", "virbr3"))  # not in our state
    parsed: list[bytes] = []
    real = parse.parse_network_xml
    monkeypatch.setattr(parse, "parse_network_xml",
                        lambda xml: parsed.append(xml) or real(xml))
    said: list[str] = []
    networks = state.load_networks(said.append)
    assert {name: net.bridge for name, net in networks.items()} == {
        "ours": "virbr1", "broken": "virbr2", "only": "virbr3"}
    assert _network("ours", "virbr9") not in parsed
    assert len(said) == 1 and "broken" in said[0]
