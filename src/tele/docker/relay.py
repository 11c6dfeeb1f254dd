"""The daemon container's way to a Kubernetes API server on this machine's loopback (kind,
minikube, the sandbox), without a bridge or a firewall rule: two relays meeting at a unix
socket in a directory both containers mount.

```
daemon container (own netns)                      relay container (--network host)
 daemon --TCP--> 127.0.0.1:PORT  (listen_tcp)      (serve_unix) relay.sock --TCP--> 127.0.0.1:PORT
                    '--------- unix socket relay.sock ---------'                    (API server)
```

`python -m tele.docker.relay` is the entry point of tele's daemon image: `--listen
HOST:PORT=SOCKET` (inside the daemon container; then `-- ARGS` runs `tele ARGS`, the daemon,
and the relay ends with it), or `--serve SOCKET=HOST:PORT` (the relay container; it ends when
the process in `--while-pid-file` ends, the daemon's, seen through the host's PID namespace).
Each side takes at most MAX_CONNECTIONS at once and relays bytes only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
"""Connections relayed at once per listener; more wait to be accepted (the API client opens a
handful; a runaway one cannot make the relay hold thousands of sockets)."""
CHUNK = 65536
PID_FILE_WAIT = 120.0


async def _pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
        if isinstance(sink, trio.SocketStream):
            await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _splice(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    async with a, b, trio.open_nursery() as nursery:
        nursery.start_soon(_pipe, a, b)
        nursery.start_soon(_pipe, b, a)


async def _relay_to(
    accepted: trio.SocketStream, connect: tuple[str, int] | str, slots: trio.Semaphore
) -> None:
    try:
        try:
            if isinstance(connect, tuple):
                upstream: trio.abc.Stream = await trio.open_tcp_stream(*connect)
            else:
                upstream = await trio.open_unix_socket(connect)
        except OSError as exc:
            log.warning("relay: cannot reach %s: %s", connect, exc)
            await accepted.aclose()
            return
        await _splice(accepted, upstream)
    finally:
        slots.release()


async def _serve(listener: trio.SocketListener, connect: tuple[str, int] | str) -> None:
    slots = trio.Semaphore(MAX_CONNECTIONS)
    async with listener, trio.open_nursery() as nursery:
        while True:
            await slots.acquire()  # back-pressure: no accept beyond the limit
            accepted = await listener.accept()
            nursery.start_soon(_relay_to, accepted, connect, slots)


async def listen_tcp(host: str, port: int, socket_path: str) -> None:
    """TCP host:port -> the unix socket (inside the daemon container)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    listener = listeners[0]
    assert isinstance(listener, trio.SocketListener)
    await _serve(listener, socket_path)


async def serve_unix(socket_path: str, host: str, port: int) -> None:
    """The unix socket -> TCP host:port (the relay container, on the host's network); the
    socket is removed when the relay ends."""
    path = trio.Path(socket_path)
    await path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    try:
        os.chmod(path, 0o600)
        sock.listen(64)
        await _serve(trio.SocketListener(sock), (host, port))
    finally:
        # Made by root in the user's runtime directory: not left there when the relay ends.
        with contextlib.suppress(OSError):
            os.unlink(socket_path)


async def _wait_pid_file(pid_file: Path) -> None:
    """Until the process named in `pid_file` exits (after waiting for the file to appear)."""
    with trio.move_on_after(PID_FILE_WAIT) as waiting:
        while True:
            try:
                pid = int((await trio.Path(pid_file).read_text()).strip())
                fd = os.pidfd_open(pid)
                break
            except (OSError, ValueError):
                await trio.sleep(0.2)  # the daemon writes it once it runs: no event here
    if waiting.cancelled_caught:
        log.warning("relay: %s named no process in %.0f s", pid_file, PID_FILE_WAIT)
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"tele relay: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def _main(args: argparse.Namespace, command: list[str]) -> int:
    status = 0
    async with trio.open_nursery() as nursery:
        for item in args.listen:
            where, _, path = item.partition("=")
            host, port = _address(where)
            nursery.start_soon(listen_tcp, host, port, path)
        for item in args.serve:
            path, _, where = item.partition("=")
            host, port = _address(where)
            nursery.start_soon(serve_unix, path, host, port)
        if command:
            process = await trio.run_process(
                [sys.executable, "-m", "tele", *command], check=False, stdin=None
            )
            status = process.returncode
            nursery.cancel_scope.cancel()
        elif args.while_pid_file:
            await _wait_pid_file(Path(args.while_pid_file))
            nursery.cancel_scope.cancel()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        command = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(prog="tele-relay")
    parser.add_argument("--listen", action="append", default=[], metavar="HOST:PORT=SOCKET")
    parser.add_argument("--serve", action="append", default=[], metavar="SOCKET=HOST:PORT")
    parser.add_argument("--while-pid-file", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay %(message)s")
    try:
        return trio.run(_main, args, command)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
