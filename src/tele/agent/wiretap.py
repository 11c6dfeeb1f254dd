"""Wiretaps (`tele wiretap`): a read-only copy of an agent port's connections for a client.

The caller's connection is served exactly as without the wiretap (by the app, or by an
intercepting client); what the caller sends is copied, as it passes, into one bounded buffer
per wiretap, and a task of that wiretap sends the buffer to its client's local handler (a
tunnel stream, as an intercept's). The handler's answers are read and thrown away. The copy
never waits: when a wiretap's buffer is full (its handler is slow), or the handler cannot be
reached, that wiretap's copy of the connection is dropped (the tunnel stream is reset) and
counted; the caller's bytes go on at their own pace. Counters are per engagement, reported to
the manager, and shown by `tele status`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec
import trio

from tele.errors import TeleError
from tele.net.tunnel import ResetReason
from tele.rpc.agent_api import Engagement, TapCounters
from tele.rpc.h2stream import H2Stream
from tele.rpc.tunnel import reset

log = logging.getLogger(__name__)

TAP_BUFFER: Final = 1024 * 1024
"""Bytes one wiretapped connection may hold for a slow handler before its copy is dropped."""
TAP_BUDGET: Final = 16 * 1024 * 1024
"""Bytes all wiretapped connections of the agent together may hold: many connections with a
slow handler must not grow the agent's memory (each is also bounded by TAP_BUFFER)."""
TAP_HOLD_SECONDS: Final = 0.1
TAP_HOLD_BYTES: Final = 16 * 1024
"""A copy's stream to the client is opened once the connection ended, or this many bytes or
seconds after it began: the work of opening it then comes after the app's answer to a short
exchange (the common request/response), not while the app's caller waits."""
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 5.0
"""After a copy could not reach its handler (absent, or broke it off), the wiretap's next
copies are dropped at once (counted) for this long, doubling per failure up to BACKOFF_MAX: an
absent handler costs the agent no stream per connection."""
TAP_DRAIN_SECONDS: Final = 10.0
"""After the caller's connection ended, how long its copy may take to reach the handler."""

_EXPECTED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, TeleError)
"""How a copy's stream ends when the handler is absent, slow or gone: a drop, not a bug."""

OpenTap = Callable[[Engagement, bool], Awaitable[trio.abc.Stream]]
"""Opens a copy's stream to the client: (the wiretap, whether it is the response copy)."""


@dataclass
class _Counters:
    connections: int = 0
    copied_bytes: int = 0
    dropped_connections: int = 0
    dropped_bytes: int = 0

    def frozen(self) -> TapCounters:
        return TapCounters(
            connections=self.connections,
            copied_bytes=self.copied_bytes,
            dropped_connections=self.dropped_connections,
            dropped_bytes=self.dropped_bytes,
        )


class Wiretaps:
    """The agent's wiretap counters (by engagement id) and its shared buffer budget."""

    def __init__(self, budget: int = TAP_BUDGET, per_connection: int = TAP_BUFFER) -> None:
        self.budget = budget
        self.per_connection = per_connection
        self.buffered = 0
        self._counters: dict[str, _Counters] = {}
        self._failures: dict[str, int] = {}
        self._paused_until: dict[str, float] = {}
        self.version = 0
        """Bumped on every change of the counters (the manager link reports when it moved)."""

    def counters(self, engagement_id: str, response: bool = False) -> _Counters:
        """A wiretap's counters (with `response`: of its copies of the app's answers)."""
        key = _pause_key(engagement_id, response)
        found = self._counters.get(key)
        if found is None:
            found = self._counters[key] = _Counters()
        return found

    def snapshot(self) -> dict[str, TapCounters]:
        taps: dict[str, TapCounters] = {}
        for key, c in self._counters.items():
            if key.endswith(RESPONSE_SUFFIX):
                continue
            answers = self._counters.get(key + RESPONSE_SUFFIX, _Counters())
            taps[key] = msgspec.structs.replace(
                c.frozen(),
                response_copied_bytes=answers.copied_bytes,
                response_dropped=answers.dropped_connections,
                response_dropped_bytes=answers.dropped_bytes,
            )
        return taps

    def forget_except(self, engagement_ids: set[str]) -> None:
        """Drop the counters of wiretaps that ended."""
        keys = engagement_ids | {_pause_key(e, True) for e in engagement_ids}
        for table in (self._counters, self._failures, self._paused_until):
            for gone in set(table) - keys:
                del table[gone]

    def tap(self, engagement: Engagement, *, response: bool = False) -> Tap:
        """A copy of a new connection for `engagement` (with `response`: of what the app
        answers, counted apart); already dropped while the wiretap's handler (of that
        direction) is known to be unreachable (see BACKOFF_FIRST)."""
        counters = self.counters(engagement.id, response)
        counters.connections += 1
        self.version += 1
        tap = Tap(engagement, self, counters, response=response)
        key = _pause_key(engagement.id, response)
        if trio.current_time() < self._paused_until.get(key, -math.inf):
            tap._drop()
        return tap

    def failed(self, engagement_id: str, response: bool = False) -> None:
        """A copy could not reach the handler: pause the wiretap's copies (of that direction:
        each has a handler of its own) for a while."""
        key = _pause_key(engagement_id, response)
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        pause = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
        self._paused_until[key] = trio.current_time() + pause

    def delivered(self, engagement_id: str, response: bool = False) -> None:
        key = _pause_key(engagement_id, response)
        self._failures.pop(key, None)
        self._paused_until.pop(key, None)


def _pause_key(engagement_id: str, response: bool) -> str:
    return engagement_id + (RESPONSE_SUFFIX if response else "")


