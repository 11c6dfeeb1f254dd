"""The HEADERS fast paths of tele.net.h2conn (and the HPACK subset of tele.net.h2headers) give
what h2 gives: the same events, the same stream and connection state, the same answers to a
hostile peer (GOAWAY or stream reset as h2 decides), both when receiving and when sending, and
what they send is read by a stock h2 peer as h2's own encoding is (version skew).

Three endpoints are compared on the same input: tele's with the fast paths (`fast`), tele's with
them switched off (`slow`: exactly h2's code, with tele's buffers), and stock h2 (`stock`).
Driven with plain bytes: no I/O."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import ip_address
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hpack
import hpack.hpack
import hyperframe.exceptions
import hyperframe.frame
import pytest
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tele.net import h2headers, tunnel
from tele.net.h2conn import Connection, FrameBuffer
from tele.net.tunnel import Accept, Destination, OpenRequest, Protocol, Refuse, ResetReason

MAX_STREAMS = 4
MAX_LIST = 1024  # the decoder's max_header_list_size here (the links: 64 KiB)
KINDS = ("fast", "slow", "stock")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _config(client: bool) -> h2.config.H2Configuration:
    """The links' configuration (tele.rpc.h2link)."""
    return h2.config.H2Configuration(
        client_side=client,
        header_encoding="utf-8",
        validate_inbound_headers=True,
        normalize_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


def _endpoint(kind: str, client: bool) -> Any:
    """One side, its SETTINGS exchanged with a stock peer and acknowledged both ways."""
    conn: Any
    if kind == "stock":
        conn = h2.connection.H2Connection(config=_config(client))
    else:
        conn = Connection(config=_config(client))
        if kind == "slow":  # every fast path off: h2's own code with tele's buffers
            conn._plain_receive = conn._plain_send = False
            conn._receive_plain_data = lambda frame: None
            conn.send_data = functools.partial(h2.connection.H2Connection.send_data, conn)
            conn.end_stream = functools.partial(h2.connection.H2Connection.end_stream, conn)
    conn.local_settings = h2.settings.Settings(
        client=client,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_LIST,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100_000,
        },
    )
    conn.initiate_connection()
    conn.decoder.max_header_list_size = MAX_LIST
    peer = h2.connection.H2Connection(config=_config(not client))
    peer.local_settings = h2.settings.Settings(
        client=not client,
        initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS},
    )
    peer.initiate_connection()
    conn.receive_data(peer.data_to_send())
    peer.receive_data(conn.data_to_send())
    conn.receive_data(peer.data_to_send())
    conn.data_to_send()
    return conn


# -- what is compared ----------------------------------------------------------------------------


def _event(event: h2.events.Event) -> Any:
    fields = dict(vars(event))
    if "headers" in fields and fields["headers"] is not None:
        fields["headers"] = [(type(h).__name__, tuple(h)) for h in fields["headers"]]
    for key in ("stream_ended", "priority_updated"):
        if fields.get(key) is not None:
            fields[key] = _event(fields[key])
    return type(event).__name__, fields


def _error(exc: Exception) -> Any:
    if isinstance(exc, UnicodeDecodeError):
        # stock h2 lets this out of receive_data; tele's Connection makes it a protocol error
        return "ProtocolError", h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert isinstance(exc, h2.exceptions.ProtocolError), repr(exc)
    return "ProtocolError", exc.error_code


def _stream(stream: h2.stream.H2Stream) -> Any:
    return (
        dict(vars(stream.state_machine)),
        stream.max_outbound_frame_size,
        stream.request_method,
        stream.outbound_flow_control_window,
        dict(vars(stream._inbound_window_manager)),
        stream._expected_content_length,
        stream._actual_content_length,
        stream._authority,
    )


def _state(conn: Any, *, encoder: bool = True, decoder: bool = True) -> Any:
    """What a connection holds: both state machines, stream ids, windows, the HPACK tables."""
    table = conn.decoder.header_table
    return {
        "state": conn.state_machine.state,
        "highest": (conn.highest_inbound_stream_id, conn.highest_outbound_stream_id),
        "windows": (conn.inbound_flow_control_window, conn.outbound_flow_control_window),
        "decoder": (list(table.dynamic_entries), table.maxsize) if decoder else None,
        "encoder": list(conn.encoder.header_table.dynamic_entries) if encoder else None,
        "streams": {i: _stream(s) for i, s in conn.streams.items()},
    }


def _feed(conn: Any, chunks: list[bytes]) -> list[Any]:
    """Each chunk's events (or error) and what the connection answered, until an error."""
    transcript: list[Any] = []
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except (h2.exceptions.ProtocolError, UnicodeDecodeError) as exc:
            if isinstance(exc, UnicodeDecodeError):  # stock h2: end it as tele's Connection does
                conn._terminate_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            transcript.append(("error", _error(exc), bytes(conn.data_to_send())))
            break
        transcript.append(([_event(e) for e in events], bytes(conn.data_to_send())))
    return transcript


