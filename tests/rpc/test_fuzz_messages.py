"""Property: the body of any RPC call a peer sends, for any method of tele's three APIs,
decodes to its request type or fails that call with a typed error (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED); it never raises anything else into the server. Likewise for the reply
side and for the newline-delimited stream reader."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tele.rpc import agent_api, daemon_api, manager_api, wire
from tele.rpc.client import Client
from tele.rpc.errors import Code, RpcError
from tele.rpc.method import ServerStream, Unary
from tele.rpc.server import _read_request

METHODS = [
    m
    for module in (agent_api, daemon_api, manager_api)
    for m in vars(module).values()
    if isinstance(m, Unary | ServerStream)
]
MAX = 64 * 1024


class _Body:
    """Stands in for an H2Stream that has received `body`."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def receive_all(self, max_size: int) -> bytes:
        if len(self.body) > max_size:
            raise ValueError("too large")
        return self.body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=25,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n),
    st.integers(MAX, MAX + 10).map(lambda n: b" " * n),
)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.path)
@settings(max_examples=40, deadline=None)
@given(body=bodies)
def test_any_request_body_is_decoded_or_a_typed_error(method: Any, body: bytes) -> None:
    try:
        trio.run(_read_request, _Body(body), method.request, MAX)
    except RpcError as exc:
        assert exc.code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED)


@settings(max_examples=150, deadline=None)
@given(body=bodies, method=st.sampled_from(METHODS))
def test_any_reply_is_decoded_or_a_typed_error(body: bytes, method: Any) -> None:
    decoder = msgspec.json.Decoder(method.response)
    try:
        Client._decode(decoder, body)
    except RpcError as exc:
        assert exc.code is Code.INTERNAL


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(st.binary(max_size=200), max_size=10), size=st.integers(1, 100))
def test_the_message_reader_splits_or_refuses(chunks: list[bytes], size: int) -> None:
    reader = wire.MessageReader(size)
    taken = []
    try:
        for chunk in chunks:
            taken += reader.feed(chunk)
    except wire.MessageTooLarge:
        return
    assert all(len(m) <= size + 1 for m in taken)
