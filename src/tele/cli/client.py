"""How the CLI reaches the daemon: connect to its socket, start it on demand, open an RPC client.

Starting: the CLI spawns `python -m tele daemon run --ready-fd N` detached (its own session,
stdin/stdout on /dev/null, stderr appended to daemon.stderr.log for crashes before logging is
set up) and reads one line from the readiness pipe (see tele.daemon.process) under a deadline.
A daemon that loses the start race reports "busy"; its CLI then polls for the winner's socket.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from tele import paths, unixsock
from tele.cli.quick import translate
from tele.errors import ConnectionFailed, TeleError, UserError, first_leaf
from tele.rpc.client import Client, open_client
from tele.rpc.errors import RpcError
from tele.rpc.method import Req, Resp, Unary

T = TypeVar("T")

CONNECT_TIMEOUT = 5.0  # connecting to a socket that exists: local, should be immediate
CALL_TIMEOUT = 10.0
_POLL_INITIAL = 0.005
_POLL_MAX = 0.1
# After a "busy" answer, how long to poll for the other daemon's socket before spawning again
# (the other daemon may be stopping rather than starting).
_BUSY_POLL = 1.0


def stderr_log() -> Path:
    return paths.logs_dir() / "daemon.stderr.log"


async def _try_connect() -> trio.SocketStream | None:
    """A stream to the running daemon, or None when none listens."""
    path = paths.daemon_socket()
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await unixsock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # no daemon, or a killed one's stale socket
    except trio.TooSlowError:
        raise ConnectionFailed(f"The daemon's socket {path} does not answer.") from None
    except OSError as exc:
        raise ConnectionFailed(f"Cannot connect to the daemon at {path}: {exc.strerror}.") from exc
    peer = unixsock.peer_credentials(stream.socket)
    if not unixsock.peer_is_trusted(peer.uid):
        await trio.aclose_forcefully(stream)
        raise ConnectionFailed(
            f"The process listening on {path} belongs to uid {peer.uid}, not to you; "
            "remove that socket and try again."
        )
    return stream


def _spawn() -> tuple[subprocess.Popen[bytes], int]:
    """Start a detached daemon; return it and the read end of its readiness pipe."""
    try:
        paths.ensure_private_dir(paths.logs_dir())
    except OSError as exc:
        raise ConnectionFailed(
            f"Cannot start the daemon: cannot create {paths.logs_dir()}: {exc.strerror or exc}."
        ) from exc
    read_fd, write_fd = os.pipe()
    try:
        with open(stderr_log(), "ab") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "tele", "daemon", "run", "--ready-fd", str(write_fd)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=(write_fd,),
                start_new_session=True,  # not killed by the terminal's SIGINT/SIGHUP
                cwd="/",  # do not pin the directory the CLI ran in
            )
    except OSError as exc:
        os.close(read_fd)
        raise ConnectionFailed(f"Cannot start the daemon: {exc.strerror or exc}.") from exc
    finally:
        os.close(write_fd)
    return process, read_fd


async def _read_ready_line(read_fd: int) -> str:
    """The daemon's one readiness line ("" if it closed the pipe without one)."""
    data = b""
    async with trio.lowlevel.FdStream(read_fd) as pipe:
        while b"\n" not in data and len(data) < 4096:
            chunk = await pipe.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").partition("\n")[0].strip()


async def _spawn_and_wait(timeout: float) -> str:
    """Spawn a daemon and return its readiness word: "ready" or "busy"; raise if it failed."""
    process, read_fd = _spawn()
    with trio.move_on_after(timeout) as waiting:
        line = await _read_ready_line(read_fd)
    if waiting.cancelled_caught:
        raise ConnectionFailed(
            f"The daemon did not start within {timeout:g}s; see {paths.logs_dir() / 'daemon.log'}."
        )
    word, _, detail = line.partition(" ")
    if word == "ready":
        return word
    # busy, error or a crash: this process exits now; reap it so it leaves no zombie behind.
    with trio.move_on_after(1):
        await trio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
    if word == "busy":
        return word
    if word == "error":
        raise ConnectionFailed(detail)
    raise ConnectionFailed(
        f"The daemon exited while starting (status {process.returncode}); see {stderr_log()}."
    )


