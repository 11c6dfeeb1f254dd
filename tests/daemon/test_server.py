"""The daemon's RPC handlers and accept loop in-process, on a real unix socket, called both by
the CLI's blocking fast path (tele.cli.quick) and by the trio RPC client."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from tele import logs, unixsock
from tele.cli import quick
from tele.cli.basic import _ended
from tele.cli.cluster_cmd import connection_lines
from tele.cli.output import to_builtins
from tele.daemon import server
from tele.daemon.server import Daemon
from tele.errors import ConnectionFailed
from tele.loglevel import LogLevelController
from tele.rpc import daemon_api as api
from tele.rpc.client import Client, open_client
from tele.rpc.errors import Code, RpcError
from tele.rpc.method import Req, Resp, Unary
from tele.testing.waits import wait_for


@pytest.fixture
def restore_log_level() -> Iterator[None]:
    root = logging.getLogger()
    level, h2_level = root.level, logging.getLogger("h2").level
    try:
        yield
    finally:
        root.setLevel(level)
        logging.getLogger("h2").setLevel(h2_level)


@dataclass
class Running:
    daemon: Daemon
    socket: Path
    pid_file: Path
    nursery: trio.Nursery


@pytest.fixture
async def running(tmp_path: Path, restore_log_level: None) -> AsyncIterator[Running]:
    socket_path = tmp_path / "daemon.sock"
    pid_file = tmp_path / "daemon.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    logs.set_level("info")
    level = LogLevelController("info")
    daemon = Daemon(
        listener=await unixsock.open_private_listener(socket_path),
        socket_path=socket_path,
        pid_path=pid_file,
        log_file=tmp_path / "daemon.log",
        log_level=level,
        max_message_size=64 * 1024,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(level.serve)
        await nursery.start(daemon.serve)
        yield Running(daemon, socket_path, pid_file, nursery)
        nursery.cancel_scope.cancel()
    await daemon.listener.aclose()


async def quick_call(running: Running, method: Unary[Req, Resp], request: Req) -> Resp:
    return await trio.to_thread.run_sync(quick.call, running.socket, method, request)


async def test_status_and_version_over_the_blocking_fast_path(running: Running) -> None:
    status = await quick_call(running, api.STATUS, api.Empty())
    version = await quick_call(running, api.VERSION, api.Empty())

    assert isinstance(status, api.StatusReply)
    assert status.pid == os.getpid()
    assert status.socket == str(running.socket)
    assert status.log_level == "info"
    assert status.connection == "not connected"
    assert status.uptime >= 0
    assert isinstance(version, api.VersionReply)
    assert version.version == "0.1.0"


async def test_set_log_level_over_the_trio_client(running: Running) -> None:
    async with await unixsock.connect(running.socket) as stream, open_client(stream) as client:
        reply = await client.call(
            api.SET_LOG_LEVEL, api.SetLogLevelRequest(level="DEBUG", duration=90)
        )
        assert (reply.level, reply.previous, reply.revert_to) == ("debug", "info", "info")
        assert reply.revert_in is not None and 89 < reply.revert_in <= 90
        assert logging.getLogger().level == logging.DEBUG

        with pytest.raises(RpcError) as bad_level:
            await client.call(api.SET_LOG_LEVEL, api.SetLogLevelRequest(level="loud"))
        with pytest.raises(RpcError) as bad_duration:
            await client.call(api.SET_LOG_LEVEL, api.SetLogLevelRequest(level="info", duration=-1))

    assert bad_level.value.code == Code.INVALID_ARGUMENT
    assert "expected one of trace, debug, info, warning, error" in bad_level.value.message
    assert bad_duration.value.code == Code.INVALID_ARGUMENT
    assert logging.getLogger().level == logging.DEBUG  # the refused calls changed nothing


async def test_quit_replies_after_removing_socket_and_pid_file(running: Running) -> None:
    reply = await quick_call(running, api.QUIT, api.Empty())

    assert isinstance(reply, api.QuitReply)
    assert reply.pid == os.getpid()
    assert running.daemon.quit_requested.is_set()
    assert not running.socket.exists()
    assert not running.pid_file.exists()
    with trio.fail_after(5):
        await running.daemon.connections_closed()
    with pytest.raises(quick.DaemonNotRunning):
        await trio.to_thread.run_sync(quick.call, running.socket, api.STATUS, api.Empty())


async def test_quick_call_errors(running: Running, tmp_path: Path) -> None:
    with pytest.raises(quick.DaemonNotRunning):
        await trio.to_thread.run_sync(quick.call, tmp_path / "absent.sock", api.STATUS, api.Empty())
    with pytest.raises(RpcError) as unknown_level:
        await quick_call(running, api.SET_LOG_LEVEL, api.SetLogLevelRequest(level="loud"))
    assert unknown_level.value.code == Code.INVALID_ARGUMENT
    error = quick.translate(unknown_level.value)
    assert error.exit_code == 1
    assert str(error).startswith("Unknown log level: expected one of")


def test_quick_call_gives_up_at_its_deadline(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen()  # connections complete in the backlog; nobody ever answers

        with pytest.raises(RpcError) as info:
            quick.call(path, api.STATUS, api.Empty(), timeout=0.2)

    assert info.value.code == Code.DEADLINE_EXCEEDED
    assert str(quick.translate(info.value)) == "The daemon did not answer in time."


def test_quick_call_reports_a_peer_that_hangs_up(tmp_path: Path) -> None:
    path = tmp_path / "rude.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as rude:
        rude.bind(str(path))
        rude.listen()

        def accept_and_close() -> None:
            connection, _ = rude.accept()
            connection.close()

        hang_up = threading.Thread(target=accept_and_close)
        hang_up.start()
        try:
            with pytest.raises(RpcError) as info:
                quick.call(path, api.STATUS, api.Empty(), timeout=5)
        finally:
            hang_up.join()

    assert info.value.code == Code.UNAVAILABLE
    assert str(quick.translate(info.value)).startswith("Lost the connection to the daemon")


class StandInSession:
    """In place of ClusterSession (tele.daemon.session): starts when the test says, then runs
    until the test makes it fail. What is under test is the Daemon's handling of it."""

    made: list[StandInSession] = []
    kubeconfig = ""
    """A kubeconfig for the connect requests (the daemon opens a client for it)."""

    def __init__(self, request: api.ConnectRequest, kube: object, **options: object) -> None:
        self.request = request
        self.status = "connecting"
        self.started = False
        self.go = trio.Event()
        self.fail = trio.Event()
        StandInSession.made.append(self)
        self.session_id = f"session-{len(StandInSession.made)}"

    def info(self) -> api.ConnectionInfo:
        return api.ConnectionInfo(
            status=self.status,
            kube_server="https://127.0.0.1:1",
            kube_context="stand-in",
            namespace="default",
            manager_namespace="ambassador",
            session_id=self.session_id,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[api.ConnectionInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.go.wait()
        self.status = "connected"
        self.started = True
        task_status.started(self.info())
        await self.fail.wait()
        self.status = "disconnected"
        async with trio.open_nursery() as parts:  # as in ClusterSession: its parts' errors group
            parts.start_soon(self._went_away)

    async def _went_away(self) -> None:
        raise ConnectionFailed("the traffic manager went away")

    async def disconnect(self) -> None:
        self.fail.set()


@asynccontextmanager
async def client_of(running: Running) -> AsyncIterator[Client]:
    async with await unixsock.connect(running.socket) as stream, open_client(stream) as client:
        yield client


@pytest.fixture
def stand_in_sessions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[list[StandInSession]]:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(server, "ClusterSession", StandInSession)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: stand-in\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: stand-in, context: {cluster: c, user: u}}]\n"
    )
    StandInSession.made = []
    StandInSession.kubeconfig = str(kubeconfig)
    yield StandInSession.made


