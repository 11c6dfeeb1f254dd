"""tele.net.h2credit.ReceiveBuffer with plain bytes: what is read comes out in order, and each
byte's credit is owed back exactly once (read or discarded); an empty DATA frame holds nothing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tele.net.h2credit import ReceiveBuffer


@given(
    st.lists(st.binary(max_size=50), max_size=20),
    st.lists(st.integers(1, 120), min_size=1, max_size=20),
)
def test_reads_come_out_in_order_and_every_byte_is_credited_once(
    chunks: list[bytes], limits: list[int]
) -> None:
    inbound = ReceiveBuffer()
    for chunk in chunks:
        inbound.receive(chunk)
    received = b"".join(chunks)
    assert inbound.buffered == len(received)
    read = b""
    for limit in limits:
        if not inbound.buffered:
            break
        data = inbound.take(limit)
        assert 0 < len(data) <= limit  # never an empty read while something is held
        read += data
    credit = len(read) + inbound.discard()
    assert received.startswith(read)
    assert credit == len(received)
    assert inbound.buffered == 0


def test_a_read_joins_whole_chunks_up_to_its_limit_and_splits_only_the_first() -> None:
    inbound = ReceiveBuffer()
    for chunk in (b"abc", b"", b"de", b"fghij"):
        inbound.receive(chunk)
    assert inbound.take(6) == b"abcde"  # "fghij" would pass the limit: left whole
    assert inbound.take(2) == b"fg"
    assert inbound.buffered == 3
    assert inbound.take(100) == b"hij"
