"""The agent's link to the traffic manager: an EngagementSource fed by the manager.

The agent ARRIVEs (ArriveAsAgent) with its pod's identity and the apps' environment, keeps its
lease with REMAIN, and WATCHes its engagements; an engaged connection or request becomes a tunnel
OPEN with the dial id `engage.<id>` that the manager pairs with the client's DIAL-BACK
(tele.rpc.agent_api). While the manager is unreachable the agent has no engagements, so it is
transparent: the app keeps serving, and nothing waits on a client that cannot be reached.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn
from typing import Protocol as Interface

import trio

import tele
from tele import logs
from tele.agent.config import AgentSettings
from tele.agent.engagements import Address
from tele.agent.wiretap import TAP_DRAIN_SECONDS, Wiretaps
from tele.errors import TeleError, single_leaf
from tele.net.dialpolicy import never_dialed
from tele.net.tunnel import Destination, Protocol, ResetReason, TunnelProtocolError
from tele.rpc import agent_api as aapi
from tele.rpc.client import Client
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2stream import H2Stream
from tele.rpc.links import Connector, LinkPool
from tele.rpc.manager_api import AUTHENTICATE, REMAIN, AuthenticateRequest, SessionRequest
from tele.rpc.tunnel import (
    UDP_IDLE_TIMEOUT,
    TunnelError,
    connect_tcp,
    reason_for_oserror,
    relay_udp,
    splice,
)

log = logging.getLogger(__name__)

ARRIVE_TIMEOUT = 10.0
TAP_REPORT_SECONDS = 2.0
"""How often the wiretap counters are reported to the manager while they move."""
RETRY_MAX = 10.0
TOKEN_FILE_ENV = "_TEL_AGENT_TOKEN_FILE"
"""Where the pod's projected ServiceAccount token for the manager is (set by the injector)."""
MAX_TOKEN_FILE = 16384
PROXY_DIAL_TIMEOUT = 5.0
"""A --proxy-via dial from this pod (the manager waits 10 s for the answer)."""
MAX_PROXIED = 1024
"""--proxy-via connections and UDP flows this agent relays at once; more are refused
(overloaded)."""
MAX_PROXIED_UDP = 256
"""Of those, UDP flows (each holds a socket of the pod's until idle): one more ends the oldest,
so a client sending to many destinations or from many ports (a resolver: a port per query)
cannot take all of the agent's descriptors, and new flows still get through."""


async def read_token(path: str) -> str:
    """The token in `path` now (the kubelet replaces it as it rotates); "" if none."""
    if not path:
        return ""
    try:
        async with await trio.open_file(path, "rb") as f:
            data = await f.read(MAX_TOKEN_FILE + 1)
    except OSError as exc:
        log.warning("cannot read the token for the traffic manager: %s", exc)
        return ""
    return data.decode("utf-8", "replace").strip() if len(data) <= MAX_TOKEN_FILE else ""


def identity(
    settings: AgentSettings, environ: Mapping[str, str], *, sftp_port: int = 0
) -> aapi.AgentIdentity:
    """Who this agent is, as the manager lists it; the pod name is the pod's HOSTNAME."""
    config = settings.config
    return aapi.AgentIdentity(
        pod_name=environ.get("HOSTNAME") or settings.name,
        namespace=config.namespace,
        pod_ip=settings.pod_ip,
        workload_name=config.workload_name,
        workload_kind=config.workload_kind,
        version=tele.__version__,
        environment=settings.app_environment(environ),
        mounts={c.name: list(c.mounts) for c in config.containers},
        mount_policies={c.name: dict(c.mount_policies) for c in config.containers},
        sftp_port=sftp_port,
        replaced=config.replaced(),
        terminates_tls=bool(settings.tls_cert),
    )


def _proxy_destination(dial: aapi.ProxyDial) -> tuple[Destination | None, ResetReason | None]:
    """What a ProxyDial asks for, or why it cannot be dialled (a malformed or unknown ask of a
    hostile or newer manager: PROTOCOL)."""
    try:
        protocol = Protocol(dial.protocol)
        return Destination(protocol, ipaddress.ip_address(dial.host), dial.port), None
    except (ValueError, TunnelProtocolError):
        log.warning("proxy-via: the traffic manager asked for a malformed destination")
        return None, ResetReason.PROTOCOL


async def connect_udp(destination: Destination) -> trio.socket.SocketType:
    """A UDP socket connected to `destination` (its replies only reach this socket)."""
    family = socket.AF_INET6 if destination.ip.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await sock.connect((str(destination.ip), destination.port))
    except BaseException:
        sock.close()
        raise
    return sock


