"""The session's network: the VIF and the DNS server as one task of a cluster session.

`serve_network(options, session)` first undoes what a crashed daemon left (undo journal), then
starts the VIF with the cluster's subnets (dialing tunnel streams through the session's link
pool) and the DNS server on the VIF's address (looking names up through the session's RPC
client). The privileged steps are done by the daemon itself or by the privileged helper
(`Privileges`); routes follow the cluster's subnets (`NetworkStatus.follow`). The session asks
for it with `NetworkOptions.enabled` (--vif: or fail) or `when_possible` (the default of
`tele connect`: or go on without it, saying why); TELE_VIF=0 keeps the default off (tests).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol, overload

import msgspec
import trio

from tele import paths
from tele.dns import system
from tele.dns.names import DEFAULT_EXCLUDE_SUFFIXES, NameRules
from tele.dns.server import Resolver
from tele.dns.service import DnsSettings, SystemSetup, serve_dns
from tele.net.tunnel import Destination, ResetReason
from tele.rpc import manager_api as mapi
from tele.rpc.agent_api import VIA_DIAL_PREFIX
from tele.rpc.client import Client
from tele.rpc.h2link import H2Stream
from tele.rpc.tunnel import TunnelError
from tele.vif import journal, watchdog
from tele.vif.privileges import LocalPrivileges, Privileges
from tele.vif.service import DEFAULT_ADDRESS, DEFAULT_DEVICE, VifInfo, VifSettings, serve_vif
from tele.vif.vnat import DEFAULT_SUBNET as DEFAULT_VNAT_SUBNET
from tele.vif.vnat import VirtualIPs

log = logging.getLogger(__name__)

ENV_ENABLE = "TELE_VIF"
"""`TELE_VIF=1` turns the network on for sessions that got no explicit options."""
ENV_NETNS = "TELE_VIF_NETNS"
"""Work in this network namespace instead of the daemon's (tests, containers)."""
ENV_RESOLV_CONF = "TELE_VIF_RESOLV_CONF"
ENV_EARLY_ACCEPT = "TELE_VIF_EARLY_ACCEPT"
"""`TELE_VIF_EARLY_ACCEPT=0`: every SYN waits for its dial (tele.vif.runtime; A/B benches)."""


@dataclass(slots=True)
class NetworkOptions:
    """The `connect` flags and config keys of the network part."""

    enabled: bool = False
    """Set up the network, or fail connecting (`tele connect --vif`)."""
    when_possible: bool = False
    """Set it up when this daemon can (CAP_NET_ADMIN, or a privileged helper), else connect
    without it and say why (`tele connect` without --vif/--no-vif)."""
    also_proxy: list[str] = field(default_factory=list)
    never_proxy: list[str] = field(default_factory=list)
    allow_conflicting: list[str] = field(default_factory=list)
    device: str = DEFAULT_DEVICE
    address: str = DEFAULT_ADDRESS
    netns: str | None = None
    dns: bool = True
    dns_setup: SystemSetup = SystemSetup.AUTO
    resolv_conf: Path | None = None
    resolv_backup: Path | None = None
    """Where the overridden resolv.conf's original is kept; default: in tele's state dir (never
    beside resolv.conf: /etc may be shared with other network namespaces' daemons)."""
    include_suffixes: list[str] = field(default_factory=list)
    exclude_suffixes: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE_SUFFIXES))
    excludes: list[str] = field(default_factory=list)
    mappings: dict[str, str] = field(default_factory=dict)
    lookup_timeout: float = 8.0
    dns_upstream: list[str] = field(default_factory=list)
    """Nameservers for names outside the cluster (dns.localIP); empty: resolv.conf's."""
    vnat: list[str] = field(default_factory=list)
    """Cluster subnets given virtual IPs (`--vnat`): never routed themselves (tele.vif.vnat)."""
    virtual_subnet: str = DEFAULT_VNAT_SUBNET
    """Where the virtual IPs come from (config cluster.virtualIPSubnet)."""
    proxy_via: list[tuple[str, str]] = field(default_factory=list)
    """(subnet, route id): cluster subnets given virtual IPs and dialled from a workload's pods
    (`--proxy-via`; their OPENs carry the dial id `via.<route id>`)."""
    dial_timeout: float = 5.0
    """Config timeouts.proxyDial: a connection to a cluster address waits this long for its
    tunnel stream before the app sees it refused."""

    @classmethod
    def from_env(cls) -> NetworkOptions:
        """Options from the environment (off unless TELE_VIF=1)."""
        enabled = os.environ.get(ENV_ENABLE, "") in ("1", "true", "yes")
        resolv = os.environ.get(ENV_RESOLV_CONF)
        return cls(
            enabled=enabled,
            netns=os.environ.get(ENV_NETNS) or None,
            resolv_conf=Path(resolv) if resolv else None,
        )


