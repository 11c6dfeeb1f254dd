"""The laptop side of engaged traffic: answer the manager's "dial back" requests by opening a
DIAL-BACK tunnel stream and relaying it to the local handler (see tele.rpc.agent_api)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

from tele.contracts.http1 import (
    DRAIN_MAX,
    DRAIN_WAIT,
    SNIFF_MAX,
    SNIFF_WAIT,
    bad_gateway,
    looks_like_http1,
)
from tele.net.tunnel import Destination, Protocol, ResetReason
from tele.rpc import agent_api as aapi
from tele.rpc.client import Client
from tele.rpc.errors import RpcError
from tele.rpc.h2link import H2Stream
from tele.rpc.manager_api import SessionRequest
from tele.rpc.tapcopies import serve_copies
from tele.rpc.tunnel import TunnelError, relay_udp, reset, splice

log = logging.getLogger(__name__)

DialBack = Callable[[Destination, str], Awaitable[H2Stream]]
"""Opens a DIAL-BACK stream for (original destination, dial id)."""
Target = Callable[[str, int], tuple[str, int] | None]
"""Where the local handler of (engagement id, container port) listens (None: not ours, or
gone)."""
Describe = Callable[[str], str]
"""The engagement's name for an engagement id (for the answer to a caller nobody serves)."""
LocalTls = Callable[[str], ssl.SSLContext | None]
"""For an engagement id, the TLS context to speak to its local handler with (None: plaintext).
The agent decrypted the callers' TLS to read their requests; a local handler that is the same
app as the cluster's speaks TLS as it does, unless the user said `--http-plaintext`."""


def _plaintext(_: str) -> ssl.SSLContext | None:
    return None


def _no_name(engagement_id: str) -> str:
    return engagement_id


def not_listening_response(name: str, where: tuple[str, int]) -> bytes:
    """The 502 an HTTP/1 caller gets when the local handler of engagement `name` is not up."""
    host, port = where
    return bad_gateway(f"tele: nothing listens on {host}:{port}, the local handler of {name}")


def local_tls_context() -> ssl.SSLContext:
    """TLS towards a local handler on this machine: its certificate is the workload's (made
    for the cluster's names), so neither the name nor the issuer is checked."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _TlsToLocal(trio.abc.HalfCloseableStream):
    """A TLS stream to the local handler for `splice`: TLS has no half-close, so the caller's
    end of request is not passed on (the handler answers and the agent ends the exchange)."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.stream.aclose()


async def serve_dial_backs(
    client: Client,
    session_id: str,
    dial_back: DialBack,
    target: Target,
    local_tls: LocalTls = _plaintext,
    describe: Describe = _no_name,
    *,
    endpoint_dial: float = 3.0,
) -> None:
    """Follow WATCH_DIALS until it ends; each request is served on its own task; a local
    handler that does not accept within `endpoint_dial` seconds is a refused connection.

    The watch's own failure (the manager link broke) is raised as the RpcError it is, not
    wrapped in the nursery's exception group, so that the caller can watch again.
    """
    failure: RpcError | None = None
    async with trio.open_nursery() as nursery:
        try:
            request = SessionRequest(session_id=session_id)
            async with client.stream(aapi.WATCH_DIALS, request) as dials:
                async for dial in dials:
                    nursery.start_soon(
                        _serve_one, dial, dial_back, target, local_tls, describe, endpoint_dial
                    )
        except RpcError as exc:
            failure = exc
    if failure is not None:
        raise failure


async def _serve_one(
    dial: aapi.DialRequest,
    dial_back: DialBack,
    target: Target,
    local_tls: LocalTls,
    describe: Describe,
    endpoint_dial: float,
) -> None:
    """One engaged connection; whatever goes wrong with it stays with it."""
    try:
        await _relay(dial, dial_back, target, local_tls, describe, endpoint_dial)
    except Exception:
        log.exception("engaged connection for %s failed", dial.engagement_id)


async def _relay(
    dial: aapi.DialRequest,
    dial_back: DialBack,
    target: Target,
    local_tls: LocalTls,
    describe: Describe,
    endpoint_dial: float,
) -> None:
    # A wiretap's copy of the app's answers goes to its response handler (key 0: no
    # container port is 0; see tele.daemon.engagements.RESPONSE_TARGET).
    where = target(dial.engagement_id, 0 if dial.response else dial.original_port)
    if dial.protocol == Protocol.UDP.value:
        await _relay_udp(dial, dial_back, where)
        return
    destination = Destination(
        Protocol.TCP, ipaddress.ip_address(dial.original_host), dial.original_port
    )
    if dial.channel:
        await _serve_tap_channel(dial, dial_back, destination, where, local_tls, endpoint_dial)
        return
    local: trio.abc.HalfCloseableStream | None = None
    if where is not None:
        tls = None if dial.response else local_tls(dial.engagement_id)
        local = await _open_local(where, tls, endpoint_dial)
    try:
        stream = await dial_back(destination, dial.dial_id)
    except (TunnelError, RpcError) as exc:
        log.warning("engaged connection: cannot dial back: %s", exc)
        if local is not None:
            await local.aclose()
        return
    if local is None:
        try:
            if where is None or dial.wiretap:
                reset(stream, ResetReason.REFUSED)
            else:
                await refuse(stream, describe(dial.engagement_id), where)
        finally:
            stream.close()
        return
    async with local:
        try:
            await splice(stream, local)
        finally:
            stream.close()


