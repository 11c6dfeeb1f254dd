"""RPC over h2: unary, streams, typed errors, deadlines, cancellation, limits, bad peers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import msgspec
import pytest
import trio
import trio.testing

from tele.rpc.client import Client, open_client
from tele.rpc.errors import Code, RpcError
from tele.rpc.method import ServerStream, Unary
from tele.rpc.server import Router, serve_connection
from tele.testing.waits import wait_for


class Echo(msgspec.Struct):
    text: str
    delay: float = 0.0


class Count(msgspec.Struct):
    upto: int


class Number(msgspec.Struct):
    value: int


ECHO = Unary("/test.v1/Echo", Echo, Echo)
FAIL = Unary("/test.v1/Fail", Echo, Echo)
HANG = Unary("/test.v1/Hang", Echo, Echo)
COUNT = ServerStream("/test.v1/Count", Count, Number)
# The same path as ECHO with a request type the server does not accept.
ECHO_WRONG_TYPE = Unary("/test.v1/Echo", Number, Echo)
MISSING = Unary("/test.v1/Missing", Echo, Echo)


class Service:
    def __init__(self) -> None:
        self.cancelled = 0
        self.hanging = 0
        self.hang_started = trio.Event()

    async def echo(self, request: Echo) -> Echo:
        if request.delay:
            await trio.sleep(request.delay)
        return Echo(text=request.text)

    async def fail(self, request: Echo) -> Echo:
        raise RpcError(Code.NOT_FOUND, f"no such thing: {request.text}")

    async def hang(self, request: Echo) -> Echo:
        self.hanging += 1
        self.hang_started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.hanging -= 1

    async def count(self, request: Count) -> AsyncIterator[Number]:
        for value in range(request.upto):
            yield Number(value)

    def router(self) -> Router:
        router = Router()
        router.unary(ECHO, self.echo)
        router.unary(FAIL, self.fail)
        router.unary(HANG, self.hang)
        router.stream(COUNT, self.count)
        return router


async def start_pair(
    nursery: trio.Nursery, service: Service, *, server_max: int = 4 << 20
) -> Client:
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(
        lambda: serve_connection(server_side, service.router(), max_message_size=server_max)
    )
    clients: list[Client] = []

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_client(client_side) as client:
            clients.append(client)
            task_status.started()
            await client.link.wait_closed()

    await nursery.start(run)
    return clients[0]


async def test_unary_and_stream() -> None:
    service = Service()
    async with trio.open_nursery() as nursery:
        client = await start_pair(nursery, service)
        assert await client.call(ECHO, Echo("héllo")) == Echo("héllo")
        async with client.stream(COUNT, Count(upto=50)) as items:
            assert [item.value async for item in items] == list(range(50))
        async with client.stream(COUNT, Count(upto=0)) as items:
            assert [item async for item in items] == []
        nursery.cancel_scope.cancel()


async def test_typed_error_and_unknown_method_and_bad_request() -> None:
    service = Service()
    async with trio.open_nursery() as nursery:
        client = await start_pair(nursery, service)
        with pytest.raises(RpcError) as info:
            await client.call(FAIL, Echo("x/y"))
        assert info.value.code is Code.NOT_FOUND
        assert info.value.message == "no such thing: x/y"
        with pytest.raises(RpcError) as info:
            await client.call(MISSING, Echo("x"))
        assert info.value.code is Code.UNIMPLEMENTED
        with pytest.raises(RpcError) as info:
            await client.call(ECHO_WRONG_TYPE, Number(3))
        assert info.value.code is Code.INVALID_ARGUMENT
        assert "text" in info.value.message
        # The connection is still good after all of that.
        assert await client.call(ECHO, Echo("ok")) == Echo("ok")
        nursery.cancel_scope.cancel()


async def test_deadline_cancels_the_handler(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    service = Service()
    async with trio.open_nursery() as nursery:
        client = await start_pair(nursery, service)
        start = trio.current_time()
        with pytest.raises(RpcError) as info:
            await client.call(HANG, Echo("x"), timeout=2.5)
        assert info.value.code is Code.DEADLINE_EXCEEDED
        assert 2.5 <= trio.current_time() - start < 3
        await wait_for(lambda: service.hanging == 0)
        assert service.cancelled == 1
        nursery.cancel_scope.cancel()


async def test_server_applies_the_callers_deadline(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    service = Service()
    async with trio.open_nursery() as nursery:
        client = await start_pair(nursery, service)
        # The server gets the deadline too, so a slow handler is stopped on its side.
        with pytest.raises(RpcError) as info:
            await client.call(ECHO, Echo("x", delay=100), timeout=1)
        assert info.value.code is Code.DEADLINE_EXCEEDED
        nursery.cancel_scope.cancel()


async def test_cancelled_caller_cancels_the_handler() -> None:
    service = Service()
    async with trio.open_nursery() as nursery:
        client = await start_pair(nursery, service)
        with trio.CancelScope() as scope:

            async def cancel_when_hanging() -> None:
                await service.hang_started.wait()
                scope.cancel()

            nursery.start_soon(cancel_when_hanging)
            await client.call(HANG, Echo("x"))
        assert scope.cancelled_caught
        await wait_for(lambda: service.cancelled >= 1)
        assert service.hanging == 0
        assert await client.call(ECHO, Echo("still fine")) == Echo("still fine")
        nursery.cancel_scope.cancel()


async def test_closed_connection_cancels_handlers_and_fails_callers() -> None:
    service = Service()
    async with trio.open_nursery() as nursery:
        client = await start_pair(nursery, service)
        errors: list[RpcError] = []

        async def call() -> None:
            try:
                await client.call(HANG, Echo("x"))
            except RpcError as exc:
                errors.append(exc)

        async with trio.open_nursery() as calls:
            for _ in range(3):
                calls.start_soon(call)
            await wait_for(lambda: service.hanging >= 3)
            await client.link.transport.aclose()
        assert [e.code for e in errors] == [Code.UNAVAILABLE] * 3
        await wait_for(lambda: service.hanging == 0)
        assert service.cancelled == 3
        nursery.cancel_scope.cancel()


async def test_oversize_messages_are_refused_both_ways() -> None:
    service = Service()
    async with trio.open_nursery() as nursery:
        client = await start_pair(nursery, service, server_max=1000)
        with pytest.raises(RpcError) as info:
            await client.call(ECHO, Echo("x" * 5000))
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        client.max_message_size = 100
        with pytest.raises(RpcError) as info:
            await client.call(ECHO, Echo("x" * 500))
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        client.max_message_size = 1000
        # The server refuses to send a reply over its own limit.
        with pytest.raises(RpcError) as info:
            await client.call(ECHO, Echo("é" * 490))
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        assert await client.call(ECHO, Echo("small")) == Echo("small")
        nursery.cancel_scope.cancel()


async def test_thousand_concurrent_calls_on_one_connection() -> None:
    service = Service()
    results: dict[int, str] = {}
    async with trio.open_nursery() as nursery:
        client = await start_pair(nursery, service)

        async def call(i: int) -> None:
            reply = await client.call(ECHO, Echo(str(i)))
            results[i] = reply.text

        with trio.fail_after(30):
            async with trio.open_nursery() as calls:
                for i in range(1000):
                    calls.start_soon(call, i)
        nursery.cancel_scope.cancel()
    assert results == {i: str(i) for i in range(1000)}


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not HTTP/2 at all
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",  # preface, then half a frame
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,  # preface, then nonsense
    ],
)
async def test_bad_peer_is_dropped_and_others_go_on(garbage: bytes) -> None:
    service = Service()
    router = service.router()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, lambda s: serve_connection(s, router), 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        good = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_client(good) as client:
            assert await client.call(ECHO, Echo("before")) == Echo("before")
            bad = await trio.open_tcp_stream("127.0.0.1", port)
            await bad.send_all(garbage)
            if garbage.endswith(b"\x04"):
                await bad.send_eof()
            with trio.fail_after(5):
                # The server closes the bad connection (after a GOAWAY, if it got that far).
                while await bad.receive_some():
                    pass
            await bad.aclose()
            assert await client.call(ECHO, Echo("after")) == Echo("after")
        nursery.cancel_scope.cancel()


DEEP = b"[" * 100_000 + b"]" * 100_000
ECHO_RAW = Unary("/test.v1/Echo", msgspec.Raw, Echo)
DEEP_REPLY = Unary("/test.v1/Deep", Echo, msgspec.Raw)
DEEP_REPLY_AS_ECHO = Unary("/test.v1/Deep", Echo, Echo)


async def test_a_message_nested_100000_deep_fails_only_its_call_both_ways() -> None:
    service = Service()

    async def deep(request: Echo) -> msgspec.Raw:
        return msgspec.Raw(DEEP)

    async with trio.open_nursery() as nursery:
        client_side, server_side = trio.testing.memory_stream_pair()
        router = service.router()
        router.unary(DEEP_REPLY, deep)
        nursery.start_soon(serve_connection, server_side, router)
        async with open_client(client_side) as client:
            with pytest.raises(RpcError) as info:
                await client.call(ECHO_RAW, msgspec.Raw(DEEP))
            assert info.value.code is Code.INVALID_ARGUMENT
            assert "deeper than" in info.value.message
            # a server that answers such a reply fails the call, not the caller
            with pytest.raises(RpcError) as info:
                await client.call(DEEP_REPLY_AS_ECHO, Echo("x"))
            assert info.value.code is Code.INTERNAL
            assert await client.call(ECHO, Echo("ok")) == Echo("ok")
        nursery.cancel_scope.cancel()