class FileCertificates(Interface):
    """Where the file servers' certificate goes (tele.agent.files.FileServerKeys)."""

    def store(self, cert_pem: str, ca_pem: str) -> None: ...

    def forget(self) -> None: ...


def tcp_connector(host: str, port: int) -> Connector:
    @asynccontextmanager
    async def connect() -> AsyncIterator[trio.abc.Stream]:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            yield stream

    return connect


class ManagerEngagements:
    """Engagements as the manager says; run `serve()` in a nursery."""

    def __init__(
        self,
        agent: aapi.AgentIdentity,
        connect: Connector,
        *,
        retry_initial: float = 0.5,
        token_file: str = "",
        files: FileCertificates | None = None,
    ) -> None:
        self.agent = agent
        self.token_file = token_file
        self.files = files
        """Where the certificate the manager issues for the file servers goes (each arrival)."""
        self.pool = LinkPool(connect, name="agent-manager-link")
        self.session_id = ""
        self.manager_ips: frozenset[str] | None = None
        """The manager's addresses (None: not said); see `may_reach_files`."""
        self._by_port: dict[int, list[aapi.Engagement]] = {}
        self._taps_by_port: dict[int, list[aapi.Engagement]] = {}
        self.wiretaps = Wiretaps()
        self._retry_initial = retry_initial
        self.updates = 0
        self._updated = trio.Event()
        self.proxied = 0
        """--proxy-via connections and UDP flows relayed now."""
        self._udp_flows: OrderedDict[trio.CancelScope, None] = OrderedDict()
        """The --proxy-via UDP flows relayed now, oldest first."""
        self.proxy_udp_idle = UDP_IDLE_TIMEOUT
        """A --proxy-via UDP flow with no datagram either way for this long ends."""
        self._configured_level = logs.current_level()
        """The level the agent started with: it returns when `tele loglevel`'s time ends."""

    @classmethod
    def for_settings(
        cls, settings: AgentSettings, *, sftp_port: int = 0, files: FileCertificates | None = None
    ) -> ManagerEngagements:
        config = settings.config
        return cls(
            identity(settings, os.environ, sftp_port=sftp_port),
            tcp_connector(config.manager_host, config.manager_port),
            token_file=os.environ.get(TOKEN_FILE_ENV, ""),
            files=files,
        )

    def may_reach_files(self, peer: str) -> bool:
        """Whether `peer` may use the file server: the manager only (clients come through
        it), or anyone when the manager did not say its address; nobody before arrival."""
        if not self.session_id:
            return False
        return self.manager_ips is None or peer in self.manager_ips

    def current(self, agent_port: int) -> Sequence[aapi.Engagement]:
        return self._by_port.get(agent_port, [])

    def taps(self, agent_port: int) -> Sequence[aapi.Engagement]:
        return self._taps_by_port.get(agent_port, [])

    async def wait_updated(self, after: int) -> None:
        """Until more than `after` engagement updates have been applied (for callers and tests)."""
        while self.updates <= after:
            await self._updated.wait()

    def _set(self, engagements: Sequence[aapi.Engagement]) -> None:
        by_port: dict[int, list[aapi.Engagement]] = {}
        taps: dict[int, list[aapi.Engagement]] = {}
        for engagement in engagements:
            for port in engagement.ports():
                into = taps if engagement.kind == aapi.WIRETAP else by_port
                into.setdefault(port, []).append(engagement)
        self.wiretaps.forget_except({e.id for e in engagements if e.kind == aapi.WIRETAP})
        if by_port != self._by_port or taps != self._taps_by_port:
            log.info(
                "engagements now: %s",
                ", ".join(f"{e.id} ({e.mechanism}, {e.client})" for e in engagements) or "none",
            )
        self._by_port = by_port
        self._taps_by_port = taps
        self.updates += 1
        self._updated.set()
        self._updated = trio.Event()

    async def open_to_client(
        self,
        engagement: aapi.Engagement,
        original_dst: Address,
        *,
        protocol: Protocol = Protocol.TCP,
        response: bool = False,
    ) -> trio.abc.HalfCloseableStream:
        if not self.session_id:
            raise TeleError("the traffic agent has no session with the traffic manager")
        destination = Destination(protocol, ipaddress.ip_address(original_dst[0]), original_dst[1])
        return await self.pool.dial(
            destination,
            session=self.session_id,
            dial_id=(aapi.AGENT_RESPONSE_DIAL_PREFIX if response else aapi.AGENT_DIAL_PREFIX)
            + engagement.id,
            wait=5.0,
        )

    @asynccontextmanager
    async def tap_channel(
        self, engagement: aapi.Engagement, original_dst: Address, response: bool
    ) -> AsyncIterator[trio.abc.HalfCloseableStream]:
        """Wiretap `engagement`'s copy channel: a tunnel stream the manager pairs with its
        client's dial-back (served there by tele.rpc.tapcopies)."""
        if not self.session_id:
            raise TeleError("the traffic agent has no session with the traffic manager")
        destination = Destination(
            Protocol.TCP, ipaddress.ip_address(original_dst[0]), original_dst[1]
        )
        prefix = aapi.AGENT_TAP_RESPONSE_DIAL_PREFIX if response else aapi.AGENT_TAP_DIAL_PREFIX
        stream: H2Stream | None = None
        with trio.move_on_after(TAP_DRAIN_SECONDS):
            stream = await self.pool.dial(
                destination, session=self.session_id, dial_id=prefix + engagement.id, wait=5.0
            )
        if stream is None:
            raise TeleError("the client did not take the wiretap's copies in time")
        try:
            yield stream
        finally:
            stream.close()

    async def _proxy_dial(self, dial: aapi.ProxyDial) -> None:
        """A client's --proxy-via connection or UDP flow: dial it from this pod (never this
        pod's loopback, link-local or metadata addresses), then open `proxy.<id>` to the
        manager and relay; a dial that fails opens `proxyfail.<id>.<reason>` so the client
        learns why at once."""
        session = self.session_id
        destination, reason = _proxy_destination(dial)
        local: trio.SocketStream | trio.socket.SocketType | None = None
        if destination is not None:
            why = never_dialed(destination.ip)
            udp = destination.protocol is Protocol.UDP
            if why:
                log.warning("proxy-via: not dialling %s: %s", destination, why)
                reason = ResetReason.POLICY
            elif self.proxied >= MAX_PROXIED:
                reason = ResetReason.OVERLOADED
            else:
                if udp and len(self._udp_flows) >= MAX_PROXIED_UDP:
                    oldest = next(iter(self._udp_flows))
                    del self._udp_flows[oldest]
                    oldest.cancel()  # (a resolver's one-query flows pile up until idle)
                    log.info("proxy-via: %d UDP flows: the oldest ends", MAX_PROXIED_UDP)
                with trio.move_on_after(PROXY_DIAL_TIMEOUT):
                    try:
                        local = await (connect_udp if udp else connect_tcp)(destination)
                    except OSError as exc:
                        reason = reason_for_oserror(exc)
                if local is None and reason is None:
                    reason = ResetReason.TIMEOUT
        if local is None:
            failed = (
                f"{aapi.PROXY_FAIL_PREFIX}{dial.dial_id}.{(reason or ResetReason.INTERNAL).value}"
            )
            with trio.move_on_after(PROXY_DIAL_TIMEOUT):
                try:
                    stream = await self.pool.dial(
                        destination
                        or Destination(Protocol.TCP, ipaddress.ip_address("0.0.0.0"), 1),
                        session=session,
                        dial_id=failed,
                        wait=PROXY_DIAL_TIMEOUT,
                    )
                    stream.close()
                except TunnelError:
                    pass  # the manager refuses it, having told the client
            return
        assert destination is not None
        self.proxied += 1
        try:
            if isinstance(local, trio.SocketStream):
                async with local:
                    await self._proxy_relay(destination, session, dial.dial_id, local)
            else:
                flow = trio.CancelScope()
                self._udp_flows[flow] = None
                try:
                    with local, flow:
                        await self._proxy_relay(destination, session, dial.dial_id, local)
                finally:
                    self._udp_flows.pop(flow, None)
        finally:
            self.proxied -= 1

    @property
    def proxied_udp(self) -> int:
        """--proxy-via UDP flows relayed now."""
        return len(self._udp_flows)

    async def _proxy_relay(
        self,
        destination: Destination,
        session: str,
        dial_id: str,
        local: trio.SocketStream | trio.socket.SocketType,
    ) -> None:
        try:
            tunnel = await self.pool.dial(
                destination,
                session=session,
                dial_id=aapi.PROXY_DIAL_PREFIX + dial_id,
                wait=PROXY_DIAL_TIMEOUT,
            )
        except TunnelError as exc:
            log.info("proxy-via: the traffic manager dropped %s: %s", destination, exc)
            return
        try:
            if isinstance(local, trio.SocketStream):
                await splice(tunnel, local)
            else:
                await relay_udp(tunnel, local, idle_timeout=self.proxy_udp_idle)
        finally:
            tunnel.close()

    async def _follow_proxy_dials(
        self, client: Client, request: SessionRequest, nursery: trio.Nursery
    ) -> None:
        try:
            async with client.stream(aapi.WATCH_PROXY_DIALS, request) as dials:
                async for dial in dials:
                    nursery.start_soon(self._proxy_dial, dial)
        except RpcError as exc:
            if exc.code is not Code.UNIMPLEMENTED:  # (an older manager has no such call)
                log.info("the --proxy-via watch ended: %s", exc)

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Keep a session and the engagements current until cancelled. Started at once: the
        agent's ports must serve (transparently) before the manager answers."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.pool.serve)
            task_status.started()
            delay = self._retry_initial
            while True:
                try:
                    await self._session()
                    delay = self._retry_initial
                except* (TeleError, trio.BrokenResourceError) as group:
                    log.warning("traffic-manager session: %s", single_leaf(group))
                self.session_id = ""
                if self.files is not None:
                    self.files.forget()  # no session: the file servers refuse everyone
                self._set([])
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RETRY_MAX)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _authenticate(self, client: Client, presented: str) -> str:
        """Present the pod's token to the manager unless it was presented already; the
        manager learns from it (not from what the agent says) which pod this agent is."""
        token = await read_token(self.token_file)
        if token and token != presented:
            try:
                await client.call(
                    AUTHENTICATE,
                    AuthenticateRequest(token=token, agent=True),
                    timeout=ARRIVE_TIMEOUT,
                )
            except RpcError as exc:  # the arrival that follows says whether it matters
                log.warning("the traffic manager did not accept this pod's token: %s", exc)
                return presented
        return token or presented

    async def _follow_log_level(self, client: Client, request: SessionRequest) -> None:
        """The level `tele loglevel` asks of the agents; "" brings back the configured one."""
        configured = self._configured_level
        try:
            async with client.stream(aapi.WATCH_LOG_LEVEL, request) as levels:
                async for asked in levels:
                    level = asked.level or configured
                    if level not in logs.LEVELS:
                        log.warning("the traffic manager asked for an unknown log level")
                        continue
                    previous = logs.set_level(level)
                    if previous != level:
                        log.info("log level %s -> %s (tele loglevel)", previous, level)
        except RpcError as exc:
            if exc.code is not Code.UNIMPLEMENTED:  # (an older manager has no such call)
                log.info("the log level watch ended: %s", exc)

    async def _session(self) -> None:
        """One session: arrive, then remain and watch until either fails or the watch ends."""
        link = await self.pool.wait_ready()
        client = Client(link)
        token = await self._authenticate(client, "")
        info = await client.call(aapi.ARRIVE_AS_AGENT, self.agent, timeout=ARRIVE_TIMEOUT)
        if self.files is not None:
            if info.tls_cert and info.tls_ca:
                self.files.store(info.tls_cert, info.tls_ca)
            else:
                self.files.forget()
                log.warning("the traffic manager issued no certificate: volumes are not served")
        self.session_id = info.session_id
        self.manager_ips = frozenset(info.manager_ips) if info.manager_ips else None
        log.info("arrived at the traffic manager as session %s", info.session_id)
        request = SessionRequest(session_id=info.session_id)
        async with trio.open_nursery() as nursery:

            async def remain() -> None:
                nonlocal token
                while True:
                    await trio.sleep(info.lease_seconds / 3)
                    token = await self._authenticate(client, token)  # rotated: present anew
                    await client.call(REMAIN, request, timeout=info.lease_seconds / 3)

            async def report_taps() -> None:
                reported = -1
                while True:
                    if self.wiretaps.version != reported:
                        reported = self.wiretaps.version
                        report = aapi.TapReport(
                            session_id=info.session_id, taps=self.wiretaps.snapshot()
                        )
                        try:
                            await client.call(aapi.REPORT_TAPS, report, timeout=ARRIVE_TIMEOUT)
                        except RpcError as exc:  # an older manager: wiretaps go uncounted
                            log.info("cannot report wiretap counters: %s", exc)
                            return
                    await trio.sleep(TAP_REPORT_SECONDS)

            nursery.start_soon(remain)
            nursery.start_soon(self._follow_log_level, client, request)
            nursery.start_soon(report_taps)
            nursery.start_soon(self._follow_proxy_dials, client, request, nursery)
            async with client.stream(aapi.WATCH_ENGAGEMENTS, request) as lists:
                async for engagements in lists:
                    self._set(engagements.engagements)
            nursery.cancel_scope.cancel()  # the manager ended the watch: arrive again
