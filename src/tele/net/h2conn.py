"""The h2 connection as tele's links drive it: h2's state machine with tele's own byte handling.

h2 is kept for everything it decides (stream states, flow control, HPACK, errors); what changes
is how bytes get in and out, measured as most of a tunnel's cost (bench/tunnel.py, profiles):
- output is a list of buffers — 9-byte DATA frame headers and the payload objects themselves —
  for gather writes (`tele.rpc.h2writer.send_buffers`), instead of one bytearray copied on
  every step;
- input frames are parsed from views of the reads (`FrameBuffer`), reads joined only where a
  frame spans them, and an overlong frame is refused as soon as its length field is here (the
  one frame guard of every h2 endpoint tele runs: links, the agent's h2c relay, the sandbox's
  API server, the CLI's quick calls);
- plain DATA (an open stream, no padding, END_STREAM or not) takes a fast path doing h2's own
  bookkeeping, without its state-machine passes and frame objects, and so does END_STREAM;
- so do the HEADERS that open a stream and answer it, in the shapes tele's tunnel and RPC use
  (`tele.net.h2headers`: no dynamic table, a whitelist of names), both ways. Each fast path
  checks everything before it changes anything, and gives what it declines to h2 untouched
  (tests/net/test_h2conn_headers.py compares both with stock h2);
- open streams are counted in amortised O(1) (frames keep a repr without a hex dump: that is
  tele._patches').
Nothing here does any I/O or imports trio (the CLI's quick calls use it without trio); the
writer (`tele.rpc.h2writer`) and the link (`tele.rpc.h2link`) do.
"""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.stream
import hyperframe.exceptions
import hyperframe.flags
import hyperframe.frame

from tele.net import h2headers

Buffers = list[bytes | memoryview]
"""Bytes to write, in order: frame headers and the payloads of DATA frames, not joined."""


_FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
_MAX_PIECES = 256  # reads held unjoined while a frame is incomplete
_OPEN_CONNECTION = frozenset(
    {h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN}
)
_IDLE_CONNECTION = h2.connection.ConnectionState.IDLE  # until the first HEADERS either way
_HEADERS_STATES = _OPEN_CONNECTION | {_IDLE_CONNECTION}
_SENDING_STATES = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE})
_RECEIVING_STATES = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})
_END_STREAM = 0x1
_END_HEADERS = 0x4
_HEADERS = 0x1  # frame type
_DataFrame = hyperframe.frame.DataFrame
_HeadersFrame = hyperframe.frame.HeadersFrame
_H2Stream = h2.stream.H2Stream
_OPEN = h2.stream.StreamState.OPEN
_HALF_CLOSED_LOCAL = h2.stream.StreamState.HALF_CLOSED_LOCAL
_HALF_CLOSED_REMOTE = h2.stream.StreamState.HALF_CLOSED_REMOTE
_CLOSED = h2.stream.StreamState.CLOSED
_RequestReceived = h2.events.RequestReceived
_ResponseReceived = h2.events.ResponseReceived
_StreamEnded = h2.events.StreamEnded
_new = object.__new__


class _FixedFlags(hyperframe.flags.Flags):
    """The flags of a frame `FrameBuffer` builds itself (plain DATA, plain HEADERS): one set
    shared by every such frame, so changing it is refused (h2 adds flags only to HEADERS frames
    it assembles from CONTINUATION, which are parsed by hyperframe)."""

    def __init__(self, frame_type: type[hyperframe.frame.Frame], names: tuple[str, ...]) -> None:
        super().__init__(frame_type.defined_flags)
        self._flags = set(names)

    def add(self, value: str) -> None:
        raise TypeError("the flags of a received plain frame are fixed")

    def discard(self, value: str) -> None:
        raise TypeError("the flags of a received plain frame are fixed")