async def test_two_connects_at_once_start_one_session(
    running: Running, stand_in_sessions: list[StandInSession]
) -> None:
    await running.nursery.start(running.daemon.run_sessions)
    replies: list[api.ConnectionInfo] = []

    async def connect() -> None:
        async with client_of(running) as client:
            replies.append(
                await client.call(
                    api.CONNECT,
                    api.ConnectRequest(kubeconfig=StandInSession.kubeconfig),
                    timeout=60,
                )
            )

    async with trio.open_nursery() as callers:
        callers.start_soon(connect)
        callers.start_soon(connect)
        await wait_for(lambda: len(stand_in_sessions) == 1, timeout=60)
        # The second connect waits for the first to end starting its session.
        await wait_for(
            lambda: running.daemon._connecting.statistics().tasks_waiting == 1, timeout=60
        )
        await trio.testing.wait_all_tasks_blocked()
        assert len(stand_in_sessions) == 1
        stand_in_sessions[0].go.set()
    assert len(stand_in_sessions) == 1
    assert [r.session_id for r in replies] == ["session-1", "session-1"]
    assert running.daemon.session is not None
    stand_in_sessions[0].fail.set()


async def test_a_session_that_fails_after_starting_says_why_in_status(
    running: Running, stand_in_sessions: list[StandInSession]
) -> None:
    await running.nursery.start(running.daemon.run_sessions)
    async with client_of(running) as client:

        async def connect() -> None:
            await client.call(
                api.CONNECT, api.ConnectRequest(kubeconfig=StandInSession.kubeconfig), timeout=60
            )

        async with trio.open_nursery() as caller:
            caller.start_soon(connect)
            await wait_for(lambda: len(stand_in_sessions) == 1, timeout=60)
            stand_in_sessions[0].go.set()
        stand_in_sessions[0].fail.set()
        await wait_for(lambda: running.daemon.session is None, timeout=60)
        status = await client.call(api.STATUS, api.Empty(), timeout=60)
        assert status.connection == "not connected"
        assert status.session is not None
        assert status.session.status == "failed"
        assert status.session.last_error == "the traffic manager went away"
        assert status.session.ended_at > 0
        ended_at = time.strftime("%H:%M:%S", time.gmtime(status.session.ended_at))
        assert _ended(to_builtins(status.session)) == (
            f": the session ended at {ended_at} UTC: the traffic manager went away"
        )
        # Said once, first: not again as the details' "Last error".
        assert "Last error" not in "\n".join(connection_lines(to_builtins(status.session)))
        # A new connect starts afresh (and the failed session's report goes).
        async with trio.open_nursery() as caller:
            caller.start_soon(connect)
            await wait_for(lambda: len(stand_in_sessions) == 2, timeout=60)
            stand_in_sessions[1].go.set()
        status = await client.call(api.STATUS, api.Empty(), timeout=60)
        assert status.connection == "connected"
        assert status.session is not None and status.session.last_error == ""
        stand_in_sessions[1].fail.set()