@contextmanager
def _counting() -> Iterator[dict[str, int]]:
    """How often h2's own HEADERS code ran (receive, send), on any connection."""
    counts = {"receive": 0, "send": 0}
    receive = h2.connection.H2Connection._receive_headers_frame
    send = h2.stream.H2Stream.send_headers

    def counted_receive(self: Any, frame: Any) -> Any:
        counts["receive"] += 1
        return receive(self, frame)

    def counted_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["send"] += 1
        return send(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(h2.connection.H2Connection, "_receive_headers_frame", counted_receive)
        patch.setattr(h2.stream.H2Stream, "send_headers", counted_send)
        yield counts


# -- header blocks, encoded every way HPACK allows -------------------------------------------------

_STATIC = hpack.table.HeaderTable.STATIC_TABLE
Field = tuple[str | bytes, str | bytes]


def _raw(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


def _integer(value: int, prefix: int, flags: int) -> bytes:
    encoded = hpack.hpack.encode_integer(value, prefix)
    encoded[0] |= flags
    return bytes(encoded)


def _string(raw: bytes, huffman: bool) -> bytes:
    if huffman:
        coded = hpack.Encoder().huffman_coder.encode(raw)
        return _integer(len(coded), 7, 0x80) + coded
    return _integer(len(raw), 7, 0) + raw


@st.composite
def _encoded_field(draw: st.DrawFn, field: Field) -> bytes:
    """One field in any representation: indexed, or a literal (without indexing, never
    indexed, or with incremental indexing) with an indexed or a literal name, Huffman or not."""
    name, value = _raw(field[0]), _raw(field[1])
    full = [i for i, entry in enumerate(_STATIC, 1) if entry == (name, value)]
    named = [i for i, entry in enumerate(_STATIC, 1) if entry[0] == name]
    kinds = ["plain", "never", "indexing"] + (["indexed"] if full else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "indexed":
        return _integer(full[0], 7, 0x80)
    prefix, flags = {"plain": (4, 0x00), "never": (4, 0x10), "indexing": (6, 0x40)}[kind]
    if named and draw(st.booleans()):
        head = _integer(draw(st.sampled_from(named)), prefix, flags)
    else:
        head = bytes([flags]) + _string(name, draw(st.booleans()))
    return head + _string(value, draw(st.booleans()))


@st.composite
def _block(draw: st.DrawFn, fields: list[Field]) -> bytes:
    return b"".join(draw(_encoded_field(f)) for f in fields)


_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
_IPS = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@st.composite
def open_requests(draw: st.DrawFn) -> OpenRequest:
    destination = Destination(
        draw(st.sampled_from(Protocol)), draw(_IPS), draw(st.integers(1, 65_535))
    )
    dial_id = draw(st.none() | _IDS)
    return OpenRequest(destination, draw(_IDS), dial_id, draw(st.booleans()))


def _rpc_request(path: str, timeout: float | None) -> list[tuple[str, str]]:
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "tele"), (":path", path)]
    if timeout is not None:
        headers.append(("tele-timeout", str(max(1, int(timeout * 1000)))))
    return headers  # as tele.rpc.wire.request_headers (rpc is above net)


requests = st.one_of(
    open_requests().map(OpenRequest.to_headers),
    st.builds(
        _rpc_request,
        st.from_regex(r"/[a-z]{1,10}/[A-Za-z]{1,10}", fullmatch=True),
        st.none() | st.floats(0.001, 1000),
    ),
)
responses = st.one_of(
    st.just(Accept().to_headers()),
    st.builds(
        Refuse,
        st.sampled_from(ResetReason),
        st.text(st.characters(codec="ascii"), max_size=40),
    ).map(Refuse.to_headers),
    st.just([(":status", "200"), ("tele-code", "not-found"), ("tele-message", "no%20such")]),
)

_NAMES: list[str | bytes] = [
    ":method", ":authority", ":scheme", ":path", ":status", ":protocol", ":foo", "",
    "tele-session", "tele-protocol", "tele-early", "tele-reason", "tele-detail", "Tele-Session",
    ":Method", "connection", "te", "host", "content-length", "keep-alive", "x-other", "a:b",
    "tele session", b"tele-\xff",
]  # fmt: skip
_VALUES: list[str | bytes] = [
    "CONNECT", "GET", "POST", "200", "100", "404", "1.2.3.4:80", "tcp", "s1", "1", "trailers",
    "", " lead", "trail ", "in\tside", "nul\x00", "cr\r", "lf\n", "caf\u00e9", b"\xff\xfe",
    "/", "x" * 300, "\x7f",
]  # fmt: skip


@st.composite
def hostile_fields(draw: st.DrawFn, base: list[tuple[str, str]]) -> list[Field]:
    """`base` changed by a few edits: fields dropped, repeated, moved, renamed, revalued."""
    fields: list[Field] = list(base)
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["drop", "repeat", "move", "name", "value", "add"]))
        at = draw(st.integers(0, max(0, len(fields) - 1)))
        if edit == "add" or not fields:
            fields.insert(at, (draw(st.sampled_from(_NAMES)), draw(st.sampled_from(_VALUES))))
        elif edit == "drop":
            del fields[at]
        elif edit == "repeat":
            fields.insert(draw(st.integers(0, len(fields))), fields[at])
        elif edit == "move":
            fields.insert(draw(st.integers(0, len(fields))), fields.pop(at))
        elif edit == "name":
            fields[at] = (draw(st.sampled_from(_NAMES)), fields[at][1])
        else:
            fields[at] = (fields[at][0], draw(st.sampled_from(_VALUES)))
    return fields


_TOKENS = [
    b"\xbe",  # indexed 62: the dynamic table (empty here)
    b"\x80",  # indexed 0: invalid
    b"\xff\xff\xff\xff\xff\xff\xff",  # an integer that never ends
    b"\x3f\xe1\x1f",  # table size update to 4096
    b"\x3f\xe1\xff\x7f",  # table size update above the maximum
    b"\x20",  # table size update to 0
    b"\x0f",  # literal, name index continues past the end
    b"\x0f\x2f\x01a",  # literal, name index 62
    b"\x00\x85abc",  # literal name truncated
    b"\x01\x85abc",  # literal value truncated
    b"\x00\x83\xff\xff\xff\x01a",  # Huffman garbage as the name
    b"\x01\x81\xff",  # Huffman garbage (EOS padding) as the value
    b"\x41\x03a:1",  # incremental indexing of :authority
    b"\x7f",  # indexed 127 (needs more bytes)
]


