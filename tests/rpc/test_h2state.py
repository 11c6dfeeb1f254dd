"""tele.rpc.h2state.StreamCore with plain bytes: credit goes back exactly as the consumer reads
(or as unread data is thrown away), and the ends and resets decide what a close sends and what a
send or receive raises. No link, no trio run."""

from __future__ import annotations

import h2.errors
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tele.rpc.h2state import CloseAction, LinkBroken, StreamCore, StreamReset


def _client_stream() -> StreamCore:
    return StreamCore(1, needs_response=False)


@given(
    st.lists(st.binary(min_size=1, max_size=50), max_size=20),
    st.lists(st.integers(1, 120), min_size=1, max_size=20),
)
def test_reads_return_the_bytes_in_order_and_exactly_their_credit(
    chunks: list[bytes], limits: list[int]
) -> None:
    core = _client_stream()
    for chunk in chunks:
        core.receive(chunk)
    received = b"".join(chunks)
    assert core.buffered == len(received)
    read = b""
    credit = 0
    for limit in limits:
        if not core.buffered:
            break
        data = core.take(limit)
        assert 0 < len(data) <= limit
        read += data
        credit += len(data)
    credit += core.discard()
    assert received.startswith(read)
    assert credit == len(received)  # every byte credited once: read or discarded
    assert core.buffered == 0


def test_a_read_joins_whole_chunks_up_to_its_limit_and_splits_only_the_first() -> None:
    core = _client_stream()
    for chunk in (b"abc", b"de", b"fghij"):
        core.receive(chunk)
    assert core.take(6) == b"abcde"  # "fghij" would pass the limit: left whole
    assert core.take(2) == b"fg"
    assert core.buffered == 3
    assert core.take(100) == b"hij"


def test_closing_with_unread_data_resets_cancel_or_no_error_after_our_end() -> None:
    core = _client_stream()
    core.receive(b"unread")
    assert core.close_action(link_usable=True) is CloseAction.RESET_CANCEL
    core._local_ended = True
    assert core.close_action(link_usable=True) is CloseAction.RESET_NO_ERROR


def test_closing_after_everything_was_read_ends_the_stream_like_a_fin() -> None:
    core = _client_stream()
    core.receive(b"x")
    core.take(1)
    assert core.close_action(link_usable=True) is CloseAction.END
    core._local_ended = True
    assert core.close_action(link_usable=True) is CloseAction.NOTHING


def test_a_server_stream_that_never_answered_closes_with_a_200_and_end() -> None:
    core = StreamCore(2, needs_response=True)
    assert core.close_action(link_usable=True) is CloseAction.RESPOND_AND_END
    assert not core.take_response_duty()  # owed once only


def test_nothing_is_sent_on_a_broken_link_or_a_reset_stream() -> None:
    core = _client_stream()
    core.receive(b"unread")
    assert core.close_action(link_usable=False) is CloseAction.NOTHING
    assert core.peer_reset(h2.errors.ErrorCodes.CANCEL)
    assert core.close_action(link_usable=True) is CloseAction.NOTHING


def test_a_peer_reset_is_raised_with_its_code_by_sends_and_receives() -> None:
    core = _client_stream()
    assert core.peer_reset(h2.errors.ErrorCodes.REFUSED_STREAM)
    assert core.was_reset
    with pytest.raises(StreamReset) as caught:
        core.raise_if_failed(None)
    assert caught.value.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
    assert "REFUSED_STREAM" in str(caught.value)
    with pytest.raises(StreamReset):
        core.check_sendable(None)


def test_no_error_reset_after_the_peers_end_stops_only_our_sending() -> None:
    # RFC 9113 8.1: a server that sent its whole response may reset the request's remainder.
    core = _client_stream()
    core.receive(b"response")
    core._remote_ended = True
    assert not core.peer_reset(h2.errors.ErrorCodes.NO_ERROR)
    assert not core.was_reset
    with pytest.raises(trio.BrokenResourceError, match="stopped reading"):
        core.check_sendable(None)
    core.raise_if_failed(None)  # receiving still works: what it sent stays readable
    assert core.take(100) == b"response"


def test_a_failed_link_breaks_every_operation_and_a_refusal_comes_first() -> None:
    core = _client_stream()
    with pytest.raises(LinkBroken, match="gone"):
        core.raise_if_failed("gone")
    core._refusal = PermissionError("refused by the response check")
    with pytest.raises(PermissionError):
        core.raise_if_failed("gone")


def test_sending_after_close_or_eof_is_a_closed_resource_error() -> None:
    core = _client_stream()
    core._local_ended = True
    with pytest.raises(trio.ClosedResourceError, match="send_eof"):
        core.check_sendable(None)
    core._closed = True
    with pytest.raises(trio.ClosedResourceError, match="closed"):
        core.check_sendable(None)
