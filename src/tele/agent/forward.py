"""The agent ports: one listener per intercept, each connection routed when it arrives (UDP
ports: tele.agent.udp, each caller's flow routed the same way).

Routing per connection, from the engagements on its port at accept time:
- a `tcp` engagement: the whole connection goes to the engaging client;
- else an `http` engagement: the connection is parsed request by request (tele.agent.http), each
  request going to the first matching engagement's client or to the app;
- else (the default): bytes are relayed to the app untouched, so an idle agent is transparent;
  a replaced container has no app (the pod runs without it): such a connection is reset.
A connection keeps the mode it started with: engaging or leaving affects new connections (and,
in http mode, the next request), never bytes already in flight.

Wiretaps on the port (tele.agent.wiretap) do not change where the connection goes: what the
caller sends is copied to each of them as it is read, and (a wiretap with a response port)
what the caller is sent, without ever waiting for them (each wiretap's copy channel carries
the copies of all its connections).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NoReturn

import trio

from tele.agent import http
from tele.agent.config import AgentSettings
from tele.agent.engagements import EngagementSource
from tele.agent.errors import UpstreamFailed
from tele.agent.tls import TlsTermination
from tele.agent.udp import open_udp_sockets, serve_udp_port
from tele.agent.upstream import Upstreams, abort, relay
from tele.agent.wiretap import TappedStream
from tele.contracts import http1
from tele.contracts.agentconfig import Intercept
from tele.errors import ConnectionFailed
from tele.rpc.agent_api import Engagement

log = logging.getLogger(__name__)


async def open_listeners(settings: AgentSettings) -> dict[int, list[trio.SocketListener]]:
    """Listeners on every TCP agent port of the configuration, on all addresses (one port may
    need two: IPv4 and IPv6 sockets)."""
    listeners: dict[int, list[trio.SocketListener]] = {}
    try:
        for _, intercept in settings.intercepts():
            if intercept.protocol.upper() == "TCP":
                listeners[intercept.agent_port] = await trio.open_tcp_listeners(
                    intercept.agent_port
                )
    except OSError as exc:
        for opened in listeners.values():
            for listener in opened:
                await listener.aclose()
        raise ConnectionFailed(
            f"the traffic agent cannot listen on its port: {exc.strerror or exc}."
        ) from exc
    return listeners


async def serve(
    settings: AgentSettings,
    source: EngagementSource,
    *,
    listeners: Mapping[int, Sequence[trio.SocketListener]] | None = None,
    app_host: str = "127.0.0.1",
    tls: TlsTermination | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve every agent port until cancelled. `listeners` (by agent port) default to new ones;
    `tls` terminates callers' TLS on connections handled by the http mechanism."""
    if listeners is None:
        listeners = await open_listeners(settings)
    replaced = set(settings.config.replaced())
    async with trio.open_nursery() as nursery:
        await nursery.start(source.wiretaps.serve)  # the wiretaps' copy channels
        for container, intercept in settings.intercepts():
            if intercept.protocol.upper() == "UDP":
                for sock in await open_udp_sockets(intercept.agent_port):
                    nursery.start_soon(
                        partial(
                            serve_udp_port,
                            sock,
                            source,
                            agent_port=intercept.agent_port,
                            app=(app_host, intercept.container_port),
                            original_dst=(settings.pod_ip, intercept.container_port),
                            app_replaced=container in replaced,
                        )
                    )
                continue
            if intercept.protocol.upper() != "TCP":
                log.warning(
                    "%s port %d is %s; only TCP and UDP are served",
                    container,
                    intercept.container_port,
                    intercept.protocol,
                )
                continue
            upstreams = Upstreams(
                source=source,
                agent_port=intercept.agent_port,
                app=(app_host, intercept.container_port),
                original_dst=(settings.pod_ip, intercept.container_port),
                tls=tls,
                app_replaced=container in replaced,
            )
            nursery.start_soon(serve_port, listeners[intercept.agent_port], upstreams, intercept)
        task_status.started()
        # A pod may have no port to serve (a replaced or ingested worker): keep serving anyway.
        await trio.sleep_forever()
    raise AssertionError("unreachable: serve_port never returns")


async def serve_port(
    listeners: Sequence[trio.SocketListener], upstreams: Upstreams, intercept: Intercept
) -> NoReturn:
    async def handler(stream: trio.SocketStream) -> None:
        await handle_connection(stream, upstreams, intercept.app_protocol)

    await trio.serve_listeners(handler, list(listeners))


