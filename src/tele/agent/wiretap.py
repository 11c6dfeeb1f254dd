"""Wiretaps (`tele wiretap`): a read-only copy of an agent port's connections for a client.

The caller's connection is served exactly as without the wiretap (by the app, or by an
intercepting client); what the caller sends is copied, as it passes, into a bounded buffer
(`Tap`), and the wiretap's copy channel (one tunnel stream per wiretap, port and direction,
opened once and kept) carries the copies of all its connections to the client as records
(tele.net.tapcopies): OPEN, DATA, END or DROP per connection. The client gives each copy to the
local handler on a connection of its own and answers DONE or FAILED. Nothing on the caller's
path waits for the channel: opening it, sending on it and its verdicts are the channel's own
tasks. When a connection's buffer is full (its handler is slow), the agent's budget is spent,
or the handler cannot be reached, that copy is dropped and counted; the caller's bytes go on at
their own pace. Counters are per engagement, reported to the manager, shown by `tele status`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Final

import msgspec
import trio

from tele.errors import TeleError
from tele.net.tapcopies import (
    FROM_CLIENT,
    MAX_DATA,
    Kind,
    RecordReader,
    TapFrameError,
    record,
)
from tele.rpc.agent_api import Engagement, TapCounters

log = logging.getLogger(__name__)

TAP_BUFFER: Final = 1024 * 1024
"""Bytes one wiretapped connection may hold for a slow handler before its copy is dropped."""
TAP_BUDGET: Final = 16 * 1024 * 1024
"""Bytes all wiretapped connections of the agent together may hold: many connections with a
slow handler must not grow the agent's memory (each is also bounded by TAP_BUFFER)."""
FLUSH_SECONDS: Final = 0.02
FLUSH_SMALL: Final = 16 * 1024
"""A channel sends what its copies hold FLUSH_SECONDS after the first of it came (so that the
records of short connections go out together, after the app's answer), or at once when this
many bytes are waiting."""
FLUSH_BYTES: Final = 256 * 1024
"""Bytes of records per send on a channel."""
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 5.0
"""After a copy could not reach its handler (absent, or broke it off), the wiretap's next
copies are dropped at once (counted) for this long, doubling per failure up to BACKOFF_MAX: an
absent handler costs the agent and the client nothing per connection."""
TAP_DRAIN_SECONDS: Final = 10.0
"""How long the client may take to answer a copy whose connection ended (else: dropped), and
to open a channel."""
SWEEP_SECONDS: Final = 1.0

_EXPECTED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, TeleError, TapFrameError)
"""How a channel ends when the client, the manager or the link goes: copies dropped, not a bug."""

