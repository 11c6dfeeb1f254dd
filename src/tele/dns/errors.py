"""Errors of tele's DNS on the laptop: the server's port or the system resolver's settings."""

from __future__ import annotations

from tele.errors import TeleError


class DnsError(TeleError):
    """The DNS server could not listen, or the system's resolver could not be pointed at it."""
