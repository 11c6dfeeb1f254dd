"""The one frame guard (tele.net.h2conn.FrameBuffer), shared by every h2 endpoint tele runs:
an overlong frame is refused as soon as its length field arrives, whatever the split of the
reads, and legal frames pass in any split. Driven with plain bytes."""

from __future__ import annotations

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import hyperframe.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tele.net.h2conn import Connection

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
