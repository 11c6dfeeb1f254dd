"""Helpers for tests that run tele and its daemon as real processes.

`DaemonGuard` finds every process started under one test's private XDG_RUNTIME_DIR (the daemon
and any daemon that lost a start race) and kills those by pid when the test ends. Waiting for a
process to exit uses a pidfd, so no test sleeps.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from pathlib import Path

from tests.conftest import VENV_BIN

TELE = str(VENV_BIN / "tele")


def run_tele(
    env: dict[str, str], *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`tele ARGS...` as a user runs it, with the test's private home."""
    return subprocess.run(
        [TELE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def single_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed on stderr (asserting that it is just one)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert "Traceback" not in result.stderr
    return lines[0]


def private_home(home: Path, path: str) -> dict[str, str]:
    """A minimal environment for tele with its config, cache, state and runtime dirs made under
    `home` (for tests that run tele in namespaces of their own, without the test's env)."""
    for name in ("config", "cache", "state", "runtime"):
        (home / name).mkdir(mode=0o700)
    return {
        "PATH": path,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_STATE_HOME": str(home / "state"),
        "XDG_RUNTIME_DIR": str(home / "runtime"),
    }


def runtime_dir(env: dict[str, str]) -> Path:
    return Path(env["XDG_RUNTIME_DIR"]) / "tele"


def process_alive(pid: int) -> bool:
    """True while `pid` exists and has not exited (a zombie counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_exit(pid: int, timeout: float = 10) -> bool:
    """Block until `pid` exits (woken by its pidfd, not by polling); False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000)) or not process_alive(pid)
    finally:
        os.close(pidfd)


class DaemonGuard:
    """The daemons of one test: read their pids, and kill all of them at the end."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.runtime = runtime_dir(env)
        self._marker = f"XDG_RUNTIME_DIR={env['XDG_RUNTIME_DIR']}".encode()

    @property
    def socket(self) -> Path:
        return self.runtime / "daemon.sock"

    @property
    def pid_file(self) -> Path:
        return self.runtime / "daemon.pid"

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def processes(self) -> list[int]:
        """Live processes whose environment is this test's (daemons it started, spawned CLIs)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if self._marker + b"\0" in environ + b"\0" and process_alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def daemons(self) -> list[int]:
        """Live `tele daemon run` processes of this test."""
        result = []
        for pid in self.processes():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"daemon" in cmdline and b"run" in cmdline:
                result.append(pid)
        return result

    def kill_all(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_exit(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
