"""The session's status is live: it says "reconnecting" (and why) as soon as no link to the
manager is up, whatever the heartbeat last saw, and "connected" again once one is."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing

from tele.cli.quick import translate
from tele.daemon.lease import SessionLease
from tele.errors import ConnectionFailed
from tele.rpc import manager_api as mapi
from tele.rpc.errors import Code, RpcError
from tele.rpc.links import LinkPool


class _Pool:
    def __init__(self) -> None:
        self.link: object | None = object()
        self.last_failure: str | None = None

    def pick(self) -> Any:
        return self.link

    async def wait_ready(self) -> Any:
        await trio.sleep_forever()


def test_status_says_reconnecting_as_soon_as_no_link_is_up_and_why() -> None:
    pool = _Pool()
    lease = SessionLease(
        cast(LinkPool, pool), kube_context="ctx", mapped_namespaces=[], api_timeout=5
    )
    assert (lease.status, lease.problem) == ("connecting", "")
    lease.status = "connected"
    assert (lease.status, lease.problem) == ("connected", "")
    pool.link, pool.last_failure = None, "the port-forward closed"
    assert (lease.status, lease.problem) == (
        "reconnecting",
        "no link to the traffic manager: the port-forward closed",
    )
    pool.link = object()
    assert (lease.status, lease.problem) == ("connected", "")
    lease.status = "disconnected"
    pool.link = None
    assert lease.status == "disconnected"


async def test_a_call_while_no_link_is_up_is_the_managers_trouble_not_a_lost_daemon(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = _Pool()
    pool.link, pool.last_failure = None, "the port-forward closed"
    lease = SessionLease(
        cast(LinkPool, pool), kube_context="ctx", mapped_namespaces=[], api_timeout=5
    )
    with pytest.raises(RpcError) as refused:
        await lease.call_in_session(mapi.REMAIN, lambda sid: mapi.SessionRequest(session_id=sid))
    assert refused.value.code is Code.ABORTED
    shown = translate(refused.value)
    assert isinstance(shown, ConnectionFailed)
    assert str(shown) == "No link to the traffic manager: the port-forward closed."
