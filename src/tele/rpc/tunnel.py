"""Tunnel streams over an h2 link: `dial()` on the opening side, `TunnelServer` on the serving
side (policy check, dial the real TCP/UDP destination, relay both ways), and `splice()`, the
bounded two-way relay between a tunnel stream and a local stream.

The message kinds and their encoding live in `tele.net.tunnel`; this module is the I/O edge that
turns h2, socket and codec errors into `TunnelError` (a `ConnectionFailed`) with a `ResetReason`.
Memory per stream is bounded: one read (`READ_SIZE`) in flight per direction, and h2 returns
flow-control credit only as a reader consumes, so a stalled reader stalls only its own sender.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from tele.errors import ConnectionFailed
from tele.net.tunnel import (
    MAX_DATAGRAM,
    MAX_TUNNEL_STREAMS,
    Accept,
    DatagramDecoder,
    Destination,
    OpenRequest,
    Protocol,
    Refuse,
    ResetReason,
    TunnelProtocolError,
    decode_response,
    encode_datagram,
    reason_from_code,
    reason_to_code,
)
from tele.rpc.h2link import H2Link, H2Stream, LinkBroken, StreamReset

log = logging.getLogger(__name__)

READ_SIZE: Final = 256 * 1024
"""Bytes per read on either side of a relay: 64 KiB reads cost ~30% of a trio relay's speed."""
DIAL_TIMEOUT: Final = 10.0
UDP_IDLE_TIMEOUT: Final = 60.0
"""A UDP flow with no datagram either way for this long ends (UDP has no close)."""


