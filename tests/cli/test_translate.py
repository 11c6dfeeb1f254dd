"""How the CLI words an RPC failure: the daemon's own trouble vs the cluster's relayed by it."""

from __future__ import annotations

import pytest
import trio

from tele.cli.quick import translate
from tele.errors import ConnectionFailed, UserError
from tele.rpc.errors import Code, RpcError


def test_relayed_manager_failures_are_not_blamed_on_the_daemon() -> None:
    error = translate(RpcError(Code.ABORTED, "the traffic manager did not complete it: gone"))
    assert isinstance(error, ConnectionFailed)
    assert str(error) == "The traffic manager did not complete it: gone."
    assert "daemon" not in str(error)
    lost = translate(RpcError(Code.UNAVAILABLE, "socket closed"))
    assert str(lost) == "Lost the connection to the daemon: socket closed."


def test_the_managers_refusals_are_its_sentences_not_a_failed_daemon() -> None:
    denied = translate(
        RpcError(Code.PERMISSION_DENIED, "ann may not patch deployments.apps in namespace dev")
    )
    assert isinstance(denied, UserError) and denied.exit_code == 1
    assert str(denied) == "ann may not patch deployments.apps in namespace dev."
    unknown = translate(RpcError(Code.UNAUTHENTICATED, "Present a bearer token."))
    assert isinstance(unknown, ConnectionFailed) and unknown.exit_code == 3
    assert str(unknown) == "Present a bearer token."


def test_user_mistakes_stay_user_errors() -> None:
    for code in (
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.FAILED_PRECONDITION,
    ):
        error = translate(RpcError(code, "nope"))
        assert isinstance(error, UserError) and error.exit_code == 1


async def _in_a_nursery(exc: BaseException) -> None:
    async def fail() -> None:
        raise exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail)


def test_a_command_body_error_from_inside_a_nursery_comes_out_as_one_sentence() -> None:
    from tele.cli import client

    with pytest.raises(UserError, match=r"^no such workload$"):
        client.run(lambda: _in_a_nursery(RpcError(Code.NOT_FOUND, "no such workload")))
    with pytest.raises(ConnectionFailed, match=r"^The manager went away$"):
        client.run(lambda: _in_a_nursery(ConnectionFailed("The manager went away")))
    with pytest.raises(UserError, match=r"^bare$"):
        client.run(lambda: _in_a_nursery_or_not(UserError("bare")))
    with pytest.raises(ExceptionGroup):  # a bug stays a bug, with its traceback
        client.run(lambda: _in_a_nursery(KeyError("bug")))


async def _in_a_nursery_or_not(exc: BaseException) -> None:
    raise exc