_PLAIN_DATA_FLAGS = (
    _FixedFlags(hyperframe.frame.DataFrame, ()),
    _FixedFlags(hyperframe.frame.DataFrame, ("END_STREAM",)),
)
_PLAIN_HEADERS_FLAGS = {
    _END_HEADERS: _FixedFlags(hyperframe.frame.HeadersFrame, ("END_HEADERS",)),
    _END_HEADERS | _END_STREAM: _FixedFlags(
        hyperframe.frame.HeadersFrame, ("END_HEADERS", "END_STREAM")
    ),
}


def _end_sending(machine: h2.stream.H2StreamStateMachine) -> None:
    """h2's SEND_END_STREAM on a stream that may send (open or half-closed remote)."""
    if machine.state is _OPEN:
        machine.state = _HALF_CLOSED_LOCAL
    else:
        machine.state = _CLOSED
        machine.stream_closed_by = h2.stream.StreamClosedBy.SEND_END_STREAM


class FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's incoming frame buffer without the copies of the whole buffer per frame.

    h2 appends every read to a bytearray, copies each frame out of it, and then deletes the
    frame from the front (moving everything behind it): a 256 KiB read holding a few frames
    was copied ~4 times. Here reads are kept as the immutable bytes they arrived as, frames are
    parsed from memoryview slices (hyperframe copies a payload out once), and reads are joined
    only when a frame spans them, once the whole frame is there. Plain DATA and HEADERS frames
    (most of a tunnel's) are built without hyperframe's parse, with the same checks.
    """

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        self._buffer = b""
        self._offset = 0
        self._more: list[bytes | bytearray] = []  # reads after `_buffer`, not joined yet
        self._more_size = 0

    def add_data(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        if self._preamble_len:
            super().add_data(data)  # checks the client preamble, keeps the rest in _data
            data, self._data = bytes(self._data), bytearray()
        chunk = data if isinstance(data, bytes) else bytes(data)
        if self._offset >= len(self._buffer) and not self._more:
            self._buffer, self._offset = chunk, 0
        elif chunk:
            more = self._more
            more.append(chunk)
            self._more_size += len(chunk)
            if len(more) > _MAX_PIECES:
                # A frame arriving in many small reads: gather them into one growing buffer
                # (amortised linear), not a list of tiny objects or repeated joins.
                if isinstance(more[0], bytearray):
                    spill = more[0]
                    spill += b"".join(more[1:])
                else:
                    spill = bytearray(b"".join(more))
                self._more = [spill]

    def _join(self) -> None:
        if self._offset >= len(self._buffer) and len(self._more) == 1:
            self._buffer = bytes(self._more[0])  # no copy unless it is a spill bytearray
        else:
            self._buffer = b"".join([memoryview(self._buffer)[self._offset :], *self._more])
        self._offset = 0
        self._more = []
        self._more_size = 0

    def _take_across(self, start: int, length: int) -> bytes:
        """`length` bytes from `start` in `_buffer` on into the reads after it, as one bytes
        object; parsing goes on right behind them (in the read where they end)."""
        parts: list[bytes | bytearray | memoryview] = [memoryview(self._buffer)[start:]]
        need = length - (len(self._buffer) - start)
        pieces = self._more
        taken = 0
        buffer, offset = b"", 0
        while need:
            piece = pieces[taken]
            taken += 1
            if len(piece) > need:
                parts.append(memoryview(piece)[:need])
                buffer, offset = bytes(piece), need  # no copy for bytes (a spill is rare)
                break
            parts.append(piece)
            need -= len(piece)
        body = b"".join(parts)
        rest = pieces[taken:]
        if not buffer and rest:
            buffer, rest = bytes(rest[0]), rest[1:]
        self._buffer, self._offset = buffer, offset
        self._more = rest
        self._more_size = sum(len(piece) for piece in rest)
        return body

    def announced_length(self) -> int | None:
        """The length field of the next frame, once its first 3 bytes are here."""
        if len(self._buffer) - self._offset < 3:
            if len(self._buffer) - self._offset + self._more_size < 3:
                return None
            self._join()
        return int.from_bytes(self._buffer[self._offset : self._offset + 3], "big")

    def _check_announced_length(self) -> None:
        """The frame guard: refuse an overlong frame once 3 bytes of its header are here.

        Stock h2 checks a frame's length only once the whole frame is buffered, so a peer
        announcing a 16 MiB frame could make us hold 16 MiB per connection. A complete header
        is checked by `__next__`; this catches one of which only the length has arrived. h2's
        `receive_data` turns the error into a GOAWAY (FRAME_SIZE_ERROR), as for any frame.
        """
        if self._preamble_len:
            return  # still inside the client preface: no frame header yet
        length = self.announced_length()
        if length is not None:
            self._validate_frame_length(length)

    def __next__(self) -> hyperframe.frame.Frame:
        while True:
            buffer, offset = self._buffer, self._offset
            held = len(buffer) - offset
            if held < 9:
                if held + self._more_size < 9:
                    self._check_announced_length()
                    raise StopIteration
                self._join()
                continue
            length_high, length_low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(
                buffer, offset
            )
            stream_id &= 0x7FFFFFFF  # the reserved bit is ignored (RFC 9113 4.1)
            if kind == 0 and flags <= _END_STREAM and stream_id and not self._headers_buffer:
                # Plain DATA (no flags but END_STREAM, a stream, no header block open) is most
                # frames: the frame object is built directly, without hyperframe's header
                # parse, flag set and padding set-up (~8 of its ~10 µs); the checks are the same.
                length = length_high << 8 | length_low
                self._validate_frame_length(length)
                end = offset + 9 + length
                if len(buffer) >= end:
                    plain = _new(_DataFrame)
                    plain.stream_id = stream_id
                    plain.flags = _PLAIN_DATA_FLAGS[flags]
                    plain.pad_length = 0
                    plain.body_len = length
                    plain.data = buffer[offset + 9 : end]
                    self._offset = end
                    if end == len(buffer):
                        self._buffer, self._offset = b"", 0
                        if self._more:
                            self._join()
                    return plain
            elif kind == _HEADERS and stream_id and not self._headers_buffer:
                # A whole header block in one frame (END_HEADERS, no padding or priority: what
                # every h2 encoder sends for a short block) is built directly too.
                fixed = _PLAIN_HEADERS_FLAGS.get(flags)
                length = length_high << 8 | length_low
                end = offset + 9 + length
                if fixed is not None and len(buffer) >= end:
                    self._validate_frame_length(length)
                    block = _new(_HeadersFrame)
                    block.stream_id = stream_id
                    block.flags = fixed
                    block.pad_length = 0
                    block.depends_on = 0
                    block.stream_weight = 0
                    block.exclusive = False
                    block.body_len = length
                    block.data = buffer[offset + 9 : end]
                    self._offset = end
                    if end == len(buffer):
                        self._buffer, self._offset = b"", 0
                        if self._more:
                            self._join()
                    return block
            view = memoryview(buffer)
            try:
                frame, length = hyperframe.frame.Frame.parse_frame_header(view[offset : offset + 9])
            except (
                hyperframe.exceptions.InvalidDataError,
                hyperframe.exceptions.InvalidFrameError,
            ) as exc:
                raise h2.exceptions.ProtocolError(
                    f"Received frame with invalid header: {exc}"
                ) from exc
            self._validate_frame_length(length)
            end = offset + 9 + length
            if len(buffer) < end:
                if held + self._more_size < 9 + length:
                    raise StopIteration
                if type(frame) is hyperframe.frame.DataFrame and "PADDED" not in frame.flags:
                    # A payload spanning reads: joined once, straight into the frame (what
                    # parse_body would set for an unpadded DATA frame), nothing else copied.
                    frame.data = self._take_across(offset + 9, length)
                    frame.body_len = length
                    complete = self._update_header_buffer(frame)
                    if complete is not None:
                        return complete
                    continue
                self._join()
                continue
            try:
                frame.parse_body(view[offset + 9 : end])
            except hyperframe.exceptions.InvalidDataError as exc:
                raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from exc
            except hyperframe.exceptions.InvalidFrameError as exc:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from exc
            self._offset = end
            if end == len(buffer):
                self._buffer, self._offset = b"", 0
                if self._more:
                    self._join()
            complete = self._update_header_buffer(frame)
            if complete is not None:
                return complete


class Connection(h2.connection.H2Connection):
    """h2's connection with its output kept as a list of buffers, its input parsed in place
    (`FrameBuffer`), and open streams counted in amortised O(1).

    Output: h2 serialises every frame into one bytearray, copying a DATA payload ~5 times on
    its way to the socket (memoryview to bytes, body join, header join, bytearray append,
    bytes() of the whole buffer); with 8 busy streams that buffer grew to megabytes and each
    `data_to_send` took milliseconds. Here a DATA frame is a 9-byte header plus the payload
    bytes object itself (h2 turns a memoryview into bytes; immutable bytes are kept as they
    are: see `H2Stream._send_body`); other frames are serialised by hyperframe as before.
    `take_output` hands the list to a gather write.

    Streams:

    h2 counts open streams (for the MAX_CONCURRENT_STREAMS checks on every new stream) by
    walking every stream it holds, deleting the closed ones as it goes: with n streams open,
    opening one costs O(n), quadratic with the 10,000 streams a link must carry. Here the
    number of streams held (open or closed-not-yet-swept), an upper bound on either direction's
    open count, answers the check while it is below the limit; the exact walk runs only near
    the limit, or once the table has doubled since the last walk (which keeps the sweeping of
    closed streams, and so memory, bounded).
    """

    _sweep_at = 64

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.incoming_buffer = FrameBuffer(server=not config.client_side)
        # The HEADERS fast paths give what h2 gives with this configuration (str headers,
        # validated on receipt, none checked or changed on sending); any other goes h2's way.
        self._plain_receive = config.header_encoding == "utf-8" and bool(
            config.validate_inbound_headers
        )
        self._plain_send = not (
            config.validate_outbound_headers or config.normalize_outbound_headers
        )
        self._output: Buffers = []
        self.output_size = 0
        self.control_size = 0  # of output_size, the frames other than DATA

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        output = self._output
        if self._data_to_send:  # h2 writes its connection preamble there directly
            output.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        for frame in frames:
            if type(frame) is hyperframe.frame.DataFrame and "PADDED" not in frame.flags:
                flags = _END_STREAM if "END_STREAM" in frame.flags else 0
                self._queue_data(frame.stream_id, frame.data, flags)
            else:
                chunk = frame.serialize()
                output.append(chunk)
                self.output_size += len(chunk)
                self.control_size += len(chunk)

    # -- DATA fast paths ---------------------------------------------------------------------
    # DATA is almost every frame a tunnel carries. h2 takes each one through both state
    # machines (transitions that change nothing for DATA on an open stream), builds a frame
    # object and, on receipt, formats repr(frame) for a trace line: ~20 µs a frame, most of a
    # relay hop's cost beyond the Python floor. For the plain case (an open stream, no padding,
    # no content-length to check; END_STREAM or not: every tunnelled connection ends with one
    # each way) these do exactly h2's bookkeeping: the same flow-control windows, the same
    # stream states, bytes and events. Anything else goes h2's own way.

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: Any = None,
    ) -> None:
        stream = self.streams.get(stream_id)
        size = len(data)
        if (
            pad_length is not None
            or stream is None
            or stream.state_machine.state not in _SENDING_STATES
            or self.state_machine.state not in _OPEN_CONNECTION
            or size > self.max_outbound_frame_size
            or size > self.outbound_flow_control_window
            or size > stream.outbound_flow_control_window
        ):
            super().send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)
            return
        if type(data) is not bytes:
            data = bytes(data)  # queued until written: never a view of the caller's buffer
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        if end_stream:
            _end_sending(stream.state_machine)
            self._queue_data(stream_id, data, _END_STREAM)
        else:
            self._queue_data(stream_id, data, 0)

    def end_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if (
            stream is None
            or stream.state_machine.state not in _SENDING_STATES
            or self.state_machine.state not in _OPEN_CONNECTION
        ):
            super().end_stream(stream_id)
            return
        _end_sending(stream.state_machine)
        self._queue_data(stream_id, b"", _END_STREAM)

    def _queue_data(self, stream_id: int, data: bytes, flags: int) -> None:
        """A DATA frame: its 9-byte header, then the payload object itself."""
        size = len(data)
        self._output.append(_FRAME_HEADER.pack(size >> 8, size & 0xFF, 0, flags, stream_id))
        if size:
            self._output.append(data)
        self.output_size += size + 9

    def receive_data(self, data: Any) -> list[h2.events.Event]:
        try:
            return super().receive_data(data)
        except UnicodeDecodeError as exc:
            # h2 decodes a received header as UTF-8 (header_encoding) after hpack and lets
            # the error out as it is: a peer's one bad byte would end the link's reader with an
            # exception nobody expects. It is the peer's protocol error like any other.
            self._terminate_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            raise h2.exceptions.ProtocolError(f"a header is not UTF-8: {exc}") from exc

    def _receive_frame(self, frame: hyperframe.frame.Frame) -> list[h2.events.Event]:
        kind = type(frame)
        if kind is _DataFrame:
            events = self._receive_plain_data(frame)  # type: ignore[arg-type]
            if events is not None:
                return events
        elif kind is _HeadersFrame:
            events = self._receive_plain_headers(frame)  # type: ignore[arg-type]
            if events is not None:
                return events
        return super()._receive_frame(frame)

    def _receive_plain_data(
        self, frame: hyperframe.frame.DataFrame
    ) -> list[h2.events.Event] | None:
        flags = frame.flags
        if "PADDED" in flags:
            return None
        stream = self.streams.get(frame.stream_id)
        if (
            stream is None
            or self.state_machine.state not in _OPEN_CONNECTION
            or stream.state_machine.state not in _RECEIVING_STATES
            or not stream.state_machine.headers_received
            or stream._expected_content_length is not None
        ):
            return None
        data = frame.data
        size = len(data)
        # Both raise FlowControlError (a ProtocolError) past the window, as in h2.
        self._inbound_flow_control_window_manager.window_consumed(size)
        stream._inbound_window_manager.window_consumed(size)
        stream._actual_content_length += size
        event = h2.events.DataReceived(stream_id=frame.stream_id)
        event.data = data
        event.flow_controlled_length = size
        if "END_STREAM" in flags:
            machine = stream.state_machine
            if machine.state is _OPEN:
                machine.state = _HALF_CLOSED_REMOTE
            else:  # half-closed (local): both sides are done
                machine.state = _CLOSED
                machine.stream_closed_by = h2.stream.StreamClosedBy.RECV_END_STREAM
            ended = _StreamEnded(stream_id=frame.stream_id)
            event.stream_ended = ended
            return [event, ended]
        return [event]

    # -- HEADERS fast paths ------------------------------------------------------------------
    # Each new tunnelled connection is one stream: a request HEADERS one way, a response HEADERS
    # back. h2 takes each through HPACK (hpack's general coder, the dynamic table), header
    # validation generators and both state machines: ~25-30 % of a tunnel server's CPU per
    # connection. Here the blocks tele sends are encoded without the dynamic table
    # (`h2headers.encode_block`), and received blocks of exactly those shapes are decoded by
    # `h2headers.decode_request`/`decode_response`; the stream is then created and moved as
    # h2 does it, with the same events. Every check is made before anything changes, so a
    # frame the fast path declines goes to h2 untouched, and h2 gives its own answer (its
    # event, its stream reset, its GOAWAY). tests/net/test_h2conn_headers.py compares both
    # paths with stock h2, events and state, for well-formed and hostile blocks.

    def _receive_plain_headers(
        self, frame: hyperframe.frame.HeadersFrame
    ) -> list[h2.events.Event] | None:
        flags = frame.flags
        if (
            "PADDED" in flags
            or "PRIORITY" in flags
            or "END_HEADERS" not in flags
            or not self._plain_receive
            or self.state_machine.state not in _HEADERS_STATES
        ):
            return None
        decoder = self.decoder
        if decoder.header_table_size > decoder.max_allowed_table_size:
            return None  # hpack raises for this after decoding any block
        stream_id = frame.stream_id
        stream = self.streams.get(stream_id)
        end_stream = "END_STREAM" in flags
        if stream is None:
            return self._receive_plain_request(stream_id, frame.data, end_stream)
        return self._receive_plain_response(stream, frame.data, end_stream)

    def _receive_plain_request(
        self, stream_id: int, block: bytes, end_stream: bool
    ) -> list[h2.events.Event] | None:
        """A request opening a new stream from the peer: as h2's `_receive_headers_frame`,
        `_begin_new_stream` and `H2Stream.receive_headers` would take it."""
        if (
            self.config.client_side
            or not stream_id & 1
            or stream_id <= self.highest_inbound_stream_id
            # (the property may sweep closed streams, as h2's own check does)
            or self.open_inbound_streams + 1 > self.local_settings.max_concurrent_streams
        ):
            return None
        fields = h2headers.decode_request(block, self.decoder.max_header_list_size)
        if fields is None:
            return None
        if self.state_machine.state is _IDLE_CONNECTION:
            self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
        stream = self._new_stream(stream_id)
        self.highest_inbound_stream_id = stream_id
        machine = stream.state_machine
        machine.client = False
        machine.headers_received = True
        event = _RequestReceived(stream_id=stream_id)
        event.headers = fields  # type: ignore[assignment]
        if end_stream:
            machine.state = _HALF_CLOSED_REMOTE
            ended = _StreamEnded(stream_id=stream_id)
            event.stream_ended = ended
            return [event, ended]
        machine.state = _OPEN
        return [event]

    def _receive_plain_response(
        self, stream: h2.stream.H2Stream, block: bytes, end_stream: bool
    ) -> list[h2.events.Event] | None:
        """The first, final response on a stream we opened (not 1xx, not trailers)."""
        machine = stream.state_machine
        state = machine.state
        if (
            not self.config.client_side
            or (state is not _OPEN and state is not _HALF_CLOSED_LOCAL)
            or machine.client is not True
            or machine.headers_received
            or stream.request_method == b"HEAD"  # h2 then expects no body (content length 0)
        ):
            return None
        fields = h2headers.decode_response(block, self.decoder.max_header_list_size)
        if fields is None:
            return None
        if self.state_machine.state is _IDLE_CONNECTION:
            self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
        machine.headers_received = True
        stream._expected_content_length = None  # no content-length among the accepted names
        event = _ResponseReceived(stream_id=stream.stream_id)
        event.headers = fields  # type: ignore[assignment]
        if end_stream:
            if state is _OPEN:
                machine.state = _HALF_CLOSED_REMOTE
            else:
                machine.state = _CLOSED
                machine.stream_closed_by = h2.stream.StreamClosedBy.RECV_END_STREAM
            ended = _StreamEnded(stream_id=stream.stream_id)
            event.stream_ended = ended
            return [event, ended]
        return [event]

    def send_headers(
        self,
        stream_id: int,
        headers: Any,
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
    ) -> None:
        if (
            priority_weight is None
            and priority_depends_on is None
            and priority_exclusive is None
            and self._plain_send
            and self.state_machine.state in _HEADERS_STATES
            and not self.encoder.table_size_changes  # h2 must announce a new table size
            and self._send_plain_headers(stream_id, headers, end_stream)
        ):
            return
        super().send_headers(
            stream_id,
            headers,
            end_stream=end_stream,
            priority_weight=priority_weight,
            priority_depends_on=priority_depends_on,
            priority_exclusive=priority_exclusive,
        )

    def _send_plain_headers(self, stream_id: int, headers: Any, end_stream: bool) -> bool:
        """A request opening a stream (client) or the final response to one (server), sent as
        h2's `send_headers` would do it; False (nothing changed) for anything else."""
        stream = self.streams.get(stream_id)
        if stream is None:
            if (
                not self.config.client_side
                or not stream_id & 1
                or stream_id <= self.highest_outbound_stream_id
                or self.open_outbound_streams + 1 > self.remote_settings.max_concurrent_streams
            ):
                return False
            frame_limit = self.max_outbound_frame_size
            state = None
        else:
            machine = stream.state_machine
            state = machine.state
            if (
                machine.client is not False
                or machine.headers_sent
                or (state is not _OPEN and state is not _HALF_CLOSED_REMOTE)
            ):
                return False
            frame_limit = stream.max_outbound_frame_size or 0
        block = h2headers.encode_block(headers)
        if not block or len(block) > frame_limit:
            return False  # nothing (h2 fails on it), or CONTINUATION frames needed
        method = authority = None
        for name, value in headers:
            if name == ":status" and value.startswith("1"):
                return False  # informational: h2's own rules
            if name == ":method" and method is None:
                method = value.encode()
            elif name == ":authority" and authority is None:
                authority = value.encode()
        if stream is None:
            stream = self._new_stream(stream_id)
            self.highest_outbound_stream_id = stream_id
            machine = stream.state_machine
            machine.client = True
            machine.headers_sent = True
            machine.state = _HALF_CLOSED_LOCAL if end_stream else _OPEN
            stream._authority = authority
        else:
            machine.headers_sent = True
            if end_stream:
                if state is _OPEN:
                    machine.state = _HALF_CLOSED_LOCAL
                else:
                    machine.state = _CLOSED
                    machine.stream_closed_by = h2.stream.StreamClosedBy.SEND_END_STREAM
        stream.request_method = method
        if self.state_machine.state is _IDLE_CONNECTION:
            self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        if self._data_to_send:
            self._prepare_for_sending([])  # h2's preamble goes first
        size = len(block)
        flags = _END_HEADERS | _END_STREAM if end_stream else _END_HEADERS
        chunk = _FRAME_HEADER.pack(size >> 8, size & 0xFF, _HEADERS, flags, stream_id) + block
        self._output.append(chunk)
        self.output_size += len(chunk)
        self.control_size += len(chunk)
        return True

    def _new_stream(self, stream_id: int) -> h2.stream.H2Stream:
        """A stream as h2's `_begin_new_stream` makes it (its windows from the settings), held
        in `streams`; the caller moves its state machine and the highest stream id."""
        stream = _H2Stream(
            stream_id,
            config=self.config,
            inbound_window_size=self.local_settings.initial_window_size,
            outbound_window_size=self.remote_settings.initial_window_size,
        )
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        self.streams[stream_id] = stream
        return stream

    def take_output(self) -> Buffers:
        """Everything queued for sending, in order; the queue is empty afterwards."""
        if self._data_to_send:
            self._prepare_for_sending([])
        output, self._output = self._output, []
        self.output_size = 0
        self.control_size = 0
        return output

    def data_to_send(self, amount: int | None = None) -> bytes:
        if amount is not None:
            raise NotImplementedError("the link takes all output at once (take_output)")
        return b"".join(self.take_output())

    def clear_outbound_data_buffer(self) -> None:
        super().clear_outbound_data_buffer()
        self._output = []
        self.output_size = 0
        self.control_size = 0

    def _open_streams(self, remainder: int) -> int:
        count = super()._open_streams(remainder)
        self._sweep_at = 2 * len(self.streams) + 64
        return count

    @property
    def open_outbound_streams(self) -> int:
        held = len(self.streams)
        if held < self._sweep_at and held < self.remote_settings.max_concurrent_streams:
            return held
        return self._open_streams(int(self.config.client_side))

    @property
    def open_inbound_streams(self) -> int:
        held = len(self.streams)
        if held < self._sweep_at and held < self.local_settings.max_concurrent_streams:
            return held
        return self._open_streams(int(not self.config.client_side))