RESPONSE_SUFFIX: Final = "/response"


class Tap:
    """One wiretap's copy of one connection: `offer` (never blocks) and `run` (the sender)."""

    def __init__(
        self, engagement: Engagement, taps: Wiretaps, counters: _Counters, *, response: bool
    ) -> None:
        self.engagement = engagement
        self.response = response
        """A copy of what the app answers (else of what the caller sends)."""
        self._taps = taps
        self._counters = counters
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._sent = 0
        self._ended = False
        self.dropped = False
        self.sent = False
        self.done = False
        self._wake = trio.Event()

    def offer(self, data: bytes) -> None:
        """Copy `data` unless this copy was dropped; drop it when the buffers are full."""
        if not data:
            return
        if self.dropped:
            self._counters.dropped_bytes += len(data)  # not copied either
            return
        taps = self._taps
        if self._held + len(data) > taps.per_connection or (
            taps.buffered + len(data) > taps.budget
        ):
            self._drop(len(data))
            return
        self._chunks.append(bytes(data))
        self._held += len(data)
        taps.buffered += len(data)
        self._wake.set()

    def end(self) -> None:
        """The caller's side ended: send what is held, then end the copy."""
        self._ended = True
        self._wake.set()

    def _drop(self, pending: int = 0) -> None:
        if self.dropped:
            return
        self.dropped = True
        self._counters.dropped_connections += 1
        # What was sent of a dropped copy did not reach the handler either (or not whole).
        self._counters.copied_bytes -= self._sent
        self._counters.dropped_bytes += self._sent + self._held + pending
        self._taps.buffered -= self._held
        self._taps.version += 1
        self._chunks.clear()
        self._held = 0
        self._wake.set()

    async def run(self, open_tap: OpenTap) -> None:
        """Open the stream to the client and send the copy; a failure drops this copy only.
        A copy counts as delivered once the client's side ended it cleanly (its handler got
        the end of it), or, with a handler that keeps it open, once all of it was sent."""
        stream: trio.abc.Stream | None = None
        try:
            with trio.move_on_after(TAP_HOLD_SECONDS):
                while not (self._ended or self.dropped or self._held >= TAP_HOLD_BYTES):
                    self._wake = trio.Event()
                    await self._wake.wait()
            if self.dropped:
                return
            with trio.move_on_after(TAP_DRAIN_SECONDS) as opening:
                stream = await open_tap(self.engagement, self.response)
            if stream is None or opening.cancelled_caught:
                raise trio.BrokenResourceError("the client's handler did not answer in time")
            async with stream:
                answers = _Answers(stream)
                failure: BaseException | None = None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(answers.discard)  # never raises
                    try:
                        await self._send(stream)
                        self.sent = True
                    except _EXPECTED as exc:  # raised below, not as an exception group
                        failure = exc
                        nursery.cancel_scope.cancel()
                if failure is not None:
                    raise failure
                await answers.check()
                self.done = True
                self._taps.delivered(self.engagement.id, self.response)
        except _EXPECTED as exc:
            log.debug("wiretap %s: copy dropped: %s", self.engagement.id, exc)
            self._fail(stream)
        except Exception:  # a bug: this copy ends, the caller's connection goes on
            log.exception("wiretap %s: copy failed", self.engagement.id)
            self._fail(stream)
        finally:
            if not (self.done or self.sent):  # cancelled: it did not drain in time
                self._drop()
            self._drop_remaining_budget()

    async def _send(self, stream: trio.abc.Stream) -> None:
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._held -= len(chunk)
                self._taps.buffered -= len(chunk)
                await stream.send_all(chunk)
                self._sent += len(chunk)
                self._counters.copied_bytes += len(chunk)
                self._taps.version += 1
            if self.dropped:
                raise trio.BrokenResourceError("the handler is too slow: the copy was dropped")
            if self._ended:
                if isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                return
            self._wake = trio.Event()
            await self._wake.wait()

    def _fail(self, stream: trio.abc.Stream | None) -> None:
        self._drop()
        self._taps.failed(self.engagement.id, self.response)
        if isinstance(stream, H2Stream):
            reset(stream, ResetReason.CANCELLED)  # the handler sees a broken copy, not an end

    def _drop_remaining_budget(self) -> None:
        self._taps.buffered -= self._held
        self._held = 0
        self._chunks.clear()


class _Answers:
    """The handler's answers on a copy's stream: read and forgotten (a wiretap is read-only,
    and an unread answer would block the handler); how the stream ended is kept."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._broken: BaseException | None = None

    async def discard(self) -> None:
        try:
            while await self._stream.receive_some(64 * 1024):
                pass
        except _EXPECTED as exc:
            self._broken = exc

    async def check(self) -> None:
        """Raise when the client's side broke the copy off (its handler was absent)."""
        if self._broken is not None:
            raise trio.BrokenResourceError(str(self._broken))


class TappedStream(trio.abc.HalfCloseableStream):
    """The caller's stream, with what it sends copied to `taps` as it is read, and what it is
    sent (the app's answers, after the caller took them) to `response_taps`."""

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        taps: Sequence[Tap],
        response_taps: Sequence[Tap] = (),
    ) -> None:
        self.transport_stream = stream
        self._taps = taps
        self._response_taps = response_taps

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.transport_stream.receive_some(max_bytes)
        if data:
            for tap in self._taps:
                tap.offer(bytes(data))
        else:
            for tap in self._taps:
                tap.end()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)
        if data:  # copied once the caller has it: the copy never comes before the answer
            for tap in self._response_taps:
                tap.offer(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()
        for tap in self._response_taps:
            tap.end()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
