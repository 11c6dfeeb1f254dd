"""Run setup steps inside a named network namespace (or the current one).

The daemon normally works in its own namespace (`netns=None`). Tests (and a daemon that serves a
container's namespace) create the TUN device and the DNS sockets inside another namespace: a
file descriptor keeps the namespace it was created in, so only its creation has to happen
there. `setns(2)` changes the calling thread only, so the step runs in a fresh thread that ends
with it: no pooled thread is ever left in a foreign namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from tele.vif.errors import VifError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(name: str) -> None:
    path = NETNS_DIR / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VifError(f"network namespace {name} does not exist ({exc.strerror})") from exc
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise VifError(f"cannot enter network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Call `fn()` inside `netns` (blocking); the current namespace when `netns` is None."""
    if netns is None:
        return fn()
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            _setns(netns)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


async def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """`call_in_netns` off the trio thread (namespace switching and netlink calls block)."""
    return await trio.to_thread.run_sync(call_in_netns, netns, fn)
