"""A link (tele.rpc.h2link over tele.net.h2conn's HEADERS fast paths) against a hostile peer
that writes raw HEADERS: every bad block ends the link with a GOAWAY and a failure reason, no
exception leaves `serve_link`, and tele's own blocks open streams whose handler sees the
headers sent. The sans-IO equivalence with h2 is tests/net/test_h2conn_headers.py's."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
import hyperframe.frame
import pytest
import trio
import trio.testing

from tele.net import h2headers
from tele.rpc.h2link import H2Stream, serve_link

OPEN = [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("tele-session", "s1")]


def _headers_frame(stream_id: int, block: bytes) -> bytes:
    frame = hyperframe.frame.HeadersFrame(stream_id)
    frame.data = block
    frame.flags.add("END_HEADERS")
    return bytes(frame.serialize())


async def _against_raw_peer(frames: bytes) -> tuple[list[list[tuple[str, str]]], list[object]]:
    """Serve a link whose peer sends its preamble, then `frames`; the headers each handler
    saw, and the events the peer's stock h2 read from what the link answered."""
    ours, theirs = trio.testing.memory_stream_pair()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    seen: list[list[tuple[str, str]]] = []

    async def handler(stream: H2Stream) -> None:
        seen.append(list(stream.request_headers))
        await trio.sleep_forever()

    events: list[object] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_link, ours, handler)
            await theirs.send_all(peer.data_to_send() + frames)
            while True:
                data = await theirs.receive_some()
                if not data:
                    break
                try:
                    events += peer.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                    break
                if len(seen) == 2:  # both good streams are being served
                    break
                await theirs.send_all(peer.data_to_send())
            nursery.cancel_scope.cancel()
    return seen, events


async def test_tele_blocks_open_streams_whose_handlers_see_the_headers() -> None:
    block = h2headers.encode_block(OPEN) or b""
    seen, events = await _against_raw_peer(_headers_frame(1, block) + _headers_frame(3, block))
    assert seen == [OPEN, OPEN]
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


@pytest.mark.parametrize(
    "block",
    [
        b"\xbe",  # a dynamic-table reference (the table is empty)
        b"\x3f\xe1\x1f",  # a table size update after... nothing: allowed, but no :method
        b"\x01\x85abc",  # a truncated string
        b"\x01\x81\xff",  # Huffman garbage
        b"\x02\x07CONNECT\x01\x03a:1\x00\x0cTele-Session\x01s",  # an uppercase name
        b"\x02\x07CONNECT\x01\x03a:1\x00\x0ctele-session\x02\xff\xfe",  # not UTF-8
        bytes(hpack.Encoder().encode([(":method", "CONNECT"), (":method", "GET")])),
    ],
    ids=["dynamic", "size-update", "truncated", "huffman", "uppercase", "not-utf8", "twice"],
)
async def test_a_hostile_block_ends_the_link_with_a_goaway_and_nothing_escapes(
    block: bytes,
) -> None:
    seen, events = await _against_raw_peer(_headers_frame(1, block))
    assert seen == []
    (ended,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert ended.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