@st.composite
def request_blocks(draw: st.DrawFn) -> bytes:
    base = draw(requests)
    choice = draw(st.sampled_from(["valid", "tele", "stock", "hostile", "token", "random"]))
    if choice == "tele":
        encoded = h2headers.encode_block(base)
        assert encoded is not None
        return encoded
    if choice == "stock":
        return bytes(hpack.Encoder().encode(base))
    if choice == "random":
        return draw(st.binary(max_size=40))
    fields: list[Field] = list(base)
    if choice == "hostile":
        fields = draw(hostile_fields(base))
    block = draw(_block(fields))
    if choice == "token":
        at = draw(st.integers(0, len(block)))
        block = block[:at] + draw(st.sampled_from(_TOKENS)) + block[at:]
    return block


def _frame(kind: type[hyperframe.frame.Frame], stream_id: int, data: bytes, *flags: str) -> bytes:
    frame = kind(stream_id)
    frame.data = data
    for flag in flags:
        frame.flags.add(flag)
    return bytes(frame.serialize())


@st.composite
def headers_frames(draw: st.DrawFn, stream_id: int, block: bytes) -> bytes:
    """The block as a HEADERS frame (END_STREAM or not), now and then padded, with priority
    information, or split into CONTINUATION frames."""
    flags = ["END_STREAM"] if draw(st.booleans()) else []
    shape = draw(st.sampled_from(["plain"] * 6 + ["padded", "priority", "continued"]))
    frame = hyperframe.frame.HeadersFrame(stream_id)
    for flag in flags:
        frame.flags.add(flag)
    if shape == "continued" and len(block) > 1:
        at = draw(st.integers(1, len(block) - 1))
        frame.data = block[:at]
        rest = _frame(hyperframe.frame.ContinuationFrame, stream_id, block[at:], "END_HEADERS")
        return bytes(frame.serialize()) + rest
    frame.data = block
    frame.flags.add("END_HEADERS")
    if shape == "padded":
        frame.flags.add("PADDED")
        frame.pad_length = 3
    elif shape == "priority":
        frame.flags.add("PRIORITY")
        frame.depends_on, frame.stream_weight = 0, 15
    return bytes(frame.serialize())


# -- receiving a request (server side) -----------------------------------------------------------


@st.composite
def request_chunks(draw: st.DrawFn) -> list[bytes]:
    """A few HEADERS frames from a client, on stream ids new, repeated, lower, even or past
    the concurrency limit, with the client ending or resetting some streams in between."""
    chunks = []
    for _ in range(draw(st.integers(1, 7))):
        stream_id = draw(st.sampled_from([1, 3, 5, 7, 9, 11, 13, 2]))
        chunks.append(draw(headers_frames(stream_id, draw(request_blocks()))))
        after = draw(st.sampled_from(["none", "none", "data", "end", "empty-end", "reset"]))
        if after == "data":
            chunks.append(_frame(hyperframe.frame.DataFrame, stream_id, b"x"))
        elif after == "end":
            chunks.append(_frame(hyperframe.frame.DataFrame, stream_id, b"x", "END_STREAM"))
        elif after == "empty-end":
            chunks.append(_frame(hyperframe.frame.DataFrame, stream_id, b"", "END_STREAM"))
        elif after == "reset":
            reset = hyperframe.frame.RstStreamFrame(stream_id)
            reset.error_code = 8
            chunks.append(bytes(reset.serialize()))
    return chunks


def _received(kind: str, chunks: list[bytes]) -> tuple[list[Any], Any]:
    conn = _endpoint(kind, client=False)
    transcript = _feed(conn, chunks)
    return transcript, _state(conn)


def _assert_all_agree(
    run: Callable[[str, list[bytes]], tuple[list[Any], Any]], chunks: list[bytes]
) -> None:
    """The fast paths give what tele without them gives (events and state), and stock h2's
    events."""
    fast, fast_state = run("fast", chunks)
    slow, slow_state = run("slow", chunks)
    stock, _ = run("stock", chunks)
    assert fast == slow
    assert fast_state == slow_state
    assert fast == stock


@SETTINGS
@given(request_chunks())
def test_a_server_receives_any_request_headers_as_h2_does(chunks: list[bytes]) -> None:
    _assert_all_agree(_received, chunks)


@SETTINGS
@given(st.lists(st.tuples(requests, st.booleans()), min_size=1, max_size=MAX_STREAMS))
def test_tele_requests_take_the_fast_path_with_the_same_events(
    opened: list[tuple[list[tuple[str, str]], bool]],
) -> None:
    chunks = []
    for n, (headers, end) in enumerate(opened):
        block = h2headers.encode_block(headers)
        assert block is not None
        chunks.append(_frame(hyperframe.frame.HeadersFrame, 2 * n + 1, block, "END_HEADERS"))
        if end:
            chunks[-1] = _frame(
                hyperframe.frame.HeadersFrame, 2 * n + 1, block, "END_HEADERS", "END_STREAM"
            )
    with _counting() as counts:
        fast, fast_state = _received("fast", chunks)
    assert counts["receive"] == 0  # no block went to h2's own path
    slow, slow_state = _received("slow", chunks)
    assert (fast, fast_state) == (slow, slow_state)
    assert fast == _received("stock", chunks)[0]
    for n, (headers, end) in enumerate(opened):
        (event, *ended), _ = fast[n]
        assert event[0] == "RequestReceived"
        assert [h for _, h in event[1]["headers"]] == headers
        assert all(kind == "HeaderTuple" for kind, _ in event[1]["headers"])
        assert bool(ended) == end


# -- receiving a response (client side) ----------------------------------------------------------


def _client(kind: str) -> Any:
    """A client with streams 1 and 3 open and stream 5 half-closed (its request ended), opened
    by h2's own path in every kind (the send side is compared further below)."""
    conn = _endpoint(kind, client=True)
    if kind == "fast":
        conn._plain_send = False
    for stream_id in (1, 3, 5):
        conn.send_headers(stream_id, _rpc_request("/a/b", None), end_stream=stream_id == 5)
    conn.data_to_send()
    if kind == "fast":
        conn._plain_send = True
    return conn


