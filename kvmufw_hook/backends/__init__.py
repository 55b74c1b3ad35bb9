"""Firewall backends. A backend renders the planner's rules in its own terms, reads the
kernel's ruleset back and applies a change with one write per address family. The
iptables backend (``iptables.py``) is the one UFW uses; an nftables backend would be
another module implementing ``base.Backend``, and nothing above this package would change.
"""


def default_backend():
    """The backend for this host: iptables, whichever variant the host selects."""
    from .iptables import IptablesBackend
    return IptablesBackend()
