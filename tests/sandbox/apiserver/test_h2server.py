"""The sandbox API server's HTTP/2 connection (tele.sandbox.apiserver.h2server) driven by a stock
h2 client over a memory stream: a request body ends however the client ends it, and an
overlong frame ends only that connection, at its header."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import trio
import trio.testing

from tele.sandbox.apiserver.h2server import H2ServerConnection

REQUEST = [(":method", "POST"), (":path", "/echo"), (":scheme", "https"), (":authority", "a")]


async def _echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"got " + body})


async def _answer(client: h2.connection.H2Connection, stream: trio.abc.Stream) -> bytes:
    """The response body of stream 1."""
    body = b""
    while True:
        data = await stream.receive_some()
        assert data, "the server closed the connection"
        for event in client.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
            if isinstance(event, h2.events.StreamEnded):
                return body
        if out := client.data_to_send():
            await stream.send_all(out)


async def test_a_body_ended_by_trailers_after_its_data_was_read_is_complete() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    server = H2ServerConnection(_echo, theirs, client=None, server=None)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        client.initiate_connection()
        client.send_headers(1, REQUEST)
        client.send_data(1, b"body")
        await ours.send_all(client.data_to_send())
        await trio.testing.wait_all_tasks_blocked()  # the app read "body", more to come
        client.send_headers(1, [("x-checksum", "1")], end_stream=True)
        await ours.send_all(client.data_to_send())
        with trio.fail_after(5):
            assert await _answer(client, ours) == b"got body"
        nursery.cancel_scope.cancel()


async def test_an_overlong_frame_ends_the_connection_at_its_length_field() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    server = H2ServerConnection(_echo, theirs, client=None, server=None)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        client.initiate_connection()
        await ours.send_all(client.data_to_send())
        # The first 3 bytes of a frame header announcing 16 MiB: refused, not buffered for.
        await ours.send_all(b"\xff\xff\xff")
        answer = b""
        with trio.fail_after(5):
            while data := await ours.receive_some():
                answer += data
        assert b"\x07\x00\x00\x00\x00\x00" in answer  # a GOAWAY, then the server closed
        nursery.cancel_scope.cancel()