@st.composite
def response_blocks(draw: st.DrawFn) -> bytes:
    base = draw(responses)
    choice = draw(st.sampled_from(["valid", "tele", "stock", "hostile", "token", "informational"]))
    if choice == "tele":
        encoded = h2headers.encode_block(base)
        assert encoded is not None
        return encoded
    if choice == "stock":
        return bytes(hpack.Encoder().encode(base))
    fields: list[Field] = list(base)
    if choice == "hostile":
        fields = draw(hostile_fields(base))
    elif choice == "informational":
        fields = [(":status", draw(st.sampled_from(["100", "103", "1"])))]
    block = draw(_block(fields))
    if choice == "token":
        at = draw(st.integers(0, len(block)))
        block = block[:at] + draw(st.sampled_from(_TOKENS)) + block[at:]
    return block


@st.composite
def response_chunks(draw: st.DrawFn) -> list[bytes]:
    """Responses on streams the client opened (again and again: trailers), on one it never
    opened, on an even one, with the server ending or resetting streams in between."""
    chunks = []
    for _ in range(draw(st.integers(1, 6))):
        stream_id = draw(st.sampled_from([1, 3, 5, 7, 2]))
        chunks.append(draw(headers_frames(stream_id, draw(response_blocks()))))
        if draw(st.booleans()):
            reset = hyperframe.frame.RstStreamFrame(stream_id)
            reset.error_code = 8
            chunks.append(bytes(reset.serialize()))
    return chunks


def _answered(kind: str, chunks: list[bytes]) -> tuple[list[Any], Any]:
    conn = _client(kind)
    transcript = _feed(conn, chunks)
    return transcript, _state(conn)


@SETTINGS
@given(response_chunks())
def test_a_client_receives_any_response_headers_as_h2_does(chunks: list[bytes]) -> None:
    _assert_all_agree(_answered, chunks)


@SETTINGS
@given(responses, st.sampled_from([1, 3, 5]), st.booleans())
def test_tele_responses_take_the_fast_path_with_the_same_events(
    headers: list[tuple[str, str]], stream_id: int, end: bool
) -> None:
    block = h2headers.encode_block(headers)
    assert block is not None
    flags = ("END_HEADERS", "END_STREAM") if end else ("END_HEADERS",)
    chunks = [_frame(hyperframe.frame.HeadersFrame, stream_id, block, *flags)]
    with _counting() as counts:
        fast, fast_state = _answered("fast", chunks)
    assert counts["receive"] == 0
    assert (fast, fast_state) == _answered("slow", chunks)
    assert fast == _answered("stock", chunks)[0]
    (event, *ended), _ = fast[0]
    assert event[0] == "ResponseReceived"
    assert [h for _, h in event[1]["headers"]] == headers
    assert bool(ended) == end
    if end and stream_id == 5:  # its request had ended: the stream is closed now
        assert fast_state["streams"][5][0]["state"] == h2.stream.StreamState.CLOSED


def test_never_indexed_fields_stay_never_indexed() -> None:
    block = b"\x12\x07CONNECT\x11\x03a:1" + b"\x10\x0ctele-session\x02s1"
    chunks = [_frame(hyperframe.frame.HeadersFrame, 1, block, "END_HEADERS")]
    fast, _ = _received("fast", chunks)
    assert fast == _received("stock", chunks)[0]
    headers = fast[0][0][0][1]["headers"]
    assert [kind for kind, _ in headers] == ["NeverIndexedHeaderTuple"] * 3


# -- sending ------------------------------------------------------------------------------------


def _sent_requests(kind: str, opened: list[tuple[list[tuple[str, str]], bool]]) -> Any:
    conn = _endpoint(kind, client=True)
    for headers, end in opened:
        conn.send_headers(conn.get_next_available_stream_id(), headers, end_stream=end)
    return conn


@SETTINGS
@given(st.lists(st.tuples(requests, st.booleans()), min_size=1, max_size=MAX_STREAMS))
def test_a_client_sends_requests_as_h2_does_and_stock_h2_reads_them_alike(
    opened: list[tuple[list[tuple[str, str]], bool]],
) -> None:
    with _counting() as counts:
        fast = _sent_requests("fast", opened)
    assert counts["send"] == 0
    slow = _sent_requests("slow", opened)
    # The same streams and states; only the encoder's table differs (tele's never fills it).
    assert _state(fast, encoder=False) == _state(slow, encoder=False)
    assert not fast.encoder.header_table.dynamic_entries
    server_fast = _endpoint("stock", client=False)
    server_slow = _endpoint("stock", client=False)
    got_fast = _feed(server_fast, [fast.data_to_send()])
    got_slow = _feed(server_slow, [slow.data_to_send()])
    assert got_fast == got_slow
    assert _state(server_fast, encoder=False)["streams"] == _state(server_slow)["streams"]
    assert not server_fast.decoder.header_table.dynamic_entries


@SETTINGS
@given(
    st.lists(st.tuples(responses, st.booleans()), min_size=1, max_size=MAX_STREAMS),
    st.booleans(),
)
def test_a_server_sends_responses_as_h2_does_and_stock_h2_reads_them_alike(
    answers: list[tuple[list[tuple[str, str]], bool]], request_ended: bool
) -> None:
    results = {}
    for kind in ("fast", "slow"):
        server = _endpoint(kind, client=False)
        client = _endpoint("stock", client=True)
        for n in range(len(answers)):
            client.send_headers(
                2 * n + 1, [(":method", "CONNECT"), (":authority", "a:1")], end_stream=request_ended
            )
        server.receive_data(client.data_to_send())
        server.data_to_send()
        with _counting() as counts:
            for n, (headers, end) in enumerate(answers):
                server.send_headers(2 * n + 1, headers, end_stream=end)
        assert counts["send"] == (0 if kind == "fast" else len(answers))
        got = _feed(client, [server.data_to_send()])
        results[kind] = (
            _state(server, encoder=False),
            got,
            _state(client, encoder=False)["streams"],
        )
    assert results["fast"] == results["slow"]


