"""The daemon's RPC handlers and accept loop in-process, on a real unix socket, called both by
the CLI's blocking fast path (tele.cli.quick) and by the trio RPC client."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tele import logs, unixsock
from tele.cli import quick
from tele.daemon.loglevel import LogLevelController
from tele.daemon.server import Daemon
from tele.rpc import daemon_api as api
from tele.rpc.client import open_client
from tele.rpc.errors import Code, RpcError
from tele.rpc.method import Req, Resp, Unary


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