class Dialing(Protocol):
    """The part of `LinkPool` the VIF uses."""

    async def dial(
        self,
        destination: Destination,
        *,
        session: str,
        dial_id: str | None = ...,
        wait: float = ...,
    ) -> H2Stream: ...

    def open_now(
        self, destination: Destination, *, session: str, dial_id: str | None = ...
    ) -> H2Stream | None: ...


class SessionLike(Protocol):
    """What the network needs of a cluster session (`tele.daemon.session.ClusterSession`)."""

    @property
    def pool(self) -> Dialing: ...

    @property
    def namespace(self) -> str: ...

    @property
    def cluster(self) -> mapi.ClusterInfo | None: ...

    def session_id(self) -> str: ...

    async def client(self) -> Client: ...


@dataclass(slots=True)
class NetworkStatus:
    """What `tele status` can show."""

    vif: VifInfo
    resolver: Resolver | None
    set_up_by: str = "daemon"
    """Who did the privileged steps: "daemon", or "privileged helper (pid N)"."""
    also_proxy: list[str] = field(default_factory=list)
    never_proxy: list[str] = field(default_factory=list)
    allow_conflicting: list[str] = field(default_factory=list)
    vnat: VirtualIPs | None = None

    async def follow(self, cluster: mapi.ClusterInfo) -> None:
        """The cluster's subnets changed: route the new ones, drop the gone ones."""
        if self.vif.follow is not None:
            await self.vif.follow([*cluster.pod_subnets, *cluster.service_subnets])

    def summary(self) -> dict[str, object]:
        """Plain data for `tele status` (text and --output json)."""
        counters = self.vif.counters
        data: dict[str, object] = {
            "device": self.vif.device,
            "address": str(self.vif.address),
            "subnets": [str(n) for n in self.vif.subnets],
            "also_proxy": list(self.also_proxy),
            "never_proxy": list(self.never_proxy),
            "allow_conflicting": list(self.allow_conflicting),
            "vnat": self.vnat.summary() if self.vnat is not None else None,
            "bytes_in": counters.bytes_in,
            "bytes_out": counters.bytes_out,
            "tcp_connections": counters.tcp_connections,
            "udp_flows": counters.udp_flows,
            "refused": counters.refused,
            "set_up_by": self.set_up_by,
        }
        if self.resolver is not None:
            rules = self.resolver.rules
            data["dns"] = {
                "local_ip": str(self.vif.address),
                "include_suffixes": list(rules.include_suffixes),
                "exclude_suffixes": list(rules.exclude_suffixes),
                "excludes": list(rules.excludes),
                "mappings": dict(rules.mappings),
                "lookup_timeout": self.resolver.lookup_timeout,
                "queries": self.resolver.counters.queries,
            }
        return data