def test_what_the_fast_path_declines_is_sent_by_h2() -> None:
    """Informational responses, trailers, bytes headers, never-indexed tuples, a block too big
    for one frame: h2's own code sends them, and the peer reads them."""
    server = _endpoint("fast", client=False)
    client = _endpoint("stock", client=True)
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "a:1")])
    client.send_headers(3, [(":method", "CONNECT"), (":authority", "a:1")])
    server.receive_data(client.data_to_send())
    with _counting() as counts:
        server.send_headers(1, [(":status", "100")])
        server.send_headers(1, [(":status", "200")])  # fast
        server.send_headers(1, [("tele-code", "ok")], end_stream=True)  # trailers
        server.send_headers(3, [(b":status", b"200"), NeverIndexedHeaderTuple("x", "y")])
    assert counts["send"] == 3
    events = client.receive_data(server.data_to_send())
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "InformationalResponseReceived",
        "ResponseReceived",
        "TrailersReceived",
        "StreamEnded",
        "ResponseReceived",
    ]
    big = _endpoint("fast", client=True)
    with _counting() as counts:
        big.send_headers(1, [(":method", "CONNECT"), (":authority", "a:1"), ("x", "y" * 20000)])
    assert counts["send"] == 1  # CONTINUATION frames: h2's


def _attempts(kind: str, attempts: list[tuple[int, list[Any], bool]]) -> list[Any]:
    client = _endpoint(kind, client=True)
    outcome = []
    for stream_id, headers, reset in attempts:
        try:
            client.send_headers(stream_id, headers)
            outcome.append("sent")
        except h2.exceptions.ProtocolError as exc:
            outcome.append(type(exc).__name__)
        if reset and stream_id in client.streams and not client.streams[stream_id].closed:
            client.reset_stream(stream_id)
    return [outcome, _state(client, encoder=False)["streams"]]


@SETTINGS
@given(
    st.lists(
        st.tuples(st.sampled_from([1, 3, 5, 7, 9, 11, 2]), requests, st.booleans()),
        min_size=1,
        max_size=8,
    )
)
def test_the_fast_send_path_refuses_what_h2_refuses(
    attempts: list[tuple[int, list[Any], bool]],
) -> None:
    """Stream ids reused, lower, even (a client's must be odd), past the peer's limit.

    (Against h2's code in tele's Connection: stock h2 sweeps closed streams at every new one,
    tele's only near the limit, so a closed stream's id is refused as StreamClosedError there
    and as StreamIDTooLowError by stock h2, both protocol errors, before and after this.)"""
    assert _attempts("fast", attempts) == _attempts("slow", attempts)


# -- round trips with stock h2 -------------------------------------------------------------------


def _pump(a: Any, b: Any) -> tuple[list[Any], list[Any]]:
    """Move bytes both ways until both are quiet; the events each side got."""
    got_a: list[Any] = []
    got_b: list[Any] = []
    while True:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return got_a, got_b
        if out_a:
            got_b += [_event(e) for e in b.receive_data(out_a)]
        if out_b:
            got_a += [_event(e) for e in a.receive_data(out_b)]


def _round_trip(
    client: Any, server: Any, opens: list[OpenRequest], answer: Callable[[int], list[Any]]
) -> tuple[list[Any], list[Any]]:
    for n, request in enumerate(opens):
        client.send_headers(2 * n + 1, request.to_headers(), end_stream=request.early)
    got_client, got_server = _pump(client, server)
    for n in range(len(opens)):
        server.send_headers(2 * n + 1, answer(n), end_stream=n % 2 == 1)
    more_client, more_server = _pump(client, server)
    return got_client + more_client, got_server + more_server


@pytest.mark.parametrize(
    ("client_kind", "server_kind"),
    [("fast", "stock"), ("stock", "fast"), ("fast", "fast")],
)
@SETTINGS
@given(st.lists(open_requests(), min_size=1, max_size=MAX_STREAMS), st.data())
def test_round_trips_with_stock_h2_either_way_match_stock_with_stock(
    client_kind: str, server_kind: str, opens: list[OpenRequest], data: st.DataObject
) -> None:
    answers = [data.draw(responses) for _ in opens]

    def pair(c: str, s: str) -> tuple[Any, Any]:
        client = _endpoint(c, client=True)
        server = _endpoint(s, client=False)
        return client, server

    ours = _round_trip(*pair(client_kind, server_kind), opens, answers.__getitem__)
    theirs = _round_trip(*pair("stock", "stock"), opens, answers.__getitem__)
    assert ours == theirs
    server_got = ours[1]
    requests_got = [e for e in server_got if e[0] == "RequestReceived"]
    assert [
        OpenRequest.from_headers([h for _, h in e[1]["headers"]]) for e in requests_got
    ] == opens


# -- the attacks, one by one --------------------------------------------------------------------


_AN_OPEN = OpenRequest(Destination(Protocol.TCP, ip_address("10.0.0.1"), 80), "session-1")
_OPEN = h2headers.encode_block([(":method", "CONNECT"), (":authority", "10.0.0.1:80")]) or b""