Address = tuple[str, int]
OpenChannel = Callable[
    [Engagement, Address, bool], AbstractAsyncContextManager[trio.abc.HalfCloseableStream]
]
"""A wiretap's copy channel to its client: (the wiretap, the connections' original
destination, whether it carries the copies of the app's answers); its opening takes at most
TAP_DRAIN_SECONDS."""


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
    """The agent's wiretap counters (by engagement id), its shared buffer budget and the
    wiretaps' copy channels; `serve()` runs the channels."""

    def __init__(self, budget: int = TAP_BUDGET, per_connection: int = TAP_BUFFER) -> None:
        self.budget = budget
        self.per_connection = per_connection
        self.buffered = 0
        self._counters: dict[str, _Counters] = {}
        self._failures: dict[str, int] = {}
        self._paused_until: dict[str, float] = {}
        self._channels: dict[tuple[str, Address, bool], _Channel] = {}
        self._nursery: trio.Nursery | None = None
        self.version = 0
        """Bumped on every change of the counters (the manager link reports when it moved)."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the copy channels until cancelled (without it, every copy is dropped)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

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
        """Drop the counters and close the channels of wiretaps that ended."""
        keys = engagement_ids | {_pause_key(e, True) for e in engagement_ids}
        for table in (self._counters, self._failures, self._paused_until):
            for gone in set(table) - keys:
                del table[gone]
        for key, channel in list(self._channels.items()):
            if key[0] not in engagement_ids:
                del self._channels[key]
                channel.close()

    def tap(
        self,
        engagement: Engagement,
        open_channel: OpenChannel,
        original_dst: Address,
        *,
        response: bool = False,
    ) -> Tap:
        """A copy of a new connection for `engagement` (with `response`: of what the app
        answers, counted apart) on its channel; already dropped while the wiretap's handler
        (of that direction) is known to be unreachable (see BACKOFF_FIRST)."""
        counters = self.counters(engagement.id, response)
        counters.connections += 1
        self.version += 1
        tap = Tap(engagement, self, counters, response=response)
        if trio.current_time() < self.paused_until(engagement.id, response):
            tap.drop()
            return tap
        key = (engagement.id, original_dst, response)
        channel = self._channels.get(key)
        if channel is None:
            if self._nursery is None:
                log.warning("wiretap %s: the copy channels do not run; copy dropped", engagement.id)
                tap.drop()
                return tap
            channel = _Channel(self, engagement, original_dst, response, open_channel)
            self._channels[key] = channel
            self._nursery.start_soon(channel.run)
        tap.channel = channel
        return tap

    def unanswered(self) -> int:
        """Copies waiting to go, or gone and not answered by the client yet."""
        return sum(len(c.live) + len(c.pending) for c in self._channels.values())

    def paused_until(self, engagement_id: str, response: bool = False) -> float:
        return self._paused_until.get(_pause_key(engagement_id, response), -math.inf)

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
    """One wiretap's copy of one connection: `offer` and `end` never block; the channel
    takes what it holds."""

    def __init__(
        self, engagement: Engagement, taps: Wiretaps, counters: _Counters, *, response: bool
    ) -> None:
        self.engagement = engagement
        self.response = response
        """A copy of what the app answers (else of what the caller sends)."""
        self.channel: _Channel | None = None
        self._taps = taps
        self._counters = counters
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._sent = 0
        self._ended = False
        self.copy_id = 0
        """Its id on the channel once OPEN went (0: not yet)."""
        self.closed = False
        """Its END or DROP went, or the client answered FAILED: nothing more goes."""
        self.ended_at = math.inf
        """When its END went (the client must answer within TAP_DRAIN_SECONDS)."""
        self.queued = False
        self.dropped = False
        self.done = False
        """The client said the handler got all of it."""

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
            self.drop(len(data))
            return
        self._chunks.append(bytes(data))
        self._held += len(data)
        taps.buffered += len(data)
        self._queue()
        if self._held >= FLUSH_SMALL and self.channel is not None:
            self.channel.bulk.set()

    def end(self) -> None:
        """The copied side ended: send what is held, then end the copy."""
        if not self._ended:
            self._ended = True
            self._queue()

    def drop(self, pending: int = 0) -> None:
        """Drop this copy (counted): what it holds is forgotten, the handler's connection
        reset."""
        if self.dropped:
            return
        self.dropped = True
        self._counters.dropped_connections += 1
        # What was sent of a dropped copy did not reach the handler either (or not whole).
        self._counters.copied_bytes -= self._sent
        self._counters.dropped_bytes += self._sent + self._held + pending
        self._taps.version += 1
        self._release()
        self._queue()  # its DROP, if its OPEN went

    def failed(self) -> None:
        """The copy did not reach the handler: dropped, and the wiretap pauses."""
        self.closed = True  # the client knows
        self.drop()
        self._taps.failed(self.engagement.id, self.response)

    def _release(self) -> None:
        self._taps.buffered -= self._held
        self._held = 0
        self._chunks.clear()

    def _queue(self) -> None:
        if self.channel is not None and not self.queued and self.has_records():
            self.queued = True
            self.channel.ready(self)

    def has_records(self) -> bool:
        if self.closed:
            return False
        if self.dropped:
            return self.copy_id != 0  # its DROP
        return bool(self._chunks) or self._ended or not self.copy_id

    def records(self, out: bytearray, channel: _Channel, limit: int) -> None:
        """Append this copy's records to `out` (its OPEN first; at most `limit` bytes of it)."""
        if self.closed:
            return
        if self.dropped:
            if self.copy_id:
                out += record(Kind.DROP, self.copy_id)
                self.closed = True
                channel.live.pop(self.copy_id, None)
            return
        if not self.copy_id:
            self.copy_id = channel.open(self)
            out += record(Kind.OPEN, self.copy_id)
        taken = 0
        while self._chunks and taken < limit:
            chunk = self._chunks.popleft()
            if len(chunk) > MAX_DATA:
                self._chunks.appendleft(chunk[MAX_DATA:])
                chunk = chunk[:MAX_DATA]
            out += record(Kind.DATA, self.copy_id, chunk)
            taken += len(chunk)
        self._held -= taken
        self._taps.buffered -= taken
        self._sent += taken
        self._counters.copied_bytes += taken
        if taken:
            self._taps.version += 1
        if self._ended and not self._chunks:
            out += record(Kind.END, self.copy_id)
            self.closed = True
            self.ended_at = trio.current_time()

    def answered(self, kind: Kind) -> None:
        """The client's verdict on this copy."""
        if kind is Kind.DONE and not self.dropped:
            if not self.closed:  # DONE before its END: the client says so wrongly
                self.failed()
                return
            self.done = True
            self._taps.delivered(self.engagement.id, self.response)
        elif kind is Kind.FAILED and not self.dropped:
            self.failed()


