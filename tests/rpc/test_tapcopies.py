"""A wiretap's copy channel, the client's side (tele.rpc.tapcopies) with real local handlers on
127.0.0.1: each copied connection reaches the handler whole and is answered DONE; a handler
that is absent or does not keep up is FAILED; and records from a hostile agent end at most
their own copy (a malformed record: the channel, never the daemon)."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from tele.net.tapcopies import (
    FROM_AGENT,
    FROM_CLIENT,
    HEADER,
    MAX_DATA,
    Kind,
    RecordReader,
    TapFrameError,
    record,
)
from tele.rpc.tapcopies import Budget, serve_copies
from tele.testing.waits import wait_for


@dataclass
class Handler:
    """A local handler that records each connection's bytes (and whether it ended cleanly)."""

    port: int = 0
    received: list[bytes] = field(default_factory=list)
    broken: int = 0
    stall: bool = False
    connections: int = 0

    async def connect(self) -> trio.abc.HalfCloseableStream | None:
        try:
            return await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            return None

    async def handle(self, stream: trio.SocketStream) -> None:
        data = bytearray()
        self.connections += 1
        async with stream:
            await stream.send_all(b"an answer nobody reads")
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if self.stall:
                        await trio.sleep_forever()
            except trio.BrokenResourceError:
                self.broken += 1
                return
        self.received.append(bytes(data))


@asynccontextmanager
async def channel(
    handler: Handler, **bounds: Any
) -> AsyncIterator[tuple[trio.abc.HalfCloseableStream, Verdicts]]:
    """The agent's end of a channel served by serve_copies, and the verdicts it gets."""
    async with trio.open_nursery() as nursery:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        handler.port = listener.socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, handler.handle, [listener])
        agent, client = trio.testing.memory_stream_pair()
        served = trio.Event()

        async def serve() -> None:
            await serve_copies(client, handler.connect, **bounds)
            served.set()

        nursery.start_soon(serve)
        verdicts = Verdicts(agent, served)
        nursery.start_soon(verdicts.read)
        yield agent, verdicts
        nursery.cancel_scope.cancel()


@dataclass
class Verdicts:
    stream: trio.abc.Stream
    served: trio.Event
    seen: dict[int, Kind] = field(default_factory=dict)

    async def read(self) -> None:
        reader = RecordReader(FROM_CLIENT)
        try:
            while data := await self.stream.receive_some(65536):
                for kind, copy_id, _ in reader.feed(data):
                    self.seen[copy_id] = kind
        except trio.BrokenResourceError:
            pass


def copy(copy_id: int, data: bytes, *, end: bool = True) -> bytes:
    out = record(Kind.OPEN, copy_id)
    for i in range(0, len(data), MAX_DATA):
        out += record(Kind.DATA, copy_id, data[i : i + MAX_DATA])
    return out + (record(Kind.END, copy_id) if end else b"")


async def test_every_copy_reaches_the_handler_whole_and_is_answered_done() -> None:
    handler = Handler()
    big = bytes(range(256)) * 1000
    with trio.fail_after(10):
        async with channel(handler) as (agent, verdicts):
            # Interleaved, as the agent sends the copies of concurrent connections.
            await agent.send_all(record(Kind.OPEN, 1) + record(Kind.OPEN, 2))
            await agent.send_all(record(Kind.DATA, 2, b"second ") + record(Kind.DATA, 1, b"first"))
            await agent.send_all(copy(3, big) + record(Kind.DATA, 2, b"copy"))
            await agent.send_all(record(Kind.END, 2) + record(Kind.END, 1))
            await wait_for(lambda: len(verdicts.seen) == 3, timeout=5)
            await wait_for(lambda: len(handler.received) == 3, timeout=5)
    assert verdicts.seen == {1: Kind.DONE, 2: Kind.DONE, 3: Kind.DONE}
    assert sorted(handler.received) == sorted([b"first", b"second copy", big])


async def test_an_absent_handler_fails_each_copy() -> None:
    handler = Handler()
    with trio.fail_after(10):
        async with channel(handler) as (agent, verdicts):
            handler.port = 1  # nothing listens there
            await agent.send_all(copy(7, b"hello") + copy(8, b"again"))
            await wait_for(lambda: len(verdicts.seen) == 2, timeout=5)
    assert verdicts.seen == {7: Kind.FAILED, 8: Kind.FAILED}


async def test_a_stalled_handler_fails_its_copy_at_the_bound_and_the_others_go_on() -> None:
    handler = Handler(stall=True)
    with trio.fail_after(20):
        async with channel(handler, per_copy=256 * 1024) as (agent, verdicts):
            await agent.send_all(copy(1, b"x" * (8 * 1024 * 1024), end=False))
            await wait_for(lambda: verdicts.seen.get(1) is Kind.FAILED, timeout=10)
            handler.stall = False
            await agent.send_all(copy(2, b"after"))
            await wait_for(lambda: verdicts.seen.get(2) is Kind.DONE, timeout=5)
            await agent.send_all(record(Kind.DATA, 1, b"more for the failed one"))
            await agent.send_all(copy(3, b"still served"))
            await wait_for(lambda: verdicts.seen.get(3) is Kind.DONE, timeout=5)
    assert b"after" in handler.received and b"still served" in handler.received