@pytest.mark.parametrize(
    ("block", "error"),
    [
        (b"\xbe" + _OPEN, h2.errors.ErrorCodes.PROTOCOL_ERROR),  # dynamic-table reference
        (b"\x80" + _OPEN, h2.errors.ErrorCodes.PROTOCOL_ERROR),  # index 0
        (_OPEN + b"\x3f\xe1\x1f", h2.errors.ErrorCodes.PROTOCOL_ERROR),  # late size update
        (_OPEN + b"\x01\x85abc", h2.errors.ErrorCodes.PROTOCOL_ERROR),  # truncated string
        (_OPEN + b"\x0f", h2.errors.ErrorCodes.PROTOCOL_ERROR),  # truncated integer
        (_OPEN + b"\x01\x81\xff", h2.errors.ErrorCodes.PROTOCOL_ERROR),  # Huffman garbage
        (_OPEN + b"\x00\x0cTele-Session\x01s", h2.errors.ErrorCodes.PROTOCOL_ERROR),
        (_OPEN + b"\x02\x04POST", h2.errors.ErrorCodes.PROTOCOL_ERROR),  # :method twice
        (_OPEN + b"\x00\x0ctele-session\x01s\x04\x01/", h2.errors.ErrorCodes.PROTOCOL_ERROR),
        (b"\x02\x07CONNECT", h2.errors.ErrorCodes.PROTOCOL_ERROR),  # no :authority
        (_OPEN + b"\x04\x01/", h2.errors.ErrorCodes.PROTOCOL_ERROR),  # :path in CONNECT
        (_OPEN + b"\x00\x0aconnection\x05close", h2.errors.ErrorCodes.PROTOCOL_ERROR),
        (_OPEN + b"\x00\x0ctele-session\x02\xff\xfe", h2.errors.ErrorCodes.PROTOCOL_ERROR),
        (_OPEN + b"\x00\x01x\x7f\x81\x08" + b"x" * 1200, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM),
    ],
    ids=[
        "dynamic-index", "index-0", "size-update", "truncated-string", "truncated-integer",
        "huffman-garbage", "uppercase-name", "duplicate-pseudo", "misplaced-pseudo",
        "no-authority", "path-in-connect", "connection-header", "not-utf8", "oversize-list",
    ],
)  # fmt: skip
def test_a_hostile_request_block_ends_the_connection_as_h2_ends_it(
    block: bytes, error: int
) -> None:
    chunks = [_frame(hyperframe.frame.HeadersFrame, 1, block, "END_HEADERS")]
    fast, fast_state = _received("fast", chunks)
    assert fast == _received("stock", chunks)[0]
    assert (fast, fast_state) == _received("slow", chunks)
    (kind, (name, code), goaway) = fast[0]
    assert (kind, name, code) == ("error", "ProtocolError", error)
    assert goaway[3] == hyperframe.frame.GoAwayFrame.type
    assert int.from_bytes(goaway[-4:], "big") == error


@pytest.mark.parametrize(
    ("stream_ids", "last"),
    [
        ((1, 1), "GoAwayFrame"),  # HEADERS again on an open stream (trailers without END_STREAM)
        ((3, 1), "GoAwayFrame"),  # a lower stream id
        ((2,), "GoAwayFrame"),  # an even stream id from a client
        ((1, 3, 5, 7, 9), "GoAwayFrame"),  # past the concurrency limit
    ],
)
def test_headers_on_the_wrong_stream_end_as_h2_ends_them(
    stream_ids: tuple[int, ...], last: str
) -> None:
    chunks = [_frame(hyperframe.frame.HeadersFrame, i, _OPEN, "END_HEADERS") for i in stream_ids]
    fast, fast_state = _received("fast", chunks)
    assert fast == _received("stock", chunks)[0]
    assert (fast, fast_state) == _received("slow", chunks)
    assert fast[-1][0] == "error"
    assert fast[-1][2][3] == getattr(hyperframe.frame, last).type


def test_headers_on_a_stream_the_peer_reset_get_a_reset_back_as_in_h2() -> None:
    reset = hyperframe.frame.RstStreamFrame(1)
    reset.error_code = 8
    chunks = [
        _frame(hyperframe.frame.HeadersFrame, 1, _OPEN, "END_HEADERS"),
        bytes(reset.serialize()),
        _frame(hyperframe.frame.HeadersFrame, 1, _OPEN, "END_HEADERS"),
        _frame(hyperframe.frame.HeadersFrame, 3, _OPEN, "END_HEADERS", "END_STREAM"),
    ]
    fast, fast_state = _received("fast", chunks)
    assert fast == _received("stock", chunks)[0]
    assert (fast, fast_state) == _received("slow", chunks)
    assert fast[-1][0][0][0] == "RequestReceived"  # stream 3 is still taken


def test_a_header_that_is_not_utf8_is_a_protocol_error_not_an_escaping_exception() -> None:
    """Stock h2 raises UnicodeDecodeError out of receive_data here (after hpack, decoding the
    headers for the event): tele's Connection makes it a GOAWAY(PROTOCOL_ERROR)."""
    block = bytes(hpack.Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"\xff")]))
    conn = _endpoint("slow", client=False)
    with pytest.raises(h2.exceptions.ProtocolError, match="not UTF-8"):
        conn.receive_data(_frame(hyperframe.frame.HeadersFrame, 1, block, "END_HEADERS"))
    goaway = conn.data_to_send()
    assert goaway[3] == hyperframe.frame.GoAwayFrame.type
    assert int.from_bytes(goaway[-4:], "big") == h2.errors.ErrorCodes.PROTOCOL_ERROR


# -- the codec by itself -------------------------------------------------------------------------


@SETTINGS
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=300)), max_size=8))
def test_the_encoder_writes_what_stock_hpack_reads_back_and_never_uses_the_table(
    headers: list[tuple[str, str]],
) -> None:
    block = h2headers.encode_block(headers)
    if any("\ud800" <= c <= "\udfff" for pair in headers for c in "".join(pair)):
        assert block is None  # not encodable as UTF-8: h2 raises its own error for it
        return
    assert block is not None
    decoder = hpack.Decoder(max_header_list_size=1 << 20)
    assert decoder.decode(block) == headers
    assert len(decoder.header_table.dynamic_entries) == 0