async def _serve_tap_channel(
    dial: aapi.DialRequest,
    dial_back: DialBack,
    destination: Destination,
    where: tuple[str, int] | None,
    local_tls: LocalTls,
    endpoint_dial: float,
) -> None:
    """A wiretap's copy channel: each copied connection to the handler at `where`."""
    try:
        stream = await dial_back(destination, dial.dial_id)
    except (TunnelError, RpcError) as exc:
        log.warning("wiretap copies: cannot dial back: %s", exc)
        return
    if where is None:  # the wiretap ended here meanwhile
        reset(stream, ResetReason.REFUSED)
        return
    handler = where
    tls = None if dial.response else local_tls(dial.engagement_id)

    async def connect() -> trio.abc.HalfCloseableStream | None:
        return await _open_local(handler, tls, endpoint_dial)

    try:
        await serve_copies(stream, connect)
    finally:
        stream.close()


async def refuse(stream: H2Stream, name: str, where: tuple[str, int]) -> None:
    """Nothing listens at `where`, the local handler of engagement `name`: an HTTP/1 caller
    gets a 502 naming both (then its request is drained, bounded); any other a reset."""
    head = b""
    try:
        with trio.move_on_after(SNIFF_WAIT):
            while b"\n" not in head and len(head) < SNIFF_MAX:
                data = await stream.receive_some(SNIFF_MAX - len(head))
                if not data:
                    break
                head += data
        if not looks_like_http1(head):
            reset(stream, ResetReason.REFUSED)
            return
        await stream.send_all(not_listening_response(name, where))
        await stream.send_eof()
        drained = 0
        with trio.move_on_after(DRAIN_WAIT):
            while drained < DRAIN_MAX and (data := await stream.receive_some(SNIFF_MAX)):
                drained += len(data)
    except trio.BrokenResourceError as exc:
        log.debug("engaged connection to %s:%d (not listening) ended: %s", *where, exc)


async def _relay_udp(
    dial: aapi.DialRequest, dial_back: DialBack, where: tuple[str, int] | None
) -> None:
    """One caller's UDP flow: its datagrams to the local handler from a socket of its own, the
    handler's replies back, until the flow is idle (tele.rpc.tunnel.relay_udp)."""
    destination = Destination(
        Protocol.UDP, ipaddress.ip_address(dial.original_host), dial.original_port
    )
    try:
        stream = await dial_back(destination, dial.dial_id)
    except (TunnelError, RpcError) as exc:
        log.warning("engaged UDP flow: cannot dial back: %s", exc)
        return
    if where is None:
        reset(stream, ResetReason.REFUSED)
        return
    family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
    try:
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.connect(where)
            await relay_udp(stream, sock)
    finally:
        stream.close()


async def _open_local(
    where: tuple[str, int], tls: ssl.SSLContext | None, timeout: float = 3.0
) -> trio.abc.HalfCloseableStream | None:
    """The connection to the local handler (TLS when `tls`), or None with the reason logged;
    one that does not accept within `timeout` seconds counts as refused."""
    try:
        with trio.move_on_after(timeout) as dialing:
            plain = await trio.open_tcp_stream(*where)
    except OSError as exc:
        log.warning("engaged connection: local handler %s:%d: %s", *where, exc.strerror or exc)
        return None
    if dialing.cancelled_caught:
        log.warning(
            "engaged connection: the local handler %s:%d did not accept within %gs "
            "(config timeouts.endpointDial)",
            *where,
            timeout,
        )
        return None
    if tls is None:
        return plain
    # https_compatible: HTTP servers close without TLS's close_notify; that is an end, not a
    # failure.
    secured = trio.SSLStream(plain, tls, server_hostname=where[0], https_compatible=True)
    try:
        await secured.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        log.warning(
            "engaged connection: the local handler %s:%d does not speak TLS (%s); "
            "use --http-plaintext for a plaintext handler",
            *where,
            exc.__cause__ or exc,
        )
        await plain.aclose()
        return None
    return _TlsToLocal(secured)
