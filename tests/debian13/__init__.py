"""The Debian 13 root the suite also runs in: see root.py."""