def test_the_encoder_declines_what_is_not_a_list_of_str_pairs() -> None:
    assert h2headers.encode_block([(b":status", b"200")]) is None
    assert h2headers.encode_block([HeaderTuple(":status", "200")]) is None
    assert h2headers.encode_block(((":status", "200"),)) is None
    assert h2headers.encode_block([(":status", "200", True)]) is None


def test_the_encoder_cache_stays_bounded() -> None:
    for n in range(3 * 1024):
        h2headers.encode_block([(":authority", f"10.0.{n // 256}.{n % 256}:80")])
    assert len(h2headers._cache) <= 1024


def test_the_h2_internals_the_fast_paths_set_are_still_there() -> None:
    conn = h2.connection.H2Connection(config=_config(True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "a:1")])
    stream = conn.streams[1]
    for name in (
        "request_method",
        "_authority",
        "_expected_content_length",
        "max_outbound_frame_size",
    ):
        assert hasattr(stream, name), name
    machine = stream.state_machine
    for name in ("client", "headers_sent", "headers_received", "stream_closed_by", "state"):
        assert hasattr(machine, name), name
    assert hasattr(conn.encoder, "table_size_changes")
    assert hasattr(conn.decoder, "max_allowed_table_size")
    assert hasattr(conn, "_terminate_connection")


def test_a_refusal_whose_detail_is_cut_at_a_space_does_not_end_the_peers_link() -> None:
    """h2 refuses a header value with a blank at either end as a protocol error of the whole
    connection: a detail cut at MAX_DETAIL on a space used to end every stream of the link."""
    detail = "x" * (tunnel.MAX_DETAIL - 1) + " and more"
    headers = Refuse(ResetReason.REFUSED, detail).to_headers()
    assert headers[-1] == ("tele-detail", "x" * (tunnel.MAX_DETAIL - 1))
    for kind in KINDS:
        server = _endpoint(kind, client=False)
        client = _endpoint("stock", client=True)
        client.send_headers(1, [(":method", "CONNECT"), (":authority", "a:1")])
        server.receive_data(client.data_to_send())
        server.send_headers(1, headers, end_stream=True)
        events = client.receive_data(server.data_to_send())
        assert isinstance(events[0], h2.events.ResponseReceived)
        assert tunnel.decode_response(list(events[0].headers)) == Refuse(
            ResetReason.REFUSED, "x" * (tunnel.MAX_DETAIL - 1)
        )


# -- frames --------------------------------------------------------------------------------------


def _parsed(frame: hyperframe.frame.Frame) -> Any:
    fields = {k: v for k, v in vars(frame).items() if k != "flags"}
    fields["data"] = bytes(fields.get("data", b""))
    return type(frame).__name__, sorted(frame.flags), fields


@st.composite
def wire_frames(draw: st.DrawFn) -> bytes:
    """HEADERS (any flags, the stream id's reserved bit set or not), CONTINUATION and DATA."""
    kind = draw(st.sampled_from([0x0, 0x1, 0x1, 0x9]))
    flags = draw(st.sampled_from([0x0, 0x1, 0x4, 0x5, 0x8, 0x20, 0x25, 0x2D]))
    stream_id = draw(st.sampled_from([1, 3, 0x80000001, 0x80000000, 0]))
    payload = draw(st.binary(max_size=30))
    if flags & 0x8 and kind in (0x0, 0x1):  # PADDED: a pad length that fits, most of the time
        payload = bytes([draw(st.integers(0, len(payload) + 1))]) + payload
    header = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big")
    return header + payload


def _frames(buffer: h2.frame_buffer.FrameBuffer, chunks: list[bytes]) -> list[Any]:
    out: list[Any] = []
    buffer.max_frame_size = 16_384  # as h2's receive_data sets it
    try:
        for chunk in chunks:
            buffer.add_data(chunk)
            out += [_parsed(frame) for frame in buffer]
    except (h2.exceptions.ProtocolError, hyperframe.exceptions.InvalidPaddingError) as exc:
        out.append(("error", type(exc).__name__))
    return out


@SETTINGS
@given(st.lists(wire_frames(), min_size=1, max_size=6), st.data())
def test_the_frame_buffer_builds_the_frames_hyperframe_builds(
    frames: list[bytes], data: st.DataObject
) -> None:
    wire = b"".join(frames)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=4))))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    ours = _frames(FrameBuffer(server=False), chunks)
    stock = _frames(h2.frame_buffer.FrameBuffer(server=False), chunks)
    assert ours == stock


def test_the_flags_of_a_plain_headers_frame_cannot_be_changed() -> None:
    buffer = FrameBuffer(server=False)
    buffer.max_frame_size = 16_384
    buffer.add_data(_frame(hyperframe.frame.HeadersFrame, 1, _OPEN, "END_HEADERS"))
    (frame,) = list(buffer)
    with pytest.raises(TypeError):
        frame.flags.add("END_STREAM")


# -- DATA and END_STREAM, both ways ----------------------------------------------------------------

_OPS = st.tuples(
    st.sampled_from(["client", "server"]),
    st.sampled_from([1, 3, 5, 7]),
    st.sampled_from(["data", "data", "data-end", "end"]),
    st.one_of(st.binary(max_size=20), st.integers(0, 16_384).map(lambda n: b"x" * n)),
    st.sampled_from([None, None, 0, 1, 16_384, 40_000]),  # then acknowledged by the receiver
)


