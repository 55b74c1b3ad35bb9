"""How a backend writes an owner tag into a rule's comment, and reads it back: the same
text in iptables and in nftables, e.g. ``kvmufw:d=web1,b=virbr1,s=10.0.0.0/24``.

The tag is what makes removal exact: a backend only ever deletes rules whose comment
parses as one of ours, and of those only the rules of the owner being changed.
"""

from __future__ import annotations

from ..names import Tag

PREFIX = "kvmufw:"


def comment(tag: Tag) -> str:
    return f"{PREFIX}{tag.owner},b={tag.bridge},s={tag.subnet}"


def parse_comment(text: str) -> Tag | None:
    """The tag of a comment, or None if the comment is not ours."""
    if not text.startswith(PREFIX):
        return None
    fields = text[len(PREFIX):].split(",")
    if "=" not in fields[0]:
        return None
    values = {}
    for field in fields[1:]:
        key, _, value = field.partition("=")
        values[key] = value
    return Tag(fields[0], values.get("b", ""), values.get("s", ""))
