"""Domum Gateway: time-boxed, audited, VPN-less privileged remote access."""

__version__ = "0.1.0"