class TunnelError(ConnectionFailed):
    """A tunnel stream was refused or reset; `reason` says why."""

    def __init__(self, reason: ResetReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TunnelRefused(TunnelError, trio.BrokenResourceError):
    """REFUSE for a stream opened optimistically, raised by its send or receive calls; a
    `trio.BrokenResourceError` too, so stream code (e.g. `splice`) treats it as a reset."""


_REASON_TEXT: Final = {
    ResetReason.REFUSED: "refused the connection",
    ResetReason.UNREACHABLE: "is unreachable",
    ResetReason.TIMEOUT: "did not answer in time",
    ResetReason.POLICY: "is not allowed by the traffic manager's policy",
    ResetReason.RESET: "reset the connection",
    ResetReason.CANCELLED: "was cancelled by the other side",
    ResetReason.OVERLOADED: "was refused: the tunnel has too many streams; retry later",
    ResetReason.PROTOCOL: "was refused: the tunnel peer sent a malformed message",
    ResetReason.INTERNAL: "failed inside the tunnel peer (see its log)",
}


def _tunnel_error(
    reason: ResetReason, destination: Destination | str, detail: str = ""
) -> TunnelError:
    return TunnelError(reason, detail or f"{destination} {_REASON_TEXT[reason]}")


def reset_reason(exc: BaseException) -> ResetReason:
    """The reason behind an error raised by a tunnel stream's send/receive."""
    if isinstance(exc, TunnelError):
        return exc.reason
    if isinstance(exc, StreamReset):
        return reason_from_code(exc.error_code)
    if isinstance(exc, LinkBroken):
        return ResetReason.INTERNAL
    return ResetReason.CANCELLED


def reset(stream: H2Stream, reason: ResetReason) -> None:
    """RESET: abort a tunnel stream both ways, telling the peer why."""
    stream.reset(reason_to_code(reason))


# -- opening side ---------------------------------------------------------------------------


async def dial(
    link: H2Link,
    destination: Destination,
    *,
    session: str,
    dial_id: str | None = None,
    optimistic: bool = False,
) -> H2Stream:
    """OPEN (or DIAL-BACK with `dial_id`) a tunnel stream and wait for ACCEPT.

    Returns the stream ready for DATA (a trio HalfCloseableStream: `send_eof` is HALF-CLOSE).
    Raises `TunnelError` for REFUSE, a reset, or a broken link. Cancellation resets the stream.

    `optimistic=True` returns right after queueing OPEN (without a schedule point when the link
    has room for the stream), without the round trip to ACCEPT: DATA may follow the OPEN at
    once (the server holds it, within the stream window, until its dial is up). A REFUSE then
    surfaces from the stream's next send or receive as `TunnelRefused` with the reason, and
    whatever was sent is dropped. For callers that must know the outcome
    before going on (the VIF answers a SYN only after the dial), leave it False.
    """
    if optimistic:  # no schedule point: the OPEN is queued in the caller's step
        stream = open_now(link, destination, session=session, dial_id=dial_id)
        if stream is not None:
            return stream  # else wait for room below (or learn why the link is unusable)
    request = OpenRequest(destination, session, dial_id, early=optimistic)
    try:
        stream = await link.open_stream(request.to_headers())
    except LinkBroken as exc:
        raise TunnelError(ResetReason.INTERNAL, f"no tunnel to {destination}: {exc}") from exc
    if optimistic:
        stream.response_check = functools.partial(_judge_response, destination)
        return stream
    try:
        headers = await stream.receive_response()
        response = decode_response(headers)
    except TunnelProtocolError as exc:
        log.warning("tunnel to %s: bad response, resetting: %s", destination, exc)
        reset(stream, ResetReason.PROTOCOL)
        raise _tunnel_error(ResetReason.PROTOCOL, destination) from exc
    except LinkBroken as exc:
        raise TunnelError(
            ResetReason.INTERNAL, f"the tunnel to {destination} broke off: {exc}"
        ) from exc
    except trio.BrokenResourceError as exc:  # StreamReset, or ended without a response
        raise _tunnel_error(reset_reason(exc), destination) from exc
    except BaseException:
        reset(stream, ResetReason.CANCELLED)
        raise
    if isinstance(response, Refuse):
        stream.close()
        raise _tunnel_error(response.reason, destination, response.detail)
    return stream


def open_now(
    link: H2Link, destination: Destination, *, session: str, dial_id: str | None = None
) -> H2Stream | None:
    """`dial(optimistic=True)` with no schedule point at all, for a caller that is not a
    task (the VIF's packet reader opens an early-accepted connection's stream itself): the
    OPEN is queued and the stream returned. None when that cannot be done now: at the peer's
    stream limit, or with the link unusable (`dial` then waits for room, or says why)."""
    request = OpenRequest(destination, session, dial_id, early=True)
    try:
        stream = link.open_stream_now(request.to_headers())
    except (trio.WouldBlock, LinkBroken):
        return None
    stream.response_check = functools.partial(_judge_response, destination)
    return stream


def _judge_response(destination: Destination, headers: list[tuple[str, str]]) -> TunnelError | None:
    """The answer to an optimistic OPEN: None for ACCEPT, else the error its stream raises."""
    try:
        response = decode_response(headers)
    except TunnelProtocolError as exc:
        log.warning("tunnel to %s: bad response: %s", destination, exc)
        return TunnelRefused(
            ResetReason.PROTOCOL, f"{destination} {_REASON_TEXT[ResetReason.PROTOCOL]}"
        )
    if isinstance(response, Refuse):
        return TunnelRefused(
            response.reason,
            response.detail or f"{destination} {_REASON_TEXT[response.reason]}",
        )
    return None


# -- relaying ---------------------------------------------------------------------------------


def _abort(local: trio.abc.Stream) -> None:
    """Make closing `local` a TCP RST, so the reset reaches the far end as a reset."""
    if isinstance(local, trio.SocketStream):
        try:
            local.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


def _failer(
    tunnel: H2Stream, local: trio.abc.Stream, outcome: list[ResetReason]
) -> Callable[..., None]:
    """A relay's `fail(reason, tunnel_side=, scope=)`: the first failure is the relay's outcome
    and resets the other side (a TCP RST for a tunnel reset, RST_STREAM for a local failure);
    every failure ends the relay's nursery (`scope`)."""

    def fail(reason: ResetReason, *, tunnel_side: bool, scope: trio.CancelScope) -> None:
        if not outcome:
            outcome.append(reason)
            if tunnel_side:
                _abort(local)  # the tunnel was reset: reset the local connection too
            else:
                reset(tunnel, reason)
        scope.cancel()

    return fail


async def splice(
    tunnel: H2Stream, local: trio.abc.HalfCloseableStream, *, read_size: int = READ_SIZE
) -> ResetReason | None:
    """Relay between a tunnel stream and a local stream until both directions have ended.

    HALF-CLOSE is forwarded both ways (EOF -> `send_eof`). A reset on either side aborts the
    other (RST_STREAM with RESET for a local failure; a TCP RST for a tunnel reset). Returns None
    after a clean end, else the reason of the reset. Closes neither stream.
    """
    if isinstance(local, trio.SocketStream):
        return await _splice_socket(tunnel, local, read_size)
    outcome: list[ResetReason] = []
    fail = _failer(tunnel, local, outcome)

    async def tunnel_to_local(scope: trio.CancelScope) -> None:
        while True:
            try:
                data = await tunnel.receive_some(read_size)
            except trio.BrokenResourceError as exc:
                fail(reset_reason(exc), tunnel_side=True, scope=scope)
                return
            if not data:
                break
            try:
                await local.send_all(data)
            except (trio.BrokenResourceError, OSError):
                fail(ResetReason.RESET, tunnel_side=False, scope=scope)
                return
        try:
            await local.send_eof()
        except (trio.BrokenResourceError, OSError):
            fail(ResetReason.RESET, tunnel_side=False, scope=scope)

    async def local_to_tunnel(scope: trio.CancelScope) -> None:
        while True:
            try:
                data = await local.receive_some(read_size)
            except (trio.BrokenResourceError, OSError):
                fail(ResetReason.RESET, tunnel_side=False, scope=scope)
                return
            if not data:
                break
            try:
                await tunnel.send_all(data)
            except trio.BrokenResourceError as exc:
                fail(reset_reason(exc), tunnel_side=True, scope=scope)
                return
        try:
            await tunnel.send_eof()
        except trio.BrokenResourceError as exc:
            fail(reset_reason(exc), tunnel_side=True, scope=scope)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(local_to_tunnel, nursery.cancel_scope)
            await tunnel_to_local(nursery.cancel_scope)  # this task does one direction itself
    finally:
        tunnel.deliver_to(None)
    return outcome[0] if outcome else None


_YIELD_EVERY: Final = 4
"""Reads of a busy socket in a row after which the relay yields to the scheduler anyway."""


class _Push:
    """A socket relay's state while its one task reads the socket and the link's reader does
    the other direction (`H2Stream.push_to`)."""

    __slots__ = ("half_closed", "interrupt", "waiting", "wanted")

    def __init__(self) -> None:
        self.half_closed = False  # tunnel -> local is over: the socket is shut for writing
        self.wanted = False  # tunnel -> local needs a task (bytes the socket did not take, ...)
        self.waiting = False  # the task waits for the socket to be readable: it may be woken
        self.interrupt = trio.CancelScope()

    def wake(self) -> None:
        self.wanted = True
        if self.waiting:
            self.interrupt.cancel()


async def _splice_socket(
    tunnel: H2Stream, local: trio.SocketStream, read_size: int
) -> ResetReason | None:
    """`splice` for a socket: the same contract, on the descriptor itself, in one task as long
    as nothing has to wait for the socket to take bytes.

    A read or write the kernel can do at once costs no trip through trio's scheduler (trio's
    socket methods yield once per call, even when nothing had to wait). The link's reader
    writes the tunnel's DATA to the socket and half-closes it at the tunnel's end, while this
    task reads the socket; only when the socket would not take the tunnel's bytes (or the
    stream is reset) does tunnel -> local get a task of its own. A new connection's relay
    starts no task and passes through no nursery (each costs a scheduler pass)."""
    outcome: list[ResetReason] = []
    fail = _failer(tunnel, local, outcome)
    sock = local.socket
    fd = sock.fileno()
    push = _Push()

    def half_close() -> bool:
        """The tunnel ended (the link's reader, at END_STREAM with nothing buffered)."""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False  # a task meets the error again and resets
        push.half_closed = True
        return True

    async def tunnel_to_local(scope: trio.CancelScope, view: memoryview | None = None) -> None:
        write = os.write
        while True:
            if view is None:
                try:
                    data = await tunnel.receive_some(read_size)  # one yield per call
                except trio.BrokenResourceError as exc:
                    fail(reset_reason(exc), tunnel_side=True, scope=scope)
                    return
                if not data:
                    break
                view = memoryview(data)
                del data
            try:
                while view:
                    try:
                        view = view[write(fd, view) :]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(fd)
            except OSError:
                fail(ResetReason.RESET, tunnel_side=False, scope=scope)
                return
            view = None
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            fail(ResetReason.RESET, tunnel_side=False, scope=scope)

    async def local_to_tunnel(scope: trio.CancelScope, alone: bool = False) -> bool:
        """Until the socket's EOF is on the tunnel (True), or (`alone`: while the link's reader
        does the other direction) until tunnel -> local needs a task (False)."""
        read = os.read
        streak = 0  # reads in a row that found data without waiting
        while True:
            if alone and push.wanted:
                return False
            try:
                data = read(fd, read_size)
            except BlockingIOError:
                streak = 0
                if alone:
                    push.waiting = True
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    finally:
                        push.waiting = False
                else:
                    await trio.lowlevel.wait_readable(fd)
                continue
            except OSError:
                fail(ResetReason.RESET, tunnel_side=False, scope=scope)
                return True
            if not data:
                break
            try:
                sent = tunnel.send_now(data)
                if sent < len(data):
                    await tunnel.send_all(memoryview(data)[sent:] if sent else data)
                    streak = 0
                else:
                    streak += 1
                    if streak >= _YIELD_EVERY:
                        streak = 0
                        await trio.lowlevel.checkpoint()
            except trio.BrokenResourceError as exc:
                fail(reset_reason(exc), tunnel_side=True, scope=scope)
                return True
            del data
        try:
            if not tunnel.send_eof_now():  # else without the schedule point of `send_eof`
                await tunnel.send_eof()
        except trio.BrokenResourceError as exc:
            fail(reset_reason(exc), tunnel_side=True, scope=scope)
        return True

    local_done = False
    rest: memoryview | None = None  # of what the tunnel had sent before the relay began
    try:
        with push.interrupt:
            # What the tunnel sent before the relay began (an early OPEN's first bytes, even
            # its end) goes to the socket now, as the link's reader would have written it.
            while not push.wanted:
                try:
                    early = tunnel.receive_now(read_size)
                except trio.BrokenResourceError as exc:
                    fail(reset_reason(exc), tunnel_side=True, scope=push.interrupt)
                    return outcome[0]
                if early is None:
                    tunnel.push_to(fd, wake=push.wake, end=half_close)
                    break
                if not early:
                    if not half_close():
                        push.wanted = True
                    break
                try:
                    sent = os.write(fd, early)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    fail(ResetReason.RESET, tunnel_side=False, scope=push.interrupt)
                    return outcome[0]
                if sent < len(early):
                    rest = memoryview(early)[sent:]
                    push.wanted = True
                del early
            local_done = await local_to_tunnel(push.interrupt, alone=True)
        if outcome:
            return outcome[0]
        if push.half_closed:
            if not local_done:
                await local_to_tunnel(push.interrupt)
        else:
            # Tunnel -> local needs a task, or waits for the tunnel's end: in the relay's own
            # task (the link's reader writes DATA to the socket while it waits in receive_some).
            tunnel.deliver_to(fd)
            if local_done:
                await tunnel_to_local(push.interrupt, rest)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(local_to_tunnel, nursery.cancel_scope)
                    await tunnel_to_local(nursery.cancel_scope, rest)
    finally:
        tunnel.deliver_to(None)  # before anyone closes `local` (its descriptor may be reused)
    return outcome[0] if outcome else None


# -- serving side -----------------------------------------------------------------------------

Verdict = ResetReason | Refuse | None
Policy = Callable[[OpenRequest], Verdict]
"""Decides at once whether an OPEN may proceed: None allows it, a reason (or a REFUSE with the
sentence the opener logs) refuses it. Called as the OPEN arrives (`TunnelServer.prepare`)."""
TcpConnector = Callable[[Destination], Awaitable[trio.SocketStream]]
DialBackHandler = Callable[[OpenRequest, H2Stream], Awaitable[None]]

_ERRNO_REASON: Final = {
    errno.ECONNREFUSED: ResetReason.REFUSED,
    errno.ENETUNREACH: ResetReason.UNREACHABLE,
    errno.EHOSTUNREACH: ResetReason.UNREACHABLE,
    errno.ENETDOWN: ResetReason.UNREACHABLE,
    errno.EHOSTDOWN: ResetReason.UNREACHABLE,
    errno.EADDRNOTAVAIL: ResetReason.UNREACHABLE,
    errno.ETIMEDOUT: ResetReason.TIMEOUT,
    errno.EACCES: ResetReason.POLICY,
    errno.EPERM: ResetReason.POLICY,
}


def reason_for_oserror(exc: OSError) -> ResetReason:
    return _ERRNO_REASON.get(exc.errno or 0, ResetReason.INTERNAL)


@dataclass(slots=True)
class PendingDial:
    """A TCP dial that `start_tcp` began: its socket, the address and `connect_ex`'s first
    answer (0, EINPROGRESS, or the error). `finish_tcp` completes it; `abort` drops it."""

    sock: socket.socket
    address: tuple[str, int]
    error: int

    def abort(self) -> None:
        """Close the socket; the destination sees a reset if its side was up already."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def start_tcp(destination: Destination) -> PendingDial:
    """The synchronous half of `connect_tcp`: make a non-blocking socket and send the SYN,
    without a schedule point. Raises OSError only when no socket can be made (EMFILE)."""
    family = socket.AF_INET6 if destination.ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    address = (str(destination.ip), destination.port)
    try:
        return PendingDial(sock, address, sock.connect_ex(address))
    except BaseException:
        sock.close()
        raise


async def finish_tcp(dial: PendingDial) -> trio.SocketStream:
    """Wait out the handshake `start_tcp` began: the connected stream, or OSError. On any
    failure (cancellation too) the socket is closed with a reset."""
    sock, error = dial.sock, dial.error
    try:
        if error in (errno.EINPROGRESS, errno.EAGAIN):
            # A destination on this host (a pod on this node) has mostly answered before the
            # call returned: asking again says so (0) without a wait for writability, which is
            # a scheduler pass; EALREADY: still under way.
            error = sock.connect_ex(dial.address)
            if error == errno.EALREADY:
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            elif error == errno.EISCONN:
                error = 0
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        # Cancelled (the opener reset the stream) when the handshake may have completed: the
        # destination must see a reset, not an orderly end.
        dial.abort()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def connect_tcp(destination: Destination) -> trio.SocketStream:
    """Dial an IP literal directly: no resolver, no happy-eyeballs nursery per stream, and no
    trip through the scheduler beyond the wait for the handshake."""
    return await finish_tcp(start_tcp(destination))


@dataclass(slots=True)
class _Prepared:
    """What `TunnelServer.prepare` found as an OPEN arrived, for its handler: the request, the
    policy's verdict and (allowed TCP) the dial under way."""

    request: OpenRequest
    verdict: Verdict
    dial: PendingDial | None = None


class TunnelServer:
    """Serves OPEN streams: checks them, dials the destination, relays until both sides end.

    Use `handle` as the link's stream handler (or `Router.raw(TunnelServer.matches, handle,
    prepare=prepare)`). DIAL-BACK streams (with a dial id) go to `dial_back`; without one they
    are refused.
    """

    def __init__(
        self,
        *,
        policy: Policy | None = None,
        dial_timeout: float = DIAL_TIMEOUT,
        max_streams: int = MAX_TUNNEL_STREAMS,
        connector: TcpConnector = connect_tcp,
        plain: Callable[[Destination], bool] | None = None,
        dial_back: DialBackHandler | None = None,
        udp_idle_timeout: float = UDP_IDLE_TIMEOUT,
        read_size: int = READ_SIZE,
    ) -> None:
        self.policy = policy
        self.dial_timeout = dial_timeout
        self.max_streams = max_streams
        self.connector = connector
        self.plain = plain
        """Which destinations `connector` would dial as `connect_tcp` does (those `prepare`
        dials itself); None: all of them when the connector is `connect_tcp`, else none."""
        self.dial_back = dial_back
        self.udp_idle_timeout = udp_idle_timeout
        self.read_size = read_size
        self.active = 0

    @staticmethod
    def matches(stream: H2Stream) -> bool:
        return stream.header(":method") == "CONNECT"

    def prepare(self, stream: H2Stream) -> None:
        """As an OPEN arrives, in the link reader's step: check it with the policy and start
        the TCP dial, so that its handler (a task that runs a scheduler pass later, behind
        whatever else is ready then: another stream's teardown, say) finds the handshake done
        or under way. Anything unusual is left to `handle` as before."""
        try:
            request = OpenRequest.from_headers(stream.request_headers)
        except TunnelProtocolError:
            return
        if self.active >= self.max_streams:
            return
        verdict = self._ask(request)
        prepared = _Prepared(request, verdict)
        destination = request.destination
        if (
            verdict is None
            and request.dial_id is None
            and destination.protocol is Protocol.TCP
            and self._plain(destination)
        ):
            try:
                prepared.dial = start_tcp(destination)
            except OSError:
                pass  # no socket now (EMFILE): the handler dials and says why
        stream.prepared = prepared

    def _ask(self, request: OpenRequest) -> Verdict:
        return None if self.policy is None else self.policy(request)

    def _plain(self, destination: Destination) -> bool:
        if self.plain is not None:
            return self.plain(destination)
        return self.connector is connect_tcp

    async def handle(self, stream: H2Stream) -> None:
        prepared = stream.prepared
        stream.prepared = None
        if isinstance(prepared, _Prepared):
            request, verdict, dial = prepared.request, prepared.verdict, prepared.dial
        else:  # a link without the prepare hook, or an OPEN `prepare` left alone
            try:
                request = OpenRequest.from_headers(stream.request_headers)
            except TunnelProtocolError as exc:
                log.warning("tunnel: refusing a malformed OPEN: %s", exc)
                self._refuse(stream, ResetReason.PROTOCOL)
                return
            verdict, dial = self._ask(request), None
        try:
            if self.active >= self.max_streams:
                log.warning("tunnel: refusing %s: %d streams already open", request, self.active)
                self._refuse(stream, ResetReason.OVERLOADED)
                return
            self.active += 1
            try:
                if verdict is not None:
                    refusal = verdict if isinstance(verdict, Refuse) else Refuse(verdict)
                    log.info(
                        "tunnel: %s refused by policy (%s)",
                        request.destination,
                        refusal.detail or refusal.reason.value,
                    )
                    self._refuse(stream, refusal)
                    return
                if request.dial_id is not None:
                    if self.dial_back is None:
                        self._refuse(stream, ResetReason.POLICY)
                    else:
                        await self.dial_back(request, stream)
                elif request.destination.protocol is Protocol.TCP:
                    taken, dial = dial, None
                    await self._serve_tcp(request, stream, taken)
                else:
                    await self._serve_udp(request.destination, stream)
            finally:
                self.active -= 1
        finally:
            if dial is not None:  # not used: refused, or the handler ended before it
                dial.abort()

    def _refuse(self, stream: H2Stream, reason: ResetReason | Refuse) -> None:
        """Queue a REFUSE (no schedule point: the handler ends right after it)."""
        refusal = reason if isinstance(reason, Refuse) else Refuse(reason)
        try:
            stream.send_response_now(refusal.to_headers(), end_stream=True)
        except trio.BrokenResourceError:
            pass  # the opener gave up already

    async def _serve_tcp(
        self, request: OpenRequest, stream: H2Stream, dial: PendingDial | None
    ) -> None:
        destination = request.destination
        with trio.move_on_after(self.dial_timeout) as scope:
            try:
                if dial is not None:
                    local = await finish_tcp(dial)
                else:
                    local = await self.connector(destination)
            except OSError as exc:
                reason = reason_for_oserror(exc)
                log.info("tunnel: dial %s failed: %s", destination, exc.strerror or exc)
                self._refuse(stream, reason)
                return
        if scope.cancelled_caught:
            log.info("tunnel: dial %s timed out after %gs", destination, self.dial_timeout)
            self._refuse(stream, ResetReason.TIMEOUT)
            return
        try:
            if not request.early:  # else ACCEPT rides on the first DATA (or END_STREAM)
                stream.send_response_now(Accept().to_headers())
            outcome = await splice(stream, local, read_size=self.read_size)
        except BaseException as exc:
            if stream.was_reset:
                # The opener reset the stream before the relay ran (its reset also cancels
                # this handler): the destination sees a reset too, not a clean end.
                _abort(local)
                if isinstance(exc, trio.BrokenResourceError):
                    return
            raise
        finally:
            local.socket.close()  # not `aclose()`: its extra yield is a wake-up per connection
        if outcome is not None:
            log.debug("tunnel: %s ended with a reset (%s)", destination, outcome.value)

    async def _serve_udp(self, destination: Destination, stream: H2Stream) -> None:
        family = socket.AF_INET6 if destination.ip.version == 6 else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                await sock.connect((str(destination.ip), destination.port))
            except OSError as exc:
                self._refuse(stream, reason_for_oserror(exc))
                return
            try:
                await stream.send_response(Accept().to_headers())
            except trio.BrokenResourceError:
                return
            await relay_udp(stream, sock, idle_timeout=self.udp_idle_timeout)


async def relay_udp(
    tunnel: H2Stream, sock: trio.socket.SocketType, *, idle_timeout: float = UDP_IDLE_TIMEOUT
) -> ResetReason | None:
    """Relay datagrams between a tunnel stream (DATAGRAM framing) and a connected UDP socket
    until the tunnel ends or the flow is idle for `idle_timeout` (then HALF-CLOSE)."""

    async def from_socket() -> bytes | None:
        return await sock.recv(MAX_DATAGRAM)

    async def to_socket(datagram: bytes) -> None:
        try:
            await sock.send(datagram)
        except OSError as exc:  # e.g. ICMP unreachable reported on the next send
            log.debug("tunnel: UDP send failed: %s", exc)

    return await relay_datagrams(
        tunnel,
        from_socket,
        to_socket,
        name="tunnel: UDP flow",
        idle_timeout=idle_timeout,
        serving=True,
    )


async def relay_peer_datagrams(
    tunnel: trio.abc.HalfCloseableStream,
    sock: trio.socket.SocketType | None,
    peer: tuple[str, int],
    queue: trio.MemoryReceiveChannel[bytes],
    *,
    name: str,
    idle_timeout: float,
    sent: Callable[[bytes], None] | None = None,
) -> ResetReason | None:
    """`relay_datagrams` for one peer of an unconnected UDP socket (the daemon's UDP forwarder,
    the agent's UDP ports): the peer's datagrams, queued by the task that reads `sock`, go into
    the tunnel until the queue ends; what comes out goes back to `peer` from `sock` (None: it
    is dropped, as a wiretap copy's answers are), and to `sent` once the peer has it. A failed
    reply is logged and dropped."""

    async def from_peer() -> bytes | None:
        try:
            return await queue.receive()
        except trio.EndOfChannel:
            return None

    async def to_peer(datagram: bytes) -> None:
        if sock is None:
            return
        try:
            await sock.sendto(datagram, peer)
        except OSError as exc:
            log.debug("%s: reply to %s failed: %s", name, peer, exc)
            return
        if sent is not None:
            sent(datagram)

    return await relay_datagrams(tunnel, from_peer, to_peer, name=name, idle_timeout=idle_timeout)


async def relay_datagrams(
    tunnel: trio.abc.HalfCloseableStream,
    receive: Callable[[], Awaitable[bytes | None]],
    deliver: Callable[[bytes], Awaitable[None]],
    *,
    name: str,
    idle_timeout: float | None,
    serving: bool = False,
    read_size: int | None = None,
) -> ResetReason | None:
    """The one UDP-over-tunnel relay: datagrams from `receive()` (None: no more) go into the
    tunnel stream with DATAGRAM framing, and each datagram out of it to `deliver`, until either
    side ends or nothing moved either way for `idle_timeout` (None: the caller ends the flow).

    The dialing side (`serving=False`: the daemon's forwarders, the VIF) ends the flow when the
    tunnel half-closes or the flow is idle. The serving side (the tunnel server, next to the
    destination) keeps sending replies after the dialer's half-close until idle, and on idle
    half-closes the tunnel itself. A malformed datagram stream RESETs the tunnel (PROTOCOL);
    an OSError from `receive` RESETs it with the matching reason. The reason the tunnel ended
    with, if it was reset; None when it ended cleanly or idle.
    """
    outcome: list[ResetReason] = []
    decoder = DatagramDecoder(MAX_DATAGRAM)

    def refresh(idle: trio.CancelScope) -> None:
        if idle_timeout is not None:
            idle.deadline = trio.current_time() + idle_timeout

    def abort(reason: ResetReason) -> None:
        if isinstance(tunnel, H2Stream):
            reset(tunnel, reason)

    async def tunnel_to_local(scope: trio.CancelScope, idle: trio.CancelScope) -> None:
        while True:
            try:
                data = await tunnel.receive_some(read_size)
            except trio.BrokenResourceError as exc:
                outcome.append(reset_reason(exc))
                log.debug("%s ended (%s)", name, outcome[-1].value)
                break
            try:
                datagrams = decoder.feed(data)
                if not data and serving:
                    decoder.end()
            except TunnelProtocolError as exc:
                log.warning("%s reset: %s", name, exc)
                outcome.append(ResetReason.PROTOCOL)
                abort(ResetReason.PROTOCOL)
                break
            for datagram in datagrams:
                await deliver(datagram)
            refresh(idle)
            if not data:
                if serving:
                    return  # the dialer half-closed; replies may still go until idle
                break
        scope.cancel()

    async def local_to_tunnel(scope: trio.CancelScope, idle: trio.CancelScope) -> None:
        while True:
            try:
                datagram = await receive()
            except OSError as exc:
                reason = reason_for_oserror(exc)
                outcome.append(reason)
                abort(reason)
                break
            if datagram is None:
                break
            refresh(idle)
            try:
                await tunnel.send_all(encode_datagram(datagram))
            except (trio.BrokenResourceError, TunnelProtocolError) as exc:
                outcome.append(reset_reason(exc))
                log.debug("%s ended (%s)", name, outcome[-1].value)
                break
        scope.cancel()

    deadline = math.inf if idle_timeout is None else trio.current_time() + idle_timeout
    with trio.CancelScope(deadline=deadline) as idle:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tunnel_to_local, nursery.cancel_scope, idle)
            nursery.start_soon(local_to_tunnel, nursery.cancel_scope, idle)
    if serving and idle.cancelled_caught and not outcome:
        try:
            await tunnel.send_eof()
        except trio.BrokenResourceError:
            pass
    return outcome[0] if outcome else None
