"""The DNS server as a task of the session: bind on the VIF's address, point the system's
resolver at it, answer until cancelled, and put the resolver back in `finally`."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import trio

from tele.dns import system
from tele.dns.errors import DnsError
from tele.dns.names import NameRules
from tele.dns.privileges import DnsPrivileges, ResolverChange
from tele.dns.server import Lookup, Resolver, Upstream, serve_tcp, serve_udp
from tele.errors import TeleError

log = logging.getLogger(__name__)


class SystemSetup(enum.Enum):
    AUTO = "auto"  # systemd-resolved when it runs, else resolv.conf
    RESOLVED = "resolved"
    RESOLV_CONF = "resolv.conf"
    NONE = "none"  # serve only (tests of the server, or a user who configures by hand)


@dataclass(slots=True)
class DnsSettings:
    address: str
    """The VIF's address: the server listens there (port 53)."""
    device: str
    rules: NameRules
    lookup_timeout: float = 8.0
    port: int = 53
    netns: str | None = None
    setup: SystemSetup = SystemSetup.AUTO
    resolv_conf: Path = system.RESOLV_CONF
    resolv_backup: Path | None = None
    """Where the original resolv.conf is kept; default: beside it, `.tele-orig` appended."""
    upstream: list[str] = field(default_factory=list)
    """Nameservers for names outside the cluster; empty: those of `resolv_conf` before the
    override."""


async def serve_dns(
    settings: DnsSettings,
    lookup: Lookup,
    *,
    privileges: DnsPrivileges,
    task_status: trio.TaskStatus[Resolver] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run the DNS server until cancelled; `started(resolver)` once the system uses it.

    `privileges`: who binds port 53 and changes the resolver (tele.vif.privileges has both).
    """
    servers = settings.upstream or system.nameservers(settings.resolv_conf)
    upstream_servers = [(s, 53) for s in servers if s != settings.address and ":" not in s]
    try:
        udp_raw, tcp_raw, up_raw = await privileges.bind_dns(
            settings.netns, settings.address, settings.port
        )
    except OSError as exc:
        raise DnsError(
            f"cannot listen for DNS on {settings.address}:{settings.port}: {exc.strerror}"
        ) from exc
    udp = trio.socket.from_stdlib_socket(udp_raw)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(tcp_raw))
    upstream = Upstream(trio.socket.from_stdlib_socket(up_raw), upstream_servers)
    resolver = Resolver(settings.rules, lookup, upstream, lookup_timeout=settings.lookup_timeout)
    setup = settings.setup
    if setup is SystemSetup.AUTO:
        setup = SystemSetup.RESOLVED if system.resolved_running() else SystemSetup.RESOLV_CONF
    rules = settings.rules
    change = ResolverChange(
        resolved=setup is SystemSetup.RESOLVED,
        device=settings.device,
        server=settings.address,
        search=[system.SEARCH_DOMAIN, rules.namespace],
        domains=[
            system.SEARCH_DOMAIN,
            f"~{rules.cluster_domain}",
            *(f"~{ns}" for ns in rules.namespaces),
            *(f"~{s.strip('.')}" for s in rules.include_suffixes),
        ],
        resolv_conf=settings.resolv_conf,
        resolv_backup=settings.resolv_backup or system.backup_for(settings.resolv_conf),
    )
    changed = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(upstream.serve)
            nursery.start_soon(serve_udp, resolver, udp)
            nursery.start_soon(serve_tcp, resolver, listener)
            if setup is not SystemSetup.NONE:
                changed = True
                await privileges.set_resolver(settings.netns, change)
            log.info("DNS server on %s:%d (%s)", settings.address, settings.port, setup.value)
            task_status.started(resolver)
            await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if changed:
                try:
                    await privileges.restore_resolver(settings.netns, change)
                except (TeleError, OSError) as exc:  # DnsError here, VifError from the helper
                    log.warning("restoring the resolver: %s", exc)
        for sock in (udp, upstream.sock):
            sock.close()
        await listener.aclose()
