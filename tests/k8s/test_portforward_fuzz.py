"""Property: whatever websocket messages a port-forward peer sends (any channel, prefix,
text or binary), the stream takes them as data or fails itself with a PortForwardError; it
never raises while routing them."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tele.k8s.portforward import DATA_CHANNEL, ERROR_CHANNEL, PortForwardStream

PORT = 8080
messages = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=5),
    st.tuples(st.sampled_from([DATA_CHANNEL, ERROR_CHANNEL, 2, 255]), st.binary(max_size=40)).map(
        lambda m: bytes([m[0]]) + m[1]
    ),
    st.just(bytes([DATA_CHANNEL]) + PORT.to_bytes(2, "little")),
    st.just(bytes([ERROR_CHANNEL]) + PORT.to_bytes(2, "little")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, max_size=12))
def test_any_messages_are_data_or_an_error(sequence: list[Any]) -> None:
    stream = PortForwardStream(None, PORT, description="pod/x:8080")  # type: ignore[arg-type]
    for message in sequence:
        stream._take(message)
        if stream._router.error is not None:
            break
    if stream._router.error is None:
        assert isinstance(stream._pending.tobytes(), bytes)
