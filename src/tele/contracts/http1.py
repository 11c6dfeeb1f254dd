"""Telling an HTTP/1 caller from any other when nobody can serve it: the daemon (no local handler
listens) and the agent (the engaging client cannot be reached) both answer such a caller with a
502 whose one-line body says why, and reset any other connection."""

from __future__ import annotations

import re
from typing import Final

SNIFF_WAIT: Final = 2.0
"""How long a caller's first bytes are awaited: HTTP callers speak first, so an HTTP request is
there at once; a protocol where the server speaks first gets its reset after this wait."""
SNIFF_MAX: Final = 8 * 1024
"""At most this much of a caller's first bytes is read to tell HTTP/1 (a request line)."""
DRAIN_WAIT: Final = 5.0
DRAIN_MAX: Final = 1024 * 1024
"""After a 502, the rest of the caller's request is read and dropped (bounded in time and
bytes) so that closing does not reset the connection before the caller read the answer."""

_METHOD: Final = rb"(GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH) [!-~]+"
_REQUEST_LINE: Final = re.compile(_METHOD + rb" HTTP/1\.[01]\r?")
_REQUEST_LINE_START: Final = re.compile(_METHOD)


def looks_like_http1(head: bytes) -> bool:
    """Whether a caller's first bytes are an HTTP/1 request line: a whole one, or the start of
    one longer than SNIFF_MAX."""
    line, complete, _ = head.partition(b"\n")
    if complete:
        return _REQUEST_LINE.fullmatch(line) is not None
    return len(head) >= SNIFF_MAX and _REQUEST_LINE_START.fullmatch(head) is not None


def bad_gateway(sentence: str) -> bytes:
    """A whole HTTP/1.1 502 response (the connection closes after it) whose body is `sentence`
    on one line."""
    body = sentence.replace("\r", " ").replace("\n", " ") + "\n"
    return (
        "HTTP/1.1 502 Bad Gateway\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body.encode())}\r\n"
        "Connection: close\r\n"
        "\r\n"
        f"{body}"
    ).encode()
