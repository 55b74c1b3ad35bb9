"""The error types, and how free text is shown to people. ``InputError`` is the user's input
being wrong: its message is the one line the user reads (naming the object, the forward and
the reason); the CLI maps it to exit 2. ``ApplyError`` is the firewall refusing a change;
exit 1."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .plan import Resolved


class KvmufwError(Exception):
    """Base of every error we raise on purpose."""


class InputError(KvmufwError):
    """Bad input: malformed XML, bad metadata, an unresolvable address, a conflict."""


class Unavailable(InputError):
    """A forward that cannot take effect now, for a reason that reaches no one else's
    address: its network is down, or another owner holds its host port. The only
    refusal a re-check may answer by keeping an owner's current rules; every other one
    withdraws them (fail closed)."""

    # a guest's other forwards, resolved: still checked for ownership
    resolved: tuple[Resolved, ...] = ()


class ConfigError(InputError):
    """Root's configuration file is wrong (one line naming file and line): nothing is
    changed, current rules included."""


class ApplyError(KvmufwError):
    """The firewall (iptables-save/-restore) failed or refused the change."""


class Stale(ApplyError):
    """A write failed and nothing of it is in (a write that failed half way has been
    put back): reading again may succeed (``apply.retrying``)."""


# Control (C0, DEL, C1 such as U+009B CSI), format (bidi overrides), line and paragraph
# separators, surrogates, private use and unassigned characters: a terminal acts on them or
# a reader cannot see them, so text from XML that reaches a person never carries them raw.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(ch: str) -> str:
    return ch.encode("unicode_escape", "backslashreplace").decode("ascii")


def printable(text: object) -> str:
    """``text`` for a terminal or a log line: every character that is not visible text
    (newline, ESC, U+009B, U+202E, …) escaped as ``\\n``, ``\\x1b``, ``\\x9b``, ``\\u202e``;
    letters of any script kept. For people only: JSON output keeps the exact text."""
    value = str(text)
    if value.isprintable():  # the common case, and the hooks' fast path
        return value
    import unicodedata
    return "".join(_escape(ch) if (ch != " " and unicodedata.category(ch) in _HIDDEN)
                   or (ch.isspace() and ch != " ") else ch for ch in value)


def shown(text: object, limit: int = 80) -> str:
    """``text`` quoted for a one-line message: control and non-ASCII characters escaped."""
    value = str(text)
    escaped = value.encode("unicode_escape", "backslashreplace").decode("ascii")
    escaped = escaped.replace("'", "\\'")
    if len(escaped) > limit:
        escaped = escaped[:limit] + "…"
    return f"'{escaped}'"
