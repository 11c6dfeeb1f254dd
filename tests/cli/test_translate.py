"""How the CLI words an RPC failure: the daemon's own trouble vs the cluster's relayed by it."""

from __future__ import annotations

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


def test_user_mistakes_stay_user_errors() -> None:
    for code in (
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.FAILED_PRECONDITION,
    ):
        error = translate(RpcError(code, "nope"))
        assert isinstance(error, UserError) and error.exit_code == 1
