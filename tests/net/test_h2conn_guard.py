"""The one frame guard (tele.net.h2conn.FrameBuffer), shared by every h2 endpoint tele runs:
an overlong frame is refused as soon as its length field arrives, whatever the split of the
reads, and legal frames pass in any split. Driven with plain bytes."""

from __future__ import annotations

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import hyperframe.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tele.net.h2conn import Connection, FrameBuffer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _server(max_frame: int = 16384) -> Connection:
    conn = Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    conn.max_inbound_frame_size = max_frame
    conn.take_output()
    return conn


def _extension_frame(length: int) -> bytes:
    """A frame of an unknown type (h2 reports and ignores it) with a `length`-byte payload."""
    return length.to_bytes(3, "big") + b"\x20\x00\x00\x00\x00\x01" + b"x" * length


@pytest.mark.parametrize("have", [3, 4, 8, 9])
def test_an_overlong_frame_is_refused_once_its_length_field_is_here(have: int) -> None:
    conn = _server()
    conn.receive_data(PREFACE + SETTINGS + _extension_frame(16384))  # the largest legal one
    conn.take_output()  # the SETTINGS ack
    header = (16385).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        for i in range(have):  # byte by byte: refused at the third byte at the latest
            conn.receive_data(header[i : i + 1])
    # h2 answers with a GOAWAY (frame type 7) carrying FRAME_SIZE_ERROR.
    goaway = b"".join(conn.take_output())
    assert goaway[3] == hyperframe.frame.GoAwayFrame.type
    assert int.from_bytes(goaway[-4:], "big") == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


def test_two_bytes_of_a_header_are_not_judged_yet() -> None:
    conn = _server()
    conn.receive_data(PREFACE + b"\xff\xff")
    assert conn.incoming_buffer.announced_length() is None  # type: ignore[attr-defined]


@given(st.lists(st.integers(0, 20000), max_size=8), st.data())
def test_legal_frames_pass_in_any_split(lengths: list[int], data: st.DataObject) -> None:
    wire = PREFACE + SETTINGS + b"".join(_extension_frame(n) for n in lengths)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    conn = _server(max_frame=20000)
    seen: list[int] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        for event in conn.receive_data(wire[start:end]):
            if isinstance(event, h2.events.UnknownFrameReceived):
                seen.append(len(event.frame.body))
    assert seen == lengths


def _frames(buffer: FrameBuffer, wire: bytes, cuts: list[int]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        buffer.add_data(wire[start:end])
        for frame in buffer:
            out.append(
                (
                    type(frame),
                    frame.stream_id,
                    sorted(frame.flags),
                    bytes(getattr(frame, "data", b"")),
                    frame.body_len,
                )
            )
    return out


data_frames = st.tuples(
    st.integers(1, 9), st.sampled_from([(), ("END_STREAM",), ("PADDED",)]), st.binary(max_size=300)
).map(
    lambda t: hyperframe.frame.DataFrame(
        t[0], data=t[2], flags=t[1], **({"pad_length": 3} if "PADDED" in t[1] else {})
    ).serialize()
)


@given(st.lists(st.one_of(data_frames, st.just(SETTINGS)), max_size=8), st.data())
def test_plain_data_frames_read_as_hyperframe_reads_them(
    frames: list[bytes], data: st.DataObject
) -> None:
    """The DATA fast path builds the frames hyperframe would (stream, flags, payload, length),
    whatever the split of the reads; frames with flags go hyperframe's way."""
    wire = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    fast = FrameBuffer()
    fast.max_frame_size = 16384
    stock = h2.frame_buffer.FrameBuffer()
    stock.max_frame_size = 16384
    assert _frames(fast, wire, cuts) == _frames(stock, wire, [])


def test_data_where_it_may_not_be_is_still_refused() -> None:
    conn = _server()
    conn.receive_data(PREFACE + SETTINGS)
    with pytest.raises(h2.exceptions.ProtocolError):  # DATA on stream 0
        conn.receive_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    conn = _server()
    conn.receive_data(PREFACE + SETTINGS)
    headers = hyperframe.frame.HeadersFrame(1, data=b"\x82", flags=()).serialize()  # no END_HEADERS
    with pytest.raises(h2.exceptions.ProtocolError, match="header block"):
        conn.receive_data(headers + b"\x00\x00\x01\x00\x00\x00\x00\x00\x01x")
    frame = next(iter(_fast_one(b"\x00\x00\x01\x00\x00\x00\x00\x00\x01x")))
    with pytest.raises(TypeError):
        frame.flags.add("END_STREAM")  # shared by every plain DATA frame: fixed


def _fast_one(wire: bytes) -> FrameBuffer:
    buffer = FrameBuffer()
    buffer.max_frame_size = 16384
    buffer.add_data(wire)
    return buffer
