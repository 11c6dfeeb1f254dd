"""Container logs: each run of a container writes one file, each line prefixed by its timestamp.

Writers notify readers through a trio.Event per file, so `kubectl logs -f` follows without
polling; the reader ends when the run ends.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio


def _stamp() -> bytes:
    now = time.time()
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e9):09d}Z "
    ).encode()


class LogFile:
    """The log of one container run: append-only file plus a change notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")
        self._partial = b""
        self.changed = trio.Event()
        self.closed = False

    def write(self, data: bytes) -> None:
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if lines:
            self._file.write(b"".join(_stamp() + line + b"\n" for line in lines))
            self._file.flush()
            self._notify()

    def close(self) -> None:
        if self._partial:
            self._file.write(_stamp() + self._partial + b"\n")
            self._partial = b""
        self._file.close()
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


def render(raw: bytes, *, timestamps: bool) -> bytes:
    if timestamps:
        return raw
    return b"".join(line.split(b" ", 1)[-1] for line in raw.splitlines(keepends=True))


def tail(raw: bytes, lines: int | None) -> bytes:
    if lines is None:
        return raw
    if lines <= 0:
        return b""
    return b"".join(raw.splitlines(keepends=True)[-lines:])
