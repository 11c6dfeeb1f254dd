"""The privileged steps of DNS (binding port 53, changing the system's resolver), as an interface.

The DNS server asks for them and does the rest itself. The implementations (in this process,
journaled for a crash, or through the privileged helper) are tele.vif.privileges' and
tele.vif.helper_link's, which do the VIF's steps too.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tele.dns import system

DnsSockets = tuple[socket.socket, socket.socket, socket.socket]
"""The DNS server's UDP and TCP sockets on port 53, and its upstream UDP socket."""


@dataclass(frozen=True, slots=True)
class ResolverChange:
    """Point the system's resolver at tele's DNS server (one of two ways)."""

    resolved: bool
    """True: systemd-resolved's per-link settings; False: override resolv.conf."""
    device: str
    server: str
    search: list[str]
    """resolv.conf: the search domains."""
    domains: list[str]
    """systemd-resolved: the link's search and routing domains."""
    resolv_conf: Path = system.RESOLV_CONF
    resolv_backup: Path = Path("/etc/resolv.conf.tele-orig")


class DnsPrivileges(Protocol):
    """The DNS steps that need CAP_NET_ADMIN (or root)."""

    async def bind_dns(self, netns: str | None, address: str, port: int) -> DnsSockets: ...

    async def set_resolver(self, netns: str | None, change: ResolverChange) -> None: ...

    async def restore_resolver(self, netns: str | None, change: ResolverChange) -> None: ...
