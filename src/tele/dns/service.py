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
from tele.dns.names import NameRules
from tele.dns.server import Lookup, Resolver, Upstream, bind_sockets, serve_tcp, serve_udp
from tele.vif import journal
from tele.vif.errors import VifError
from tele.vif.netns import run_in_netns

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
    task_status: trio.TaskStatus[Resolver] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run the DNS server until cancelled; `started(resolver)` once the system uses it."""
    servers = settings.upstream or system.nameservers(settings.resolv_conf)
    upstream_servers = [(s, 53) for s in servers if s != settings.address and ":" not in s]
    try:
        udp_raw, tcp_raw, up_raw = await run_in_netns(
            settings.netns, lambda: bind_sockets(settings.address, settings.port)
        )
    except OSError as exc:
        raise VifError(
            f"cannot listen for DNS on {settings.address}:{settings.port}: {exc.strerror}"
        ) from exc
    udp = trio.socket.from_stdlib_socket(udp_raw)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(tcp_raw))
    upstream = Upstream(trio.socket.from_stdlib_socket(up_raw), upstream_servers)
    resolver = Resolver(settings.rules, lookup, upstream, lookup_timeout=settings.lookup_timeout)
    setup = settings.setup
    if setup is SystemSetup.AUTO:
        setup = SystemSetup.RESOLVED if system.resolved_running() else SystemSetup.RESOLV_CONF
    backup = settings.resolv_backup or settings.resolv_conf.with_name(
        settings.resolv_conf.name + ".tele-orig"
    )
    entry = journal.Entry(
        settings.netns, resolv_conf=str(settings.resolv_conf), resolv_backup=str(backup)
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(upstream.serve)
            nursery.start_soon(serve_udp, resolver, udp)
            nursery.start_soon(serve_tcp, resolver, listener)
            rules = settings.rules
            if setup is SystemSetup.RESOLV_CONF:
                journal.record(entry)
                search = [system.SEARCH_DOMAIN, rules.namespace]
                await trio.to_thread.run_sync(
                    system.override_resolv_conf,
                    settings.resolv_conf,
                    backup,
                    settings.address,
                    search,
                )
            elif setup is SystemSetup.RESOLVED:
                domains = [
                    system.SEARCH_DOMAIN,
                    f"~{rules.cluster_domain}",
                    *(f"~{ns}" for ns in rules.namespaces),
                    *(f"~{s.strip('.')}" for s in rules.include_suffixes),
                ]
                await trio.to_thread.run_sync(
                    system.resolved_set_link, settings.device, settings.address, domains
                )
            log.info("DNS server on %s:%d (%s)", settings.address, settings.port, setup.value)
            task_status.started(resolver)
            await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if setup is SystemSetup.RESOLV_CONF:
                await trio.to_thread.run_sync(
                    system.restore_resolv_conf, settings.resolv_conf, backup
                )
                journal.forget(settings.netns, resolv_conf=str(settings.resolv_conf))
            # resolved forgets a link's settings when the device goes away.
        for sock in (udp, upstream.sock):
            sock.close()
        await listener.aclose()
