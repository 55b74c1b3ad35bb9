"""The error types. ``InputError`` is the user's input being wrong: its message is the one
line the user reads (naming the object, the forward and the reason); the CLI maps it to
exit 2. ``ApplyError`` is the firewall refusing a change; exit 1."""


class KvmufwError(Exception):
    """Base of every error we raise on purpose."""


class InputError(KvmufwError):
    """Bad input: malformed XML, bad metadata, an unresolvable address, a conflict."""


class ApplyError(KvmufwError):
    """The firewall (iptables-save/-restore) failed or refused the change."""


def shown(text: object, limit: int = 80) -> str:
    """``text`` quoted for a one-line message: control and non-ASCII characters escaped."""
    value = str(text)
    escaped = value.encode("unicode_escape", "backslashreplace").decode("ascii")
    escaped = escaped.replace("'", "\\'")
    if len(escaped) > limit:
        escaped = escaped[:limit] + "…"
    return f"'{escaped}'"
