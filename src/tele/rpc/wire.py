"""The RPC wire format on an HTTP/2 stream, sans-IO.

A call is one stream. The caller sends HEADERS (`:method POST`, `:path /<service>/<method>`,
optionally `tele-timeout: <milliseconds>`), then the request as one JSON document, then
END_STREAM. The server answers `:status 200`, then zero or more messages, each a JSON document
followed by a newline (JSON never contains a raw newline), then trailers `tele-code` (see
`errors.Code`) and `tele-message` (percent-encoded). A unary call has exactly one message on
success and none on error. A message larger than the negotiated maximum is refused on either side.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from tele.rpc.errors import Code

TIMEOUT_HEADER = "tele-timeout"
CODE_TRAILER = "tele-code"
MESSAGE_TRAILER = "tele-message"
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


class MessageTooLarge(Exception):
    """A message exceeded the maximum size."""


def request_headers(path: str, timeout: float | None) -> list[tuple[str, str]]:
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "tele"), (":path", path)]
    if timeout is not None:
        headers.append((TIMEOUT_HEADER, str(max(1, int(timeout * 1000)))))
    return headers


def parse_timeout(value: str | None) -> float | None:
    """The caller's deadline in seconds, or None when absent or malformed."""
    if not value or not value.isdigit() or len(value) > 12:
        return None
    return int(value) / 1000


RESPONSE_HEADERS = [(":status", "200")]


def status_trailers(code: Code, message: str = "") -> list[tuple[str, str]]:
    trailers = [(CODE_TRAILER, code.value)]
    if message:
        trailers.append((MESSAGE_TRAILER, quote(message, safe=" ,.:;/()'-_")))
    return trailers


def parse_status(headers: list[tuple[str, str]] | None) -> tuple[Code, str] | None:
    """(code, message) from trailers (or a trailers-only response); None if absent."""
    if not headers:
        return None
    values = dict(headers)
    if CODE_TRAILER not in values:
        return None
    return Code.parse(values[CODE_TRAILER]), unquote(values.get(MESSAGE_TRAILER, ""))


class MessageReader:
    """Splits a byte stream into newline-terminated messages of at most `max_size` bytes."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete messages now available."""
        messages: list[bytes] = []
        start = 0
        if self._buffer:
            newline = data.find(b"\n")
            if newline < 0:
                self._buffer += data
                self._check_pending()
                return messages
            self._buffer += data[:newline]
            self._check_size(len(self._buffer))
            messages.append(bytes(self._buffer))
            self._buffer.clear()
            start = newline + 1
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            self._check_size(newline - start)
            messages.append(data[start:newline])
            start = newline + 1
        if start < len(data):
            self._buffer += data[start:]
            self._check_pending()
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message."""
        return len(self._buffer)

    def _check_pending(self) -> None:
        self._check_size(len(self._buffer))

    def _check_size(self, size: int) -> None:
        if size > self.max_size:
            self._buffer.clear()
            raise MessageTooLarge(f"message larger than {self.max_size} bytes")