class _ManagedNamespaces(Sequence[str]):
    """The namespaces usable as top-level domains, read live from the session's cluster info
    (a dynamic namespace selector changes them while connected)."""

    def __init__(self, session: SessionLike) -> None:
        self._session = session

    def _names(self) -> list[str]:
        cluster = self._session.cluster
        return list(cluster.managed_namespaces) if cluster else []

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def _virtual_answers(reply: mapi.LookupReply, vips: VirtualIPs) -> mapi.LookupReply:
    """The manager's answer with each translated cluster address replaced by its virtual IP
    (an address for which none is left is dropped)."""
    records = []
    changed = False
    for record in reply.records:
        if record.type in ("A", "AAAA"):
            try:
                address = ipaddress.ip_address(record.value)
            except ValueError:
                records.append(record)
                continue
            if vips.covers(address):
                changed = True
                virtual = vips.virtual_for(address)
                if virtual is None:
                    log.warning("vnat: no virtual IP left for %s (%s)", record.name, address)
                    continue
                kind = "A" if virtual.version == 4 else "AAAA"
                records.append(msgspec.structs.replace(record, type=kind, value=str(virtual)))
                continue
        records.append(record)
    return msgspec.structs.replace(reply, records=records) if changed else reply


async def serve_network(
    options: NetworkOptions,
    session: SessionLike,
    privileges: Privileges | None = None,
    *,
    task_status: trio.TaskStatus[NetworkStatus] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run the VIF (and DNS) of `session` until cancelled.

    `privileges`: who does the privileged steps (default: this process); it is closed on the
    way out (the helper undoes what is left and exits).
    """
    guard: tuple[subprocess.Popen[bytes], int] | None = None
    if privileges is None:  # this process changes the machine: someone must undo it if we die
        guard = watchdog.start(journal.journal_path())
    try:
        await _serve_network(options, session, privileges, task_status)
    finally:
        if privileges is not None:
            with trio.CancelScope(shield=True):
                await privileges.aclose()
        if guard is not None:
            process, pipe = guard
            os.close(pipe)  # everything is undone: the watchdog finds nothing and exits
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await trio.to_thread.run_sync(process.wait)


async def _serve_network(
    options: NetworkOptions,
    session: SessionLike,
    privileges: Privileges | None,
    task_status: trio.TaskStatus[NetworkStatus],
) -> NoReturn:
    if privileges is None:
        undone = await trio.to_thread.run_sync(journal.recover)
        if undone:
            log.warning("cleaned up after an earlier daemon: %s", "; ".join(undone))
    cluster = session.cluster
    if cluster is None:
        raise RuntimeError("serve_network needs an arrived session")

    via_subnets = [subnet for subnet, _ in options.proxy_via]
    translated = [*options.vnat, *(s for s in via_subnets if s not in options.vnat)]
    vips = VirtualIPs(options.virtual_subnet, translated) if translated else None
    via_networks = [(ipaddress.ip_network(s, strict=False), s) for s in via_subnets]

    def route_for(real: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """The --proxy-via route id of `real` now (the session asks for new ones after arriving
        again); None when no --proxy-via subnet has it; TunnelError when its route is lost."""
        for network, subnet in via_networks:
            if real.version == network.version and real in network:
                route_id = dict(options.proxy_via).get(subnet, "")
                if not route_id:
                    raise TunnelError(
                        ResetReason.UNREACHABLE,
                        f"--proxy-via {subnet} has no route through its workload now "
                        "(see tele status)",
                    )
                return route_id
        return None

    def real_destination(destination: Destination) -> tuple[Destination, str | None]:
        """`destination` as the cluster knows it (a virtual IP translated back) and its
        --proxy-via route id (None: the traffic manager dials it); TunnelError for a virtual
        IP this session never handed out, or a --proxy-via route that is lost."""
        if vips is None or destination.ip not in vips.subnet:
            return destination, None
        real = vips.real_for(destination.ip)
        if real is None:  # a virtual IP this session never handed out
            raise TunnelError(
                ResetReason.UNREACHABLE, f"{destination.ip} is no virtual IP of this session"
            )
        return Destination(destination.protocol, real, destination.port), route_for(real)

    async def dial(destination: Destination) -> trio.abc.HalfCloseableStream:
        destination, route_id = real_destination(destination)
        if route_id:  # dialled from the --proxy-via workload's pod
            return await session.pool.dial(
                destination,
                session=session.session_id(),
                dial_id=VIA_DIAL_PREFIX + route_id,
                wait=options.dial_timeout,
            )
        return await session.pool.dial(
            destination,
            session=session.session_id(),
            wait=options.dial_timeout,
        )

    def open_now(destination: Destination) -> H2Stream | None:
        """`tele.rpc.tunnel.open_now` on a link of the pool (no schedule point), or None when that
        would wait (no link up, or the stream limit), or the destination is a --proxy-via
        one or not a virtual IP of this session: `dial` then (the VIF's early accept)."""
        try:
            destination, route_id = real_destination(destination)
        except TunnelError:  # `dial` says why
            return None
        if route_id:
            return None
        return session.pool.open_now(destination, session=session.session_id())

    async def lookup(name: str, qtype: str) -> mapi.LookupReply:
        client = await session.client()
        request = mapi.LookupRequest(session_id=session.session_id(), name=name, qtype=qtype)
        reply = await client.call(mapi.LOOKUP_DNS, request)
        return reply if vips is None else _virtual_answers(reply, vips)

    # With VNAT the translated subnets are not routed (this machine's own route for them stays)
    # and the virtual subnet is.
    never_proxy = [*options.never_proxy, *translated]
    also_proxy = [*options.also_proxy, *([str(vips.subnet)] if vips is not None else [])]
    settings = VifSettings(
        cluster_subnets=[*cluster.pod_subnets, *cluster.service_subnets],
        also_proxy=also_proxy,
        never_proxy=never_proxy,
        allow_conflicting=options.allow_conflicting,
        device=options.device,
        address=options.address,
        netns=options.netns,
        dial_timeout=options.dial_timeout,
    )
    async with trio.open_nursery() as nursery:
        vif: VifInfo = await nursery.start(
            functools.partial(
                serve_vif,
                settings,
                dial,
                privileges=privileges,
                early_opener=None if os.environ.get(ENV_EARLY_ACCEPT) == "0" else open_now,
            )
        )
        resolver: Resolver | None = None
        if options.dns:
            rules = NameRules(
                namespace=session.namespace,
                namespaces=_ManagedNamespaces(session),
                cluster_domain=cluster.cluster_domain or "cluster.local",
                include_suffixes=options.include_suffixes,
                exclude_suffixes=options.exclude_suffixes,
                excludes=options.excludes,
                mappings=options.mappings,
            )
            dns = DnsSettings(
                address=str(vif.address),
                device=vif.device,
                rules=rules,
                lookup_timeout=options.lookup_timeout,
                netns=options.netns,
                setup=options.dns_setup,
            )
            if options.resolv_conf is not None and privileges is None:
                dns.resolv_conf = options.resolv_conf
            else:  # the helper always picks the namespace's own file
                dns.resolv_conf = system.resolv_conf_for(options.netns)
            dns.resolv_backup = options.resolv_backup or paths.state_dir() / "resolv.conf.tele-orig"
            dns.upstream = list(options.dns_upstream)
            resolver = await nursery.start(
                functools.partial(
                    serve_dns, dns, lookup, privileges=privileges or LocalPrivileges()
                )
            )
        set_up_by = "daemon" if privileges is None else privileges.describe()
        task_status.started(
            NetworkStatus(
                vif,
                resolver,
                set_up_by,
                also_proxy=list(options.also_proxy),
                never_proxy=list(options.never_proxy),
                allow_conflicting=list(options.allow_conflicting),
                vnat=vips,
            )
        )
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover
