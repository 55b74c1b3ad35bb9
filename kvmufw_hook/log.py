"""Logging for hooks and commands: syslog with the ident ``kvmufw_hook`` (journald shows
it), and stderr for errors, so that ``virsh`` shows why a hook refused, or for everything
with ``-v``. Cheap to import: it is on every hook's path."""

import os
import sys

VERBOSE = bool(os.environ.get("KVMUFW_DEBUG"))


def log(message: str, error: bool = False) -> None:
    from .errors import printable  # names and XML text reach here: no raw ESC or CSI
    line = printable(" ".join(str(message).split()))
    try:
        import syslog
        syslog.openlog("kvmufw_hook", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR if error else syslog.LOG_INFO, line)
    except Exception:
        pass
    if error or VERBOSE:
        sys.stderr.write(f"kvmufw_hook: {line}\n")
        sys.stderr.flush()