async def handle_connection(
    stream: trio.SocketStream, upstreams: Upstreams, app_protocol: str = ""
) -> None:
    """One accepted connection, whatever it sends: a failure ends this connection only (the
    traceback goes to the log), never the port's listener and with it the agent."""
    tapping = upstreams.source.taps(upstreams.agent_port)
    if tapping:
        await _handle_tapped(stream, upstreams, app_protocol, tapping)
        return
    async with stream:
        try:
            await _handle_connection(stream, upstreams, app_protocol)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("a connection on port %d ended: %s", upstreams.agent_port, exc)
        except Exception:
            log.exception("a connection on port %d failed; closed", upstreams.agent_port)
            abort(stream)


async def _handle_tapped(
    stream: trio.SocketStream,
    upstreams: Upstreams,
    app_protocol: str,
    tapping: Sequence[Engagement],
) -> None:
    """A connection with wiretaps: served as any other; its copies go into their wiretaps'
    channels, which nothing here waits for."""
    wiretaps = upstreams.source.wiretaps
    open_channel = upstreams.source.tap_channel
    where = upstreams.original_dst
    taps = [wiretaps.tap(engagement, open_channel, where) for engagement in tapping]
    response_taps = [
        wiretaps.tap(engagement, open_channel, where, response=True)
        for engagement in tapping
        if engagement.copy_responses
    ]
    tapped = TappedStream(stream, taps, response_taps)
    async with stream:
        try:
            await _handle_connection(tapped, upstreams, app_protocol)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("a connection on port %d ended: %s", upstreams.agent_port, exc)
        except Exception:
            log.exception("a connection on port %d failed; closed", upstreams.agent_port)
            abort(stream)
    for tap in (*taps, *response_taps):
        tap.end()


async def _handle_connection(
    stream: trio.abc.HalfCloseableStream, upstreams: Upstreams, app_protocol: str = ""
) -> None:
    """Route one accepted connection (see the module docstring)."""
    engaged = upstreams.source.current(upstreams.agent_port)
    whole = next((e for e in engaged if e.mechanism == "tcp"), None)
    if whole is None and any(e.mechanism == "http" for e in engaged):
        await _serve_http(stream, upstreams, app_protocol)
        return
    try:
        # Whole connections are relayed as they come (TLS included): only the http
        # mechanism decrypts, so only it re-encrypts towards the app.
        target = await dataclasses.replace(upstreams, tls=None).open(whole)
    except UpstreamFailed as exc:
        log.warning("%s", exc)
        if whole is None:
            abort(stream)  # as the app itself would: nothing listens
        else:
            await refuse(stream, f"tele: {exc}")
        return
    async with target:
        await relay(stream, target)


async def refuse(stream: trio.abc.HalfCloseableStream, sentence: str) -> None:
    """An engaged caller nobody can serve: an HTTP/1 caller gets a 502 whose body is
    `sentence` (then its request is drained, bounded); any other a reset."""
    head = b""
    try:
        with trio.move_on_after(http1.SNIFF_WAIT):
            while b"\n" not in head and len(head) < http1.SNIFF_MAX:
                data = await stream.receive_some(http1.SNIFF_MAX - len(head))
                if not data:
                    break
                head += data
        if not http1.looks_like_http1(head):
            abort(stream)
            return
        await stream.send_all(http1.bad_gateway(sentence))
        await stream.send_eof()
        drained = 0
        with trio.move_on_after(http1.DRAIN_WAIT):
            while drained < http1.DRAIN_MAX and (data := await stream.receive_some(65536)):
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("an engaged caller nobody serves went away: %s", exc)


async def _serve_http(
    stream: trio.abc.HalfCloseableStream, upstreams: Upstreams, app_protocol: str
) -> None:
    if upstreams.tls is None:
        await http.serve_connection(stream, upstreams, app_protocol=app_protocol)
        return
    try:
        secured = await upstreams.tls.accept(stream)
    except UpstreamFailed as exc:
        log.info("%s", exc)
        return
    alpn = secured.selected_alpn_protocol()
    await http.serve_connection(
        secured, dataclasses.replace(upstreams, alpn=alpn), app_protocol=app_protocol
    )
