"""Network namespaces: run `ip`/`nft` inside them and open sockets that live in them.

A socket belongs to the namespace of the thread that created it, so `socket_in` switches one
worker thread into the namespace with setns(2), creates the socket, and switches back; the trio
code then uses the socket as any other. Nothing here touches the host namespace's configuration.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
from pathlib import Path

import trio

from .errors import NodeError

NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
"""Per-namespace files `ip netns exec` mounts over /etc (the sandbox laptop's resolv.conf)."""
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = _CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


async def run(*argv: str, stdin: bytes | None = None, check: bool = True) -> str:
    """Run a command (ip, nft, ...); a failure becomes NodeError with its stderr."""
    result = await trio.run_process(
        list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
    )
    if check and result.returncode != 0:
        err = result.stderr.decode(errors="replace").strip()
        raise NodeError(f"`{' '.join(argv[:6])}` failed: {err}")
    return result.stdout.decode(errors="replace")


async def ip_batch(netns: str | None, commands: list[str]) -> None:
    """Run several `ip` commands in one process (`ip -batch`), optionally inside `netns`."""
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    await run(*argv, stdin=("\n".join(commands) + "\n").encode())


async def add(name: str) -> None:
    await run("ip", "netns", "add", name)


async def delete(name: str) -> None:
    """Kill what still runs inside `name` (processes we started there) and delete it."""
    if not exists(name):
        return
    pids = await run("ip", "netns", "pids", name, check=False)
    for pid in pids.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    await run("ip", "netns", "delete", name, check=False)


def delete_sync(name: str) -> None:
    """Blocking `delete` for cleanup paths outside trio (CLI `down`, crash recovery)."""
    if not exists(name):
        return
    pids = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    ).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def _socket_in_sync(name: str, family: int, kind: int) -> socket.socket:
    with open("/proc/thread-self/ns/net", "rb") as home, open(netns_path(name), "rb") as target:
        setns(target.fileno())
        try:
            return socket.socket(family, kind)
        finally:
            setns(home.fileno())


async def socket_in(
    name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> trio.socket.SocketType:
    """A new trio socket living in network namespace `name`."""
    try:
        sock = await trio.to_thread.run_sync(_socket_in_sync, name, family, kind)
    except OSError as exc:
        raise NodeError(f"cannot open a socket in network namespace {name}: {exc}") from exc
    return trio.socket.from_stdlib_socket(sock)


async def connect_in(name: str, host: str, port: int) -> trio.SocketStream:
    """A TCP connection made from inside network namespace `name`."""
    sock = await socket_in(name)
    try:
        await sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return trio.SocketStream(sock)