async def test_a_second_open_of_an_open_copy_ends_that_copy_only() -> None:
    handler = Handler()
    with trio.fail_after(10):
        async with channel(handler) as (agent, verdicts):
            await agent.send_all(record(Kind.OPEN, 1) + record(Kind.DATA, 1, b"one"))
            await agent.send_all(copy(2, b"two", end=False))
            await wait_for(lambda: handler.connections == 2, timeout=5)
            await agent.send_all(record(Kind.OPEN, 1))  # again, while open: copy 1 ends
            await wait_for(lambda: verdicts.seen.get(1) is Kind.FAILED, timeout=5)
            await agent.send_all(record(Kind.DATA, 1, b"ignored") + record(Kind.END, 1))
            await agent.send_all(record(Kind.END, 2) + record(Kind.DATA, 9, b"no such copy"))
            await wait_for(lambda: verdicts.seen.get(2) is Kind.DONE, timeout=5)
            await wait_for(lambda: handler.broken == 1, timeout=5)
    assert handler.received == [b"two"]  # copy 1's handler got a reset, not a whole copy


async def test_data_after_its_end_fails_that_copy() -> None:
    handler = Handler()
    with trio.fail_after(10):
        async with channel(handler) as (agent, verdicts):
            await agent.send_all(record(Kind.OPEN, 4) + record(Kind.END, 4))
            await agent.send_all(record(Kind.DATA, 4, b"late"))
            await wait_for(lambda: 4 in verdicts.seen, timeout=5)
    # Either the end went first (DONE: the late bytes were ignored) or the late bytes did.
    assert b"late" not in b"".join(handler.received)


@pytest.mark.parametrize(
    "malformed",
    [
        HEADER.pack(99, 1, 0),  # an unknown kind
        HEADER.pack(Kind.DONE, 1, 0),  # a client's kind, from the agent
        HEADER.pack(Kind.DATA, 1, MAX_DATA + 1),  # longer than a record may be
        HEADER.pack(Kind.DATA, 1, 0),  # DATA without data
        HEADER.pack(Kind.END, 1, 3) + b"abc",  # END with data
        struct.pack("!BI", Kind.OPEN, 5),  # cut short by the end of the stream
    ],
)
async def test_a_malformed_record_ends_the_channel_and_its_open_copies(malformed: bytes) -> None:
    handler = Handler()
    with trio.fail_after(10):
        async with channel(handler) as (agent, verdicts):
            await agent.send_all(copy(1, b"open copy", end=False))
            await wait_for(lambda: handler.connections == 1, timeout=5)
            await agent.send_all(malformed)
            await agent.send_eof()
            await verdicts.served.wait()  # serve_copies returned: nothing raised
            await wait_for(lambda: handler.broken == 1, timeout=5)
    assert handler.received == []  # the open copy was reset, never passed as whole


async def test_copies_beyond_the_bound_fail_at_once_and_verdicts_are_bounded() -> None:
    handler = Handler(stall=True)
    with trio.fail_after(20):
        async with channel(handler, max_copies=3) as (agent, verdicts):
            await agent.send_all(b"".join(record(Kind.OPEN, i) for i in range(1, 6)))
            await wait_for(lambda: len(verdicts.seen) == 2, timeout=5)
    assert verdicts.seen == {4: Kind.FAILED, 5: Kind.FAILED}


async def test_an_agent_that_never_reads_verdicts_has_its_channel_ended() -> None:
    handler = Handler()  # port 0: every copy fails, each owing the agent a verdict
    agent, client = trio.testing.lockstep_stream_pair()  # no buffer: verdicts wait for a read
    served = trio.Event()

    async def serve() -> None:
        await serve_copies(client, handler.connect)
        served.set()

    async def flood() -> None:
        with pytest.raises(trio.BrokenResourceError):
            for i in range(1, 10_000):
                await agent.send_all(record(Kind.OPEN, i) + record(Kind.DATA, i, b"x"))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(flood)
            await served.wait()  # it ended by itself: the verdicts it holds are bounded
            await client.aclose()


def test_the_record_reader_takes_records_split_anywhere() -> None:
    data = copy(1, b"hello") + copy(2, b"x" * 70000)
    reader = RecordReader(FROM_AGENT)
    records = [r for i in range(0, len(data), 7) for r in reader.feed(data[i : i + 7])]
    assert [(k, i, len(p)) for k, i, p in records] == [
        (Kind.OPEN, 1, 0),
        (Kind.DATA, 1, 5),
        (Kind.END, 1, 0),
        (Kind.OPEN, 2, 0),
        (Kind.DATA, 2, MAX_DATA),
        (Kind.DATA, 2, 70000 - MAX_DATA),
        (Kind.END, 2, 0),
    ]
    assert not reader.partial
    with pytest.raises(TapFrameError):
        RecordReader(FROM_CLIENT).feed(record(Kind.OPEN, 1))


async def test_the_processs_channels_share_one_bound_on_copies_and_bytes() -> None:
    budget = Budget(bytes_limit=300 * 1024, copies_limit=3)
    first, second = Handler(stall=True), Handler(stall=True)
    with trio.fail_after(20):
        async with (
            channel(first, budget=budget) as (one, one_verdicts),
            channel(second, budget=budget) as (two, two_verdicts),
        ):
            await one.send_all(record(Kind.OPEN, 1) + record(Kind.OPEN, 2))
            await wait_for(lambda: first.connections == 2, timeout=5)
            await two.send_all(record(Kind.OPEN, 1) + record(Kind.OPEN, 2))
            await wait_for(lambda: two_verdicts.seen == {2: Kind.FAILED}, timeout=5)
            # The stalled handlers hold what they get: the shared byte bound fails one copy.
            for _ in range(40):
                await one.send_all(record(Kind.DATA, 1, b"x" * MAX_DATA))
                await two.send_all(record(Kind.DATA, 1, b"y" * MAX_DATA))
            await wait_for(lambda: 1 in one_verdicts.seen or 1 in two_verdicts.seen, timeout=5)
            assert budget.held <= 300 * 1024
    assert budget.copies == 0 and budget.held == 0  # all given back when the channels ended