async def connect_daemon(*, start: bool, start_timeout: float = 10.0) -> trio.SocketStream | None:
    """A stream to the daemon; when none runs, start one if `start`, else return None.

    Safe to race: the daemon's lock lets exactly one of several spawned daemons run.
    """
    stream = await _try_connect()
    if stream is not None or not start:
        return stream
    deadline = trio.current_time() + start_timeout
    while True:
        word = await _spawn_and_wait(max(0.0, deadline - trio.current_time()))
        if word == "ready":
            stream = await _try_connect()
            if stream is not None:
                return stream
        # Another daemon holds the lock: wait for its socket, then try again ourselves.
        poll_until = min(deadline, trio.current_time() + _BUSY_POLL)
        delay = _POLL_INITIAL
        while True:
            stream = await _try_connect()
            if stream is not None:
                return stream
            if trio.current_time() >= poll_until:
                break
            await trio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
        if trio.current_time() >= deadline:
            raise ConnectionFailed(
                f"The daemon did not start within {start_timeout:g}s; "
                f"see {paths.logs_dir() / 'daemon.log'}."
            )


@contextlib.asynccontextmanager
async def daemon_client(*, start: bool) -> AsyncIterator[Client | None]:
    """An RPC client to the daemon, or None when it does not run and `start` is False."""
    start_timeout = 10.0
    if start:
        from tele import config

        start_timeout = float(config.load().timeouts.daemon_start)
    stream = await connect_daemon(start=start, start_timeout=start_timeout)
    if stream is None:
        yield None
        return
    async with stream, open_client(stream) as client:
        yield client


def call_connected(
    method: Unary[Req, Resp],
    request: Req,
    *,
    timeout: float,
    connect: bool = False,
    progress: str = "",
) -> Resp:
    """One call to a running daemon (a command that needs a session: none runs, none has one);
    RPC errors become one-sentence TeleErrors. With `connect`, a daemon without a session
    first connects as `tele connect` with no flags would (as Telepresence's intercept and list
    do), saying so in one line. With `progress`, a terminal shows it and the daemon's current
    step while the call runs (`show_progress`)."""

    async def call() -> Resp:
        async with daemon_client(start=connect) as rpc:
            if rpc is None:
                raise UserError("Not connected; run `tele connect` first.")

            async def work() -> Resp:
                if connect:
                    await _connect_if_needed(rpc)
                return await rpc.call(method, request, timeout=timeout)

            return await show_progress(rpc, progress, work) if progress else await work()

    return run(call)


PROGRESS_POLL = 0.25
"""Seconds between two looks at the daemon's current step while a terminal shows it."""


async def show_progress(rpc: Client, label: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work`; on a terminal, meanwhile, a spinner with `label`, the daemon's current step
    and the seconds waited (agent injection and roll-outs take a while). Nothing when stderr
    is not a terminal."""
    if not sys.stderr.isatty():
        return await work()
    from rich.console import Console

    from tele.rpc import daemon_api

    with Console(stderr=True).status(f"{label}...") as status:

        async def follow() -> None:
            started = trio.current_time()
            while True:
                try:
                    reply = await rpc.call(daemon_api.PROGRESS, daemon_api.Empty(), timeout=5)
                    steps = reply.steps
                except RpcError:
                    steps = []  # (an older daemon: the label alone)
                waited = int(trio.current_time() - started)
                text = f"{label}: {steps[-1]}" if steps else f"{label}..."
                status.update(f"{text} ({waited}s)")
                await trio.sleep(PROGRESS_POLL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            result = await work()
            nursery.cancel_scope.cancel()
    return result


async def _connect_if_needed(rpc: Client) -> None:
    import click

    from tele.rpc import daemon_api

    status = await rpc.call(daemon_api.STATUS, daemon_api.Empty(), timeout=10)
    if status.connection != "not connected":
        return
    connect = daemon_api.ConnectRequest(
        kubeconfig=os.environ.get("KUBECONFIG", ""), vif_when_possible=True
    )
    info = await rpc.call(daemon_api.CONNECT, connect, timeout=180)
    click.echo(
        f"tele: not connected: connected to context {info.kube_context} ({info.kube_server}) "
        "as `tele connect` does",
        err=True,
    )


def run(async_fn: Callable[[], Awaitable[T]]) -> T:
    """trio.run for a command body, with RPC errors turned into one-sentence TeleErrors."""
    try:
        return trio.run(async_fn)
    except* RpcError as group:
        raise translate(first_leaf(group)) from group
    except* TeleError as group:
        raise first_leaf(group) from None  # the sentence is all the user needs
