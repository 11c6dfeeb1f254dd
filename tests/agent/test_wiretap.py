"""Wiretaps on an agent port with real sockets on 127.0.0.1: the app serves every connection
unchanged while each wiretap's handler gets a copy of what the caller sent; a slow or absent
handler costs the app nothing and its dropped copies are counted."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from tele.agent.engagements import RESPONSE_KEY, StaticEngagements
from tele.agent.wiretap import TAP_BUFFER, Tap, TappedStream, Wiretaps
from tele.rpc.agent_api import WIRETAP, Engagement
from tele.testing.waits import wait_for
from tests.agent.servers import AGENT_PORT, running_agent, start_http_server, start_tcp_server
from tests.agent.test_forward import exchange, expected

PAYLOAD = os.urandom(700 * 1024 + 5)


def tap(engagement_id: str, *, copy_responses: bool = False) -> Engagement:
    return Engagement(
        id=engagement_id,
        container="echo",
        agent_port=AGENT_PORT,
        kind=WIRETAP,
        copy_responses=copy_responses,
    )


def dropped(source: StaticEngagements) -> int:
    return source.wiretaps.counters("t1").dropped_connections


class Recorder:
    """A local handler that records every byte of every connection (and answers junk, which
    the agent must throw away); `stall` makes it stop reading."""

    def __init__(self) -> None:
        self.port = 0
        self.received: list[bytes] = []
        self.stall = trio.Event()
        self.done = trio.Event()

    async def start(self, nursery: trio.Nursery) -> None:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        self.port = listener.socket.getsockname()[1]

        async def handle(stream: trio.SocketStream) -> None:
            data = bytearray()
            async with stream:
                await stream.send_all(b"the handler's answer is never seen by anyone")
                try:
                    while chunk := await stream.receive_some(65536):
                        data += chunk
                        if self.stall.is_set():
                            await trio.sleep_forever()
                except trio.BrokenResourceError:
                    pass
            self.received.append(bytes(data))
            self.done.set()

        nursery.start_soon(trio.serve_listeners, handle, [listener])


async def test_two_wiretaps_copy_the_callers_bytes_while_the_app_serves_them() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            one, two = Recorder(), Recorder()
            await one.start(nursery)
            await two.start(nursery)
            source = StaticEngagements(
                [tap("t1"), tap("t2")],
                handlers={"t1": ("127.0.0.1", one.port), "t2": ("127.0.0.1", two.port)},
            )
            async with running_agent(app.port, source) as agent:
                answer = await exchange(agent, PAYLOAD)
                await wait_for(lambda: bool(one.received and two.received), timeout=10)
                await wait_for(lambda: source.wiretaps.unanswered() == 0, timeout=10)
            nursery.cancel_scope.cancel()
    assert answer == expected("app", PAYLOAD)  # the app answered, unchanged
    assert one.received == [PAYLOAD] and two.received == [PAYLOAD]
    counters = source.wiretaps.snapshot()
    assert counters["t1"].connections == 1 and counters["t1"].copied_bytes == len(PAYLOAD)
    assert counters["t2"].dropped_connections == 0


async def test_a_wiretap_beside_an_intercept_copies_what_the_intercept_takes() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app")
            handler = await start_http_server(nursery, "laptop")
            copy = Recorder()
            await copy.start(nursery)
            intercept = Engagement(
                id="i1",
                container="echo",
                agent_port=AGENT_PORT,
                mechanism="http",
                headers=[("x-dev", "me")],
            )
            source = StaticEngagements(
                [intercept, tap("t1")],
                handlers={"i1": ("127.0.0.1", handler.port), "t1": ("127.0.0.1", copy.port)},
            )
            async with running_agent(app.port, source) as agent:
                stream = await trio.open_tcp_stream("127.0.0.1", agent)
                request = (
                    b"GET /a HTTP/1.1\r\nhost: echo\r\n\r\n"
                    b"GET /b HTTP/1.1\r\nhost: echo\r\nx-dev: me\r\nconnection: close\r\n\r\n"
                )
                async with stream:
                    await stream.send_all(request)
                    answers = b""
                    while data := await stream.receive_some(65536):
                        answers += data
                await wait_for(lambda: bool(copy.received), timeout=10)
            nursery.cancel_scope.cancel()
    assert b"app GET /a 0" in answers and b"laptop GET /b 0" in answers
    assert copy.received == [request]


async def test_an_absent_handler_costs_the_app_nothing_and_is_counted() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            with trio.socket.socket() as closed:
                await closed.bind(("127.0.0.1", 0))
                nothing = closed.getsockname()[1]  # nothing listens there once closed
            source = StaticEngagements([tap("t1")], handlers={"t1": ("127.0.0.1", nothing)})
            async with running_agent(app.port, source) as agent:
                answers = [await exchange(agent, PAYLOAD[:1000]) for _ in range(3)]
                await wait_for(lambda: dropped(source) == 3, timeout=10)
            nursery.cancel_scope.cancel()
    assert answers == [expected("app", PAYLOAD[:1000])] * 3
    assert source.wiretaps.buffered == 0


async def test_a_stalled_handler_drops_its_copy_at_the_bound_and_the_app_gets_everything() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            slow = Recorder()
            slow.stall.set()
            await slow.start(nursery)
            source = StaticEngagements([tap("t1")], handlers={"t1": ("127.0.0.1", slow.port)})
            big = os.urandom(8 * 1024 * 1024)  # far more than the socket buffers and the bound
            async with running_agent(app.port, source) as agent:
                answer = await exchange(agent, big)
                await wait_for(lambda: dropped(source) == 1, timeout=10)
            nursery.cancel_scope.cancel()
    assert answer == expected("app", big)
    counters = source.wiretaps.snapshot()["t1"]
    assert counters.copied_bytes < len(big) and counters.dropped_bytes > 0
    assert source.wiretaps.buffered == 0


WHERE = ("10.0.0.1", 8080)


@asynccontextmanager
async def never_opens(
    _: Engagement, __: tuple[str, int], ___: bool
) -> AsyncIterator[trio.abc.HalfCloseableStream]:
    """A client that never takes the channel (its opening hangs)."""
    await trio.sleep_forever()
    yield trio.testing.memory_stream_pair()[0]  # pragma: no cover


@asynccontextmanager
async def refused(
    _: Engagement, __: tuple[str, int], ___: bool
) -> AsyncIterator[trio.abc.HalfCloseableStream]:
    raise OSError("connection refused")
    yield trio.testing.memory_stream_pair()[0]  # pragma: no cover


@asynccontextmanager
async def serving(wiretaps: Wiretaps) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(wiretaps.serve)
        yield
        nursery.cancel_scope.cancel()


async def test_the_agents_buffers_are_bounded_per_connection_and_in_total() -> None:
    wiretaps = Wiretaps(budget=3 * TAP_BUFFER)
    engagement = tap("t1")
    async with serving(wiretaps):
        taps = [wiretaps.tap(engagement, never_opens, WHERE) for _ in range(5)]
        for one in taps:
            for _ in range(TAP_BUFFER // 65536 + 1):  # one chunk more than a connection may hold
                one.offer(b"x" * 65536)
        assert wiretaps.buffered <= 3 * TAP_BUFFER
        assert all(one.dropped for one in taps)  # each reached its own or the shared bound
        assert wiretaps.snapshot()["t1"].dropped_connections == 5


async def test_the_copy_sees_exactly_what_the_app_read() -> None:
    left, right = trio.testing.memory_stream_pair()
    wiretaps = Wiretaps()
    async with serving(wiretaps):
        copy: Tap = wiretaps.tap(tap("t1"), never_opens, WHERE)
        tapped = TappedStream(right, [copy])
        await left.send_all(b"hello ")
        await left.send_all(b"world")
        await left.send_eof()
        seen = b""
        while data := await tapped.receive_some(3):
            seen += data
        assert seen == b"hello world"
        assert b"".join(copy._chunks) == b"hello world"


async def test_without_its_channels_running_every_copy_is_dropped_and_counted() -> None:
    wiretaps = Wiretaps()
    copy = wiretaps.tap(tap("t1"), never_opens, WHERE)
    copy.offer(b"12345")
    assert copy.dropped and wiretaps.buffered == 0
    assert wiretaps.snapshot()["t1"].dropped_bytes == 5


async def test_an_unreachable_handler_pauses_the_wiretap_and_later_copies_are_counted() -> None:
    wiretaps = Wiretaps()
    engagement = tap("t1")
    async with serving(wiretaps):
        first = wiretaps.tap(engagement, refused, WHERE)
        first.offer(b"first")
        first.end()
        await wait_for(lambda: first.dropped, timeout=5)
        paused = wiretaps.tap(engagement, refused, WHERE)  # during the pause: dropped at once
        assert paused.dropped
        paused.offer(b"12345")
    counters = wiretaps.snapshot()["t1"]
    assert (counters.connections, counters.dropped_connections) == (2, 2)
    assert counters.dropped_bytes == len(b"first") + 5 and wiretaps.buffered == 0


async def test_both_directions_are_copied_while_the_caller_gets_the_apps_answer() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            requests, responses = Recorder(), Recorder()
            await requests.start(nursery)
            await responses.start(nursery)
            source = StaticEngagements(
                [tap("t1", copy_responses=True), tap("t2")],
                handlers={
                    "t1": ("127.0.0.1", requests.port),
                    "t1" + RESPONSE_KEY: ("127.0.0.1", responses.port),
                    "t2": ("127.0.0.1", requests.port),
                },
            )
            async with running_agent(app.port, source) as agent:
                answer = await exchange(agent, PAYLOAD)
                await wait_for(
                    lambda: len(requests.received) == 2 and bool(responses.received), timeout=10
                )
                await wait_for(lambda: source.wiretaps.unanswered() == 0, timeout=10)
            nursery.cancel_scope.cancel()
    assert answer == expected("app", PAYLOAD)  # the caller got the app's answer, unchanged
    assert requests.received == [PAYLOAD, PAYLOAD]  # t1's and t2's copies of the request
    assert responses.received == [answer]  # only t1 asked for the answers
    counters = source.wiretaps.snapshot()
    assert counters["t1"].connections == 1 and counters["t1"].copied_bytes == len(PAYLOAD)
    assert counters["t1"].response_copied_bytes == len(answer)
    assert counters["t2"].response_copied_bytes == 0


async def test_http_answers_reach_the_response_handler_byte_for_byte() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app")
            requests, responses = Recorder(), Recorder()
            await requests.start(nursery)
            await responses.start(nursery)
            source = StaticEngagements(
                [tap("t1", copy_responses=True)],
                handlers={
                    "t1": ("127.0.0.1", requests.port),
                    "t1" + RESPONSE_KEY: ("127.0.0.1", responses.port),
                },
            )
            request = (
                b"GET /a HTTP/1.1\r\nhost: echo\r\n\r\n"
                b"GET /b HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"
            )
            async with running_agent(app.port, source) as agent:
                stream = await trio.open_tcp_stream("127.0.0.1", agent)
                async with stream:
                    await stream.send_all(request)
                    answers = b""
                    while data := await stream.receive_some(65536):
                        answers += data
                await wait_for(lambda: bool(requests.received and responses.received), timeout=10)
                await wait_for(lambda: source.wiretaps.unanswered() == 0, timeout=10)
            nursery.cancel_scope.cancel()
    assert b"app GET /a 0" in answers and b"app GET /b 0" in answers
    assert requests.received == [request]
    assert responses.received == [answers]


async def test_a_stalled_or_absent_response_handler_never_delays_the_app() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            requests, slow = Recorder(), Recorder()
            slow.stall.set()
            await requests.start(nursery)
            await slow.start(nursery)
            with trio.socket.socket() as closed:
                await closed.bind(("127.0.0.1", 0))
                nothing = closed.getsockname()[1]  # nothing listens there once closed
            source = StaticEngagements(
                [tap("t1", copy_responses=True), tap("t2", copy_responses=True)],
                handlers={
                    "t1": ("127.0.0.1", requests.port),
                    "t1" + RESPONSE_KEY: ("127.0.0.1", nothing),
                    "t2": ("127.0.0.1", requests.port),
                    "t2" + RESPONSE_KEY: ("127.0.0.1", slow.port),
                },
            )
            big = os.urandom(3 * 1024 * 1024)

            async def echo(stream: trio.SocketStream) -> None:  # answers as much as it gets
                async with stream:
                    while data := await stream.receive_some(65536):
                        await stream.send_all(data)

            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            nursery.start_soon(trio.serve_listeners, echo, [listener])
            echo_port = listener.socket.getsockname()[1]
            async with running_agent(echo_port, source) as agent:
                answer = await exchange(agent, big)
                small = await exchange(agent, b"ping")
                await wait_for(
                    lambda: (
                        source.wiretaps.snapshot()["t2"].response_dropped >= 1
                        and source.wiretaps.snapshot()["t1"].response_dropped >= 1
                        and len(requests.received) == 4
                    ),
                    timeout=15,
                )
                await wait_for(lambda: source.wiretaps.unanswered() == 0, timeout=10)
            nursery.cancel_scope.cancel()
    assert answer == big and small == b"ping"  # the caller got all the app said
    assert sorted(map(len, requests.received)) == [4, 4, len(big), len(big)]
    counters = source.wiretaps.snapshot()
    assert counters["t2"].response_dropped_bytes > 0  # the stalled handler's copy hit the bound
    assert counters["t1"].dropped_connections == 0  # the request copies went on
    assert source.wiretaps.buffered == 0


async def test_one_channel_carries_the_copies_of_many_connections() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            copies = Recorder()
            await copies.start(nursery)
            source = StaticEngagements([tap("t1")], handlers={"t1": ("127.0.0.1", copies.port)})
            async with running_agent(app.port, source) as agent:
                answers = [await exchange(agent, b"request %d" % i) for i in range(20)]
                await wait_for(lambda: len(copies.received) == 20, timeout=10)
                await wait_for(lambda: source.wiretaps.snapshot()["t1"].copied_bytes > 0, timeout=5)
            nursery.cancel_scope.cancel()
    assert answers == [expected("app", b"request %d" % i) for i in range(20)]
    assert sorted(copies.received) == sorted(b"request %d" % i for i in range(20))
    assert len(source.opened) == 1  # one stream to the client, not one per connection


async def test_a_malformed_verdict_ends_the_channel_its_copies_are_counted_the_app_serves() -> None:
    client_ends: list[trio.abc.HalfCloseableStream] = []

    @asynccontextmanager
    async def hostile(
        _: Engagement, __: tuple[str, int], ___: bool
    ) -> AsyncIterator[trio.abc.HalfCloseableStream]:
        ours, theirs = trio.testing.memory_stream_pair()
        client_ends.append(theirs)
        yield ours

    class Hostile(StaticEngagements):
        def tap_channel(self, *args: object) -> object:  # type: ignore[override]
            return hostile(*args)  # type: ignore[arg-type]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            source = Hostile([tap("t1")])
            async with running_agent(app.port, source) as agent:
                first = await exchange(agent, b"first")
                await wait_for(lambda: bool(client_ends), timeout=5)
                records = b""
                while b"first" not in records:  # the copy came: OPEN, DATA, END
                    records += await client_ends[0].receive_some()
                await client_ends[0].send_all(b"\x63" + b"\x00" * 8)  # a kind nobody knows
                await wait_for(lambda: dropped(source) == 1, timeout=5)
                second = await exchange(agent, b"second")  # the app still serves, unwaited
            nursery.cancel_scope.cancel()
    assert first == expected("app", b"first") and second == expected("app", b"second")
    counters = source.wiretaps.snapshot()["t1"]
    assert counters.copied_bytes == 0 and counters.dropped_bytes >= len(b"first")
    assert source.wiretaps.buffered == 0


async def test_a_client_that_never_takes_the_channel_never_delays_the_app() -> None:
    class Hangs(StaticEngagements):
        def tap_channel(self, *args: object) -> object:  # type: ignore[override]
            return never_opens(*args)  # type: ignore[arg-type]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            source = Hangs([tap("t1", copy_responses=True)])
            async with running_agent(app.port, source) as agent:
                answers = [await exchange(agent, PAYLOAD[:5000]) for _ in range(5)]
                assert source.wiretaps.buffered <= 10 * 5000  # held (bounded), not sent
            nursery.cancel_scope.cancel()
    assert answers == [expected("app", PAYLOAD[:5000])] * 5
