"""One HTTP/2 stream's own state, sans-IO: received DATA held for the consumer with its
flow-control credit returned only as it is read, and the ends, resets and refusals that decide
what a send, a receive or a close may do next.

`StreamCore` does no I/O and never waits; it returns what the caller must do (bytes of credit to
acknowledge, a `CloseAction`) or raises the stream's error. `tele.rpc.h2stream.H2Stream` adds the
waiting and the link; tests drive `StreamCore` with plain bytes (tests/rpc/test_h2state.py).
The exception types are trio's stream errors (the contract of a trio stream), nothing more.
"""

from __future__ import annotations

import enum

import h2.errors
import trio

from tele.net.h2credit import ReceiveBuffer


class LinkBroken(trio.BrokenResourceError):
    """The link's transport failed or the link was closed; every stream on it is broken."""


class StreamReset(trio.BrokenResourceError):
    """The peer reset the stream (RST_STREAM) with an HTTP/2 error code."""

    def __init__(self, error_code: int, message: str = "") -> None:
        self.error_code = error_code
        super().__init__(message or f"stream reset by peer ({error_name(error_code)})")


def error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"


class CloseAction(enum.Enum):
    """What closing (or ending) our side of a stream must send."""

    NOTHING = enum.auto()
    END = enum.auto()  # END_STREAM on an empty DATA frame (like TCP's FIN)
    RESPOND_AND_END = enum.auto()  # a server stream never answered: ":status 200" + END_STREAM
    RESET_CANCEL = enum.auto()  # unread data, our side still open: RST_STREAM(CANCEL)
    RESET_NO_ERROR = enum.auto()  # unread data after our END_STREAM: RST_STREAM(NO_ERROR)


class StreamCore(ReceiveBuffer):
    """The state of one stream: what was received and not read (`ReceiveBuffer`: credit goes
    back to the peer only as it is read or thrown away, so the peer can never have more in
    flight than the window advertised, however slow the consumer), and how far each side got.
    """

    def __init__(self, stream_id: int, *, needs_response: bool) -> None:
        super().__init__()
        self.stream_id = stream_id
        self._remote_ended = False
        self._local_ended = False
        self._closed = False
        self._reset_code: int | None = None
        self._reset_by_peer = False
        self._send_broken = False  # the peer reset with NO_ERROR after its END_STREAM
        # Server side: a response HEADERS must precede DATA; raw streams get a plain 200.
        self._needs_response = needs_response
        # Client side, opened without waiting for the response: a refusal of the response,
        # raised by every later send or receive.
        self._refusal: BaseException | None = None

    # --- the two ends ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Closed by us: the consumer is gone, data still arriving is refused."""
        return self._closed

    @property
    def remote_ended(self) -> bool:
        """The peer sent END_STREAM (everything it sends is buffered or read)."""
        return self._remote_ended

    @property
    def local_ended(self) -> bool:
        return self._local_ended

    @property
    def was_reset(self) -> bool:
        return self._reset_code is not None

    def take_response_duty(self) -> bool:
        """True once if a server stream still owes a response HEADERS before anything else."""
        if self._needs_response:
            self._needs_response = False
            return True
        return False

    def close_action(self, link_usable: bool) -> CloseAction:
        """What closing our side sends (the stream is marked closed first by the caller)."""
        if not link_usable or self._reset_code is not None or self._send_broken:
            return CloseAction.NOTHING
        if self._chunks:
            # Unread data: like TCP's RST, tell the peer its bytes were not taken.
            return CloseAction.RESET_NO_ERROR if self._local_ended else CloseAction.RESET_CANCEL
        if self._local_ended:
            return CloseAction.NOTHING
        # Like TCP's FIN; data that still arrives gets the stream reset.
        return CloseAction.RESPOND_AND_END if self.take_response_duty() else CloseAction.END

    def peer_reset(self, error_code: int) -> bool:
        """RST_STREAM from the peer. False: only our sending ended (RFC 9113 8.1, the peer
        sent its whole response and wants no more of ours; what it sent stays readable).
        True: the stream is aborted; the caller discards the buffer and wakes everyone."""
        if error_code == h2.errors.ErrorCodes.NO_ERROR and self._remote_ended:
            self._send_broken = True
            return False
        if self._reset_code is None:
            self._reset_code = error_code
            self._reset_by_peer = True
        return True

    # --- what may happen next --------------------------------------------------------------

    def check_sendable(self, link_failure: str | None) -> None:
        """Raise the error a send would meet now, if any."""
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._refusal is not None:
            raise self._refusal
        if self._local_ended:
            raise trio.ClosedResourceError("cannot send after send_eof()")
        if self._send_broken:
            raise trio.BrokenResourceError("the peer stopped reading this stream")
        self.raise_if_failed(link_failure)

    def raise_if_failed(self, link_failure: str | None) -> None:
        """Raise the error that ended the stream (a refusal, a reset, the link's failure)."""
        if self._refusal is not None:
            raise self._refusal
        if self._reset_code is not None:
            if self._reset_by_peer:
                raise StreamReset(self._reset_code)
            raise trio.BrokenResourceError("stream was reset")
        if link_failure is not None:
            raise LinkBroken(link_failure)
