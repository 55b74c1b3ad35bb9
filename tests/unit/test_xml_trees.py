"""The two trees the bounded parser builds read the same: ``parse.load``'s ``Node``s (the
hooks) and ElementTree's elements (``forward``, which writes XML back). For every XML in
tests/ (the fixtures, every XML literal in the tests' sources, the hostile documents)
both give the same tree (tag, attributes, text, children), the same model from every
parse entry point, or the same one-line refusal."""

import ast
from xml.etree.ElementTree import TreeBuilder

import pytest
from conftest import FIXTURES, ROOT
from hostile_input import START, domain_with, forward_elements
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmufw_hook import parse
from kvmufw_hook.errors import InputError
from kvmufw_hook.names import NAMESPACE


def _literals() -> list[str | bytes]:
    """Every string literal of the tests' sources that could be a document."""
    out: list[str | bytes] = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
                value = node.value
                if (b"<" if isinstance(value, bytes) else "<") in value:
                    out.append(value)
    return out


def _hostile() -> list[str | bytes]:
    import test_security as sec
    docs: list[str | bytes] = []
    for template in (sec.ENTITY_DOC, sec.BILLION_LAUGHS, sec.QUADRATIC):
        docs.append(template.format(enc="UTF-8"))
        docs += [template.format(enc=label).encode(codec) for label, codec in sec.ENCODINGS]
    value = "x" * 100_000
    docs += [
        b"\xef\xbb\xbf" + START.encode(), START.encode("utf-16"),
        START.replace("<metadata>", f"<metadata><app:x xmlns:app='http://app/' "
                                    f"app:a='{value}'>t&#13;&amp;<![CDATA[<c>]]></app:x>"),
        START.replace("<name>", "<!-- c --><?pi x?><name>t<![CDATA[ ]]>"),
        "<domain " + " ".join(f'a{i}=""' for i in range(20_000)) + "/>",
        b"<domain>" + b"<a/>" * (parse.MAX_ELEMENTS + 1) + b"</domain>",
        b"<domain><name>a</name>", b"<domain><name>\xff</name></domain>", b"", b"<",
        b"<domain><name>a\x00</name></domain>"]
    return docs


DOCUMENTS = ([p.read_bytes() for p in sorted(FIXTURES.rglob("*.xml"))]
             + _literals() + _hostile())


def _tree(el):
    return (el.tag, sorted(el.attrib.items()), el.text, [_tree(c) for c in el])


def _read(read, *args):
    try:
        return read(*args)
    except InputError as exc:
        return f"InputError: {exc}"


def _outcome(data: str | bytes, builder) -> object:
    """The tree and what every entry point makes of it, or the refusal."""
    try:
        root = parse.load_into(data, "doc", builder)
    except InputError as exc:
        return f"InputError: {exc}"
    inner = _read(parse._unwrap, root, "doc")
    holder = parse.Node("metadata")
    holder.append(root)
    return (_tree(root),
            *(_read(read, inner) if not isinstance(inner, str) else inner
              for read in (parse.parse_domain, parse.parse_network)),
            _read(parse.parse_networkport, root),
            _read(parse.parse_forwards, holder, "doc", parse.NETWORK_ATTRS),
            _read(parse.parse_forwards, root, "doc", parse.DOMAIN_ATTRS))


def test_the_documents_are_many_and_of_every_kind():
    assert len(DOCUMENTS) > 200
    models = [_outcome(d, parse.NodeBuilder()) for d in DOCUMENTS]
    read = [m for m in models if isinstance(m, tuple)]
    assert sum(not isinstance(m[1], str) for m in read) > 20  # domains
    assert sum(not isinstance(m[2], str) for m in read) > 40  # networks
    assert len(models) - len(read) > 20  # refused


@pytest.mark.parametrize("index", range(len(DOCUMENTS)))
def test_node_and_elementtree_read_every_document_alike(index):
    data = DOCUMENTS[index]
    assert _outcome(data, parse.NodeBuilder()) == _outcome(data, TreeBuilder())


@settings(max_examples=200, deadline=None)
@given(st.lists(forward_elements(), min_size=1, max_size=4))
def test_node_and_elementtree_read_hostile_forwards_alike(elements):
    data = domain_with("".join(elements))
    assert _outcome(data, parse.NodeBuilder()) == _outcome(data, TreeBuilder())


def test_a_path_finds_what_elementtree_finds():
    data = ("<domain><name>a</name><devices><interface n='1'/><x><interface/></x>"
            "<interface n='2'><source n='s'/></interface></devices><devices>"
            f"<interface n='3'/></devices><metadata><k:f xmlns:k='{NAMESPACE}'/></metadata>"
            "</domain>")
    node, element = parse.load(data), parse.load_into(data, "doc", TreeBuilder())
    for path in ("devices/interface", "devices/interface/source", "name", "nope",
                 "devices", "metadata", "interface", f"metadata/{{{NAMESPACE}}}f"):
        assert [_tree(n) for n in node.findall(path)] == \
            [_tree(e) for e in element.findall(path)], path
        found, expected = node.find(path), element.find(path)
        assert (found is None) == (expected is None), path
        assert found is None or _tree(found) == _tree(expected)
    assert len(node) == len(element) == 4
    assert node.get("nope") is None and node.find("devices/interface").get("n") == "1"
