"""What a caller gets when an engagement's local handler is not listening: the daemon tells an
HTTP/1 request (a 502 naming the engagement and port) from any other protocol (a reset)."""

from __future__ import annotations

import pytest

from tele.contracts.http1 import SNIFF_MAX, looks_like_http1
from tele.daemon.engage import not_listening_response


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n",
        b"POST /api?x=1 HTTP/1.0\n",
        b"DELETE /a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /" + b"a" * SNIFF_MAX,  # a request line longer than what is read
    ],
)
def test_http1_request_lines_are_told(head: bytes) -> None:
    assert looks_like_http1(head)


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"GET / HTTP/1.1",  # not a whole line yet (the wait ran out): not sure, so reset
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2c: the agent answers its streams itself
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n",  # a TLS ClientHello
        b"get / HTTP/1.1\r\n",
        b"GET  / HTTP/1.1\r\n",
        b"GET / HTTP/2\r\n",
        b"HELO mail\r\n",
        b"GET /" + b"a" * 100,
    ],
)
def test_anything_else_is_not_http1(head: bytes) -> None:
    assert not looks_like_http1(head)


def test_the_502_names_the_engagement_and_the_local_port() -> None:
    response = not_listening_response("echo", ("127.0.0.1", 8080))
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 502 Bad Gateway"
    assert f"Content-Length: {len(body)}".encode() in head.split(b"\r\n")
    assert body == b"tele: nothing listens on 127.0.0.1:8080, the local handler of echo\n"
