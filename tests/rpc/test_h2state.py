"""tele.rpc.h2state.StreamCore with plain bytes: the ends and resets decide what a close sends
and what a send or receive raises (its credit is tele.net.h2credit's: tests/net/test_h2credit.py).
No link, no trio run."""

from __future__ import annotations

import h2.errors
import pytest
import trio

from tele.rpc.h2state import CloseAction, LinkBroken, StreamCore, StreamReset


def _client_stream() -> StreamCore:
    return StreamCore(1, needs_response=False)


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