class _Channel:
    """The copy stream of one wiretap, port and direction: opened when a copy first needs it,
    kept open; the copies' records go out in turn, their verdicts come back."""

    def __init__(
        self,
        taps: Wiretaps,
        engagement: Engagement,
        original_dst: Address,
        response: bool,
        open_channel: OpenChannel,
    ) -> None:
        self._taps = taps
        self.engagement = engagement
        self.original_dst = original_dst
        self.response = response
        self._open_channel = open_channel
        self.pending: deque[Tap] = deque()
        self.live: dict[int, Tap] = {}
        """Copies whose OPEN went and that the client has not answered."""
        self._next_id = 0
        self._wake = trio.Event()
        self.bulk = trio.Event()
        """Set when a copy holds FLUSH_SMALL bytes or more: send now."""
        self._cancel = trio.CancelScope()

    def ready(self, tap: Tap) -> None:
        self.pending.append(tap)
        self._wake.set()

    def open(self, tap: Tap) -> int:
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        self.live[self._next_id] = tap
        return self._next_id

    def close(self) -> None:
        self._cancel.cancel()

    async def run(self) -> None:
        """Open the stream when copies wait, carry them until it breaks (every copy on it is
        then dropped and the wiretap pauses), again."""
        try:
            with self._cancel:
                while True:
                    while not self.pending:
                        self._wake = trio.Event()
                        await self._wake.wait()
                    try:
                        await self._carry()
                    except _EXPECTED as exc:
                        log.debug("wiretap %s: copy channel ended: %s", self.engagement.id, exc)
                    except Exception:  # a bug: the copies end, the callers' connections go on
                        log.exception("wiretap %s: copy channel failed", self.engagement.id)
                    self._break()
                    await trio.sleep_until(
                        self._taps.paused_until(self.engagement.id, self.response)
                    )
        finally:
            for tap in (*self.live.values(), *self.pending):
                tap.closed = True
                tap.drop()
            self.live.clear()
            self.pending.clear()

    def _break(self) -> None:
        """The stream broke (or never opened): every copy on it or waiting is dropped."""
        broken = [*self.live.values(), *self.pending]
        self.live.clear()
        self.pending.clear()
        for tap in broken:
            tap.queued = False
            tap.closed = True
            tap.drop()
        self._taps.failed(self.engagement.id, self.response)

    async def _carry(self) -> None:
        async with AsyncExitStack() as stack:
            # (Not under a timeout of its own here: the opener may hold a nursery open while
            # the channel is; each opener bounds its opening, see OpenChannel.)
            stream = await stack.enter_async_context(
                self._open_channel(self.engagement, self.original_dst, self.response)
            )
            failure: list[BaseException] = []
            async with trio.open_nursery() as nursery:

                async def send(stream: trio.abc.HalfCloseableStream) -> None:
                    try:
                        await self._send(stream)
                    except _EXPECTED as exc:
                        failure.append(exc)
                    nursery.cancel_scope.cancel()

                async def verdicts(stream: trio.abc.HalfCloseableStream) -> None:
                    try:
                        await self._verdicts(stream)
                    except _EXPECTED as exc:
                        failure.append(exc)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(send, stream)
                nursery.start_soon(verdicts, stream)
                nursery.start_soon(self._sweep)
            if failure:
                raise failure[0]

    async def _send(self, stream: trio.abc.HalfCloseableStream) -> None:
        while True:
            while not self.pending:
                self._wake = trio.Event()
                await self._wake.wait()
            if sum(t._held for t in self.pending) < FLUSH_SMALL:
                # Gather the records of short connections; a copy that grows past
                # FLUSH_SMALL meanwhile (a bulk transfer) ends the wait.
                self.bulk = trio.Event()
                with trio.move_on_after(FLUSH_SECONDS):
                    await self.bulk.wait()
            out = bytearray()
            while self.pending and len(out) < FLUSH_BYTES:
                tap = self.pending.popleft()
                tap.queued = False
                tap.records(out, self, FLUSH_BYTES - len(out))
                tap._queue()  # more of it (later in this turn, or the next)
            if out:
                await stream.send_all(out)

    async def _verdicts(self, stream: trio.abc.HalfCloseableStream) -> None:
        reader = RecordReader(FROM_CLIENT)
        while data := await stream.receive_some(64 * 1024):
            for kind, copy_id, _ in reader.feed(data):
                tap = self.live.pop(copy_id, None)
                if tap is not None:
                    tap.answered(kind)
        raise trio.BrokenResourceError("the client ended the copy channel")

    async def _sweep(self) -> None:
        """Copies the client did not answer in time after their end are dropped."""
        while True:
            await trio.sleep(SWEEP_SECONDS)
            late = trio.current_time() - TAP_DRAIN_SECONDS
            for copy_id, tap in list(self.live.items()):
                if tap.ended_at < late:
                    del self.live[copy_id]
                    tap.drop()


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
