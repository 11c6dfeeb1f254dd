"""Errors of the sandbox node runtime (namespaces, links, nftables, processes)."""

from __future__ import annotations

from tele.errors import TeleError


class NodeError(TeleError):
    """A namespace, link or firewall operation of the sandbox node failed."""
