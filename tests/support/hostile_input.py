"""Hostile and broken input for property-based tests: hypothesis strategies for ports,
addresses, text and forward elements, names libvirt allows that a shell or a parser may
not, and the XML escaping that keeps every character."""

import re

from hookrun import SAMPLES
from hypothesis import strategies as st

START = (SAMPLES / "04-qemu.web1.start.xml").read_text()
TAG = re.compile(r'--comment "(kvmufw:[A-Za-z0-9._~=,/:-]+)"')

ports = st.one_of(
    st.integers(-5, 70000).map(str),
    st.tuples(st.integers(0, 66000), st.integers(0, 66000)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.sampled_from(["22abc", "", " 22", "22 ", "0x16", "1e3", "२२", "22-", "-22", "1--2"]),
)
addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
    st.sampled_from(["10.0.0.300", "10.0.0", "::ffff:10.0.0.5", "10.0.0.5/24", "", "localhost"]),
)
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
attr_values = st.one_of(ports, addresses, texts)


def xml_attr(value: str) -> str:
    """An attribute value as XML text, every character kept (newlines included)."""
    out = []
    for ch in value:
        code = ord(ch)
        if ch in "<&\"" or code < 0x20 or 0xFFFE <= code <= 0xFFFF:
            out.append(f"&#{code};")
        else:
            out.append(ch)
    text = "".join(out)
    return text if all(_xml_char(ord(c)) for c in value) else "x"


def _xml_char(code: int) -> bool:
    return code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD \
        or 0x10000 <= code <= 0x10FFFF


@st.composite
def forward_elements(draw):
    names = ["proto", "host-port", "guest-port", "guest-ip", "mac", "host-ip", "source",
             "comment", "colour", "kvmufw:host-port"]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
    attrs = []
    for name in chosen:
        if name == "proto":
            value = draw(st.sampled_from(["tcp", "udp", "sctp", "TCP", "icmp", "", "tcp "]))
        elif name == "mac":
            value = draw(st.sampled_from(["52:54:00:00:00:20", "52-54-00-00-00-20", "zz"]))
        elif name == "source":
            value = ",".join(draw(st.lists(addresses, min_size=0, max_size=3)))
        else:
            value = draw(attr_values)
        attrs.append(f'{name}="{xml_attr(value)}"')
    prefix = draw(st.sampled_from(["", "kvmufw:"]))
    return f"<{prefix}forward {' '.join(attrs)}/>"


def domain_with(forwards: str, name: str = "web1") -> str:
    head, rest = START.split("<kvmufw:forwards", 1)
    tail = rest.split("</kvmufw:forwards>", 1)[1]
    xml = (head + f'<kvmufw:forwards xmlns:kvmufw="urn:kvmufw:1">{forwards}</kvmufw:forwards>'
           + tail)
    return xml.replace("<name>web1</name>", f"<name>{name}</name>")


HOSTILE_NAMES = ['we"b1', "we'b1", "web\n1", "wéb☃", "a" * 300, "x y", "$(reboot)", "-j ACCEPT",
                 "web1,b=evil", "kvmufw:n=lab"]


def xml_text(name: str) -> str:
    """A name as XML text, its tab, newline and carriage return as character references
    (as libvirt writes them)."""
    return "".join(f"&#{ord(c)};" if c in "\t\n\r" else c for c in name)
