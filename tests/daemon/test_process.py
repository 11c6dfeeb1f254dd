"""The daemon as a real process, started the way the CLI starts it: lifecycle, one per user,
stale files, signals, and who may talk to it."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import tele.net
from tele import unixsock
from tests.daemon.util import (
    TELE,
    DaemonGuard,
    process_alive,
    run_tele,
    single_error_line,
    wait_exit,
)


def start_daemon(env: dict[str, str]) -> int:
    result = run_tele(env, "daemon", "start", "-o", "json")
    assert result.returncode == 0, result.stderr
    pid = json.loads(result.stdout)["pid"]
    assert isinstance(pid, int)
    return pid


def status(env: dict[str, str]) -> dict[str, object]:
    result = run_tele(env, "status", "-o", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_status_sees_the_daemon_the_cli_started(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    assert status(tele_env)["daemon"] == {"running": False}
    assert guard.daemons() == []  # status never starts one

    pid = start_daemon(tele_env)

    assert guard.daemons() == [pid]
    assert guard.pid() == pid
    mode = guard.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(guard.runtime.stat().st_mode) == 0o700
    # Detached: its own session, so the terminal's signals do not reach it.
    assert os.getsid(pid) == pid
    data = status(tele_env)
    daemon = data["daemon"]
    assert isinstance(daemon, dict)
    assert daemon["running"] is True
    assert daemon["pid"] == pid
    assert daemon["socket"] == str(guard.socket)
    assert daemon["log_file"].endswith("/tele/logs/daemon.log")
    assert data["connection"] == "not connected"
    assert f"pid {pid}" in run_tele(tele_env, "version").stdout
    # A second start finds the running daemon instead of starting another.
    assert start_daemon(tele_env) == pid
    assert guard.daemons() == [pid]


def test_quit_stops_the_daemon_and_removes_its_files(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    pid = start_daemon(tele_env)

    result = run_tele(tele_env, "quit")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"Stopped the daemon (pid {pid})."
    assert not process_alive(pid)  # quit returns only once the process is gone
    assert not guard.socket.exists()
    assert not guard.pid_file.exists()
    log = tele_env["XDG_CACHE_HOME"] + "/tele/logs/daemon.log"
    with open(log) as f:
        text = f.read()
    assert "quit requested" in text
    # Its first line says whether tele.net's mypyc build ran (tele.net.NATIVE: this process's
    # answer is the daemon's, both import the same tree with the same environment).
    native = "compiled (mypyc)" if tele.net.NATIVE else "Python (no current native build)"
    assert f"packet codecs and userspace TCP: {native}" in text
    again = run_tele(tele_env, "quit")
    assert again.returncode == 0
    assert again.stdout.strip() == "The daemon is not running."


def test_sigterm_stops_the_daemon_gracefully(tele_env: dict[str, str], guard: DaemonGuard) -> None:
    pid = start_daemon(tele_env)

    os.kill(pid, signal.SIGTERM)

    assert wait_exit(pid)
    assert not guard.socket.exists()
    assert not guard.pid_file.exists()
    assert status(tele_env)["daemon"] == {"running": False}


def test_a_killed_daemon_is_replaced_by_the_next_start(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    old = start_daemon(tele_env)
    os.kill(old, signal.SIGKILL)
    assert wait_exit(old)
    # SIGKILL runs no cleanup: the socket and pid file are left behind, stale.
    assert guard.socket.exists()
    assert guard.pid() == old

    assert status(tele_env)["daemon"] == {"running": False}  # a refused socket is no daemon
    new = start_daemon(tele_env)

    assert new != old
    assert guard.daemons() == [new]
    assert guard.pid() == new
    daemon = status(tele_env)["daemon"]
    assert isinstance(daemon, dict) and daemon["pid"] == new


def test_racing_clis_end_with_exactly_one_daemon(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    racers = [
        subprocess.Popen(
            [TELE, "daemon", "start", "-o", "json"],
            env=tele_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [racer.communicate(timeout=30) for racer in racers]

    assert [racer.returncode for racer in racers] == [0] * 4, outputs
    pids = {json.loads(out)["pid"] for out, _ in outputs}
    assert len(pids) == 1
    assert guard.daemons() == list(pids)


def test_loglevel_changes_the_running_daemons_level(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    pid = start_daemon(tele_env)

    result = run_tele(tele_env, "loglevel", "debug", "--duration", "1m", "-o", "json")

    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["level"] == "debug"
    assert reply["previous"] == "info"
    assert reply["revert_to"] == "info"
    assert 0 < reply["revert_in"] <= 60
    daemon = status(tele_env)["daemon"]
    assert isinstance(daemon, dict)
    assert daemon["log_level"] == "debug"
    assert daemon["pid"] == pid
    forever = run_tele(tele_env, "loglevel", "warning", "-d", "0")
    assert forever.returncode == 0, forever.stderr
    assert forever.stdout.strip() == "The daemon's log level is warning (was debug)."


def test_foreground_daemon_refuses_a_second_one_and_stops_on_sigint(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    first = start_daemon(tele_env)

    second = run_tele(tele_env, "daemon", "run")

    assert second.returncode == 1
    assert single_error_line(second) == f"tele: A tele daemon is already running (pid {first})."
    assert guard.daemons() == [first]
    os.kill(first, signal.SIGINT)
    assert wait_exit(first)
    assert not guard.socket.exists()


def _connect_as(uid: int, path: str) -> bytes:
    """In a child running as `uid`, connect to `path`, send an HTTP/2 preface and return what the
    server sent back (b"" = it hung up without a word, by FIN or by reset)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only os._exit
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(path)
                try:
                    sock.sendall(
                        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
                    )
                    received = sock.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    received = b""  # hung up on us (a reset when our bytes were unread)
            os.write(write_fd, b"ok:" + received)
        except BaseException as exc:  # report anything to the parent
            os.write(write_fd, f"err:{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    answer = b"".join(chunks)
    assert answer.startswith(b"ok:"), answer
    return answer[3:]


@pytest.fixture
def shared_runtime_env(tele_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """tele_env with XDG_RUNTIME_DIR in a fresh directory that other users may traverse (pytest's
    own temp dirs are 0700 all the way up), so that only the daemon's check can refuse them."""
    runtime = tempfile.mkdtemp(prefix="tele-test-runtime-")
    os.chmod(runtime, 0o711)
    try:
        yield {**tele_env, "XDG_RUNTIME_DIR": runtime}
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")
def test_another_uid_is_refused(shared_runtime_env: dict[str, str]) -> None:
    """What this proves: on the real daemon's socket, its SO_PEERCRED check hangs up on a process
    of another uid (nobody) that got past the file permissions, and answers its own uid.
    What it does not: how a non-root daemon treats root (allowed by design, see tele.unixsock)."""
    env = shared_runtime_env
    guard = DaemonGuard(env)
    try:
        start_daemon(env)
        # Open the file-permission gate on purpose, so that only the peer check stands in the way.
        os.chmod(guard.runtime, 0o711)
        os.chmod(guard.socket, 0o666)
        nobody = 65534

        refused = _connect_as(nobody, str(guard.socket))
        accepted = _connect_as(os.getuid(), str(guard.socket))

        assert refused == b""
        assert accepted[3:4] == b"\x04"  # the server's HTTP/2 SETTINGS frame
        log = env["XDG_CACHE_HOME"] + "/tele/logs/daemon.log"
        with open(log) as f:
            assert f"uid {nobody} (not this user)" in f.read()
    finally:
        guard.kill_all()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")
def test_a_root_daemon_serves_the_user_it_runs_for(shared_runtime_env: dict[str, str]) -> None:
    """What this proves: a root daemon given TELE_DAEMON_OWNER (what `tele connect --docker`
    passes to the daemon in its container) gives that user its socket (still 0600) and its pid,
    lock and log files, and its peer check answers that user, through the file permissions as
    they are; another uid is still hung up on.
    What it does not: the container (tests/e2e/test_docker_on_sandbox.py runs it as root)."""
    nobody, other = 65534, 65533
    env = {**shared_runtime_env, unixsock.OWNER_ENV: str(nobody)}
    guard = DaemonGuard(env)
    try:
        start_daemon(env)
        os.chmod(guard.runtime, 0o711)  # the user's own runtime dir, where they can go
        for made in (guard.socket, guard.pid_file, guard.runtime / "daemon.lock"):
            assert made.stat().st_uid == nobody, made
        log = Path(env["XDG_CACHE_HOME"]) / "tele" / "logs" / "daemon.log"
        assert log.stat().st_uid == nobody
        assert stat.S_IMODE(guard.socket.stat().st_mode) == 0o600

        accepted = _connect_as(nobody, str(guard.socket))
        assert accepted[3:4] == b"\x04"  # the server's HTTP/2 SETTINGS frame

        os.chmod(guard.socket, 0o666)  # only the peer check stands in the other uid's way
        assert _connect_as(other, str(guard.socket)) == b""
        assert f"uid {other} (not this user)" in log.read_text()
    finally:
        guard.kill_all()


def test_daemon_run_in_the_foreground_until_quit(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    foreground = subprocess.Popen(
        [TELE, "daemon", "run"], env=tele_env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert foreground.stderr is not None
        ready, _, _ = select.select([foreground.stderr], [], [], 20)
        assert ready, "the foreground daemon did not report that it listens"
        line = foreground.stderr.readline()
        assert line.startswith(f"tele daemon: listening on {guard.socket}")

        daemon = status(tele_env)["daemon"]
        assert isinstance(daemon, dict) and daemon["pid"] == foreground.pid
        assert run_tele(tele_env, "quit").returncode == 0

        assert foreground.wait(timeout=10) == 0
        assert foreground.stderr.read() == ""  # a clean stop prints nothing more
    finally:
        if foreground.poll() is None:
            foreground.kill()
            foreground.wait()
        if foreground.stderr is not None:
            foreground.stderr.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give files to another user")
def test_the_log_of_a_daemon_for_another_user_stays_that_users_across_rollovers(
    tmp_path: Path,
) -> None:
    from tele import logs

    path = tmp_path / "daemon.log"
    handler = logs._OwnedFileHandler(path, 65534)
    try:
        handler.emit(logging.makeLogRecord({"msg": "before the rollover"}))
        handler.doRollover()
        handler.emit(logging.makeLogRecord({"msg": "after it"}))
    finally:
        handler.close()
    assert "after it" in path.read_text()
    assert "before the rollover" in path.with_name("daemon.log.1").read_text()
    for made in (path, path.with_name("daemon.log.1")):
        assert made.stat().st_uid == 65534, made