@SETTINGS
@given(st.lists(_OPS, max_size=12))
def test_data_and_end_stream_either_way_do_what_h2_does(
    ops: list[tuple[str, int, str, bytes, int | None]],
) -> None:
    """Streams opened and answered, then DATA with or without END_STREAM and bare END_STREAMs
    from either side in any order (after an end too, on a stream never opened), acknowledged
    by the receiver (WINDOW_UPDATEs once half a window was read): the same answers, events,
    windows and stream states as h2's own code."""
    results = {}
    for kind in ("fast", "slow"):
        client = _endpoint(kind, client=True)
        server = _endpoint(kind, client=False)
        for stream_id in (1, 3, 5):
            client.send_headers(stream_id, _rpc_request("/a/b", None))
        server.receive_data(client.data_to_send())
        for stream_id in (1, 3, 5):
            server.send_headers(stream_id, Accept().to_headers())
        client.receive_data(server.data_to_send())
        log: list[Any] = []
        for side, stream_id, op, payload, acknowledged in ops:
            sender, receiver = (client, server) if side == "client" else (server, client)
            try:
                if op == "end":
                    sender.end_stream(stream_id)
                else:
                    sender.send_data(stream_id, payload, end_stream=op == "data-end")
                log.append("sent")
            except (h2.exceptions.ProtocolError, KeyError) as exc:  # h2: KeyError for b"" on 7
                log.append(type(exc).__name__)
            log.append(_feed(receiver, [sender.data_to_send()]))
            if acknowledged is not None:
                try:
                    receiver.acknowledge_received_data(acknowledged, stream_id)
                    log.append(("acknowledged", bytes(receiver.data_to_send())))
                except h2.exceptions.ProtocolError as exc:
                    log.append(type(exc).__name__)
        tables = {"encoder": False, "decoder": False}
        results[kind] = (log, _state(client, **tables), _state(server, **tables))
    assert results["fast"] == results["slow"]


def test_a_remembered_block_is_judged_against_each_limit_and_handed_out_as_a_new_list() -> None:
    block = h2headers.encode_block(OpenRequest.to_headers(_AN_OPEN)) or b""
    first = h2headers.decode_request(block, 1 << 16)
    assert first is not None and len(first) == 4
    first.append(HeaderTuple("x", "y"))  # a consumer changing its list changes nobody else's
    again = h2headers.decode_request(block, 1 << 16)
    assert again is not None and len(again) == 4 and again is not first
    size = sum(32 + len(n) + len(v) for n, v in again)
    assert h2headers.decode_request(block, size) == again
    assert h2headers.decode_request(block, size - 1) is None  # h2 then refuses it (too big)


def test_the_decoded_blocks_remembered_stay_bounded() -> None:
    for n in range(3 * 256):
        request = [(":method", "CONNECT"), (":authority", f"10.1.{n // 256}.{n % 256}:80")]
        assert h2headers.decode_request(h2headers.encode_block(request) or b"", 1 << 16)
    assert len(h2headers._requests) <= 256
    long = [(":method", "CONNECT"), (":authority", "a:1"), ("tele-detail", "x" * 600)]
    assert h2headers.decode_request(h2headers.encode_block(long) or b"", 1 << 16)
    assert all(len(block) <= 512 for block in h2headers._requests)


def test_headers_on_a_stream_closed_both_ways_end_the_connection_as_in_h2() -> None:
    """The client ended stream 1, the server answered with END_STREAM: a new HEADERS on it
    is a connection error (STREAM_CLOSED) in h2, with and without the fast paths."""
    outcomes = []
    for kind in KINDS:
        server = _endpoint(kind, client=False)
        server.receive_data(
            _frame(hyperframe.frame.HeadersFrame, 1, _OPEN, "END_HEADERS", "END_STREAM")
        )
        server.send_headers(1, Accept().to_headers(), end_stream=True)
        server.data_to_send()
        assert server.streams[1].closed
        block = h2headers.encode_block(_AN_OPEN.to_headers()) or b""
        transcript = _feed(server, [_frame(hyperframe.frame.HeadersFrame, 1, block, "END_HEADERS")])
        outcomes.append(transcript)
    assert outcomes[0] == outcomes[1] == outcomes[2]
    (kind, (_, code), goaway) = outcomes[0][0]
    assert kind == "error" and code == h2.errors.ErrorCodes.STREAM_CLOSED
    assert goaway[3] == hyperframe.frame.GoAwayFrame.type


def test_acknowledged_data_reopens_both_windows_as_in_h2() -> None:
    answers = []
    for kind in ("fast", "slow"):
        client = _endpoint(kind, client=True)
        server = _endpoint(kind, client=False)
        client.send_headers(1, _AN_OPEN.to_headers())
        sent = []
        for frames, size in ((3, 16_384), (1, 16_383)):  # the client's stream window: 65,535
            for _ in range(frames):
                client.send_data(1, b"x" * size)
            server.receive_data(client.data_to_send())
            for _ in range(frames):
                server.acknowledge_received_data(size, 1)
                sent.append(bytes(server.data_to_send()))
                client.receive_data(sent[-1])
        answers.append((sent, _state(server, encoder=False, decoder=False)))
    assert answers[0] == answers[1]
    updates = [[(c[i + 3], c[i + 5 : i + 9]) for i in range(0, len(c), 13)] for c in answers[0][0]]
    link = (hyperframe.frame.WindowUpdateFrame.type, (0).to_bytes(4, "big"))
    stream = (hyperframe.frame.WindowUpdateFrame.type, (1).to_bytes(4, "big"))
    assert updates == [[], [link], [], [link, stream]]  # each once half its window was read


def test_a_peers_new_header_table_size_is_announced_by_h2_then_the_fast_path_goes_on() -> None:
    """A peer that shrinks its HPACK table (SETTINGS_HEADER_TABLE_SIZE) must see a size update
    at the start of our next block: that block is h2's; the ones after are the fast path's."""
    client = _endpoint("fast", client=True)
    server = _endpoint("stock", client=False)
    server.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the SETTINGS ack: the server's decoder shrinks
    with _counting() as counts:
        for stream_id in (1, 3, 5):
            client.send_headers(stream_id, _AN_OPEN.to_headers())
    assert counts["send"] == 1
    events = server.receive_data(client.data_to_send())
    assert [[tuple(h) for h in e.headers] for e in events] == [_AN_OPEN.to_headers()] * 3
