"""The daemon process from start to exit: the one-per-user lock, the pid file, the readiness
report to the CLI that spawned it, signals, and cleanup that runs however the process ends.

Start-up order: config -> lock (else report "busy") -> log file -> socket (a stale one left by a
killed daemon is replaced: holding the lock proves nobody else owns it) -> pid file -> "ready".

Readiness protocol on `--ready-fd` (a pipe from the spawner), exactly one line then close:
  "ready <pid>"   listening; connect now
  "busy <pid>"    another daemon holds the lock (it may be starting or stopping); this one exits
  "error <text>"  could not start; <text> is one sentence for the user
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
from pathlib import Path

import trio

import tele
import tele.net
from tele import _patches, config, gctune, logs, paths, unixsock
from tele.daemon import leftovers
from tele.daemon.server import Daemon
from tele.errors import TeleError, UserError
from tele.loglevel import LogLevelController

log = logging.getLogger(__name__)

CLEANUP_TIMEOUT = 5.0
# After `quit` has replied, how long the CLI that asked gets to read the reply and hang up.
QUIT_GRACE = 1.0


class ReadyPipe:
    """The write end of the spawner's readiness pipe; absent when run in the foreground."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self.spawned = fd is not None

    def report(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, line.replace("\n", " ").encode() + b"\n")
        except OSError:
            pass  # the spawner gave up waiting; the log still says what happened
        finally:
            os.close(fd)


def acquire_lock(path: Path) -> int | None:
    """flock `path` exclusively without waiting; the fd (kept open for the process's life) or
    None when another process holds it. The kernel drops the lock when the process dies, even
    by SIGKILL, which is what makes stale files detectable."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_pid_file(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)  # readers never see a half-written pid


def _hand_over(*files: Path) -> None:
    """A root daemon running for another user (unixsock.delegated_uid: connect --docker) gives
    that user the files it made in the user's directories, so that the user's own tele can read
    and replace them later (the socket and the log files are given when they are made)."""
    owner = unixsock.delegated_uid()
    if owner is None:
        return
    for path in files:
        try:
            os.chown(path, owner, -1)
        except OSError as exc:
            log.warning("cannot give %s to uid %d: %s", path, owner, exc.strerror or exc)


def run(*, ready_fd: int | None = None) -> None:
    """Run the daemon until `tele quit`, SIGTERM or SIGINT; raise TeleError if it cannot start."""
    ready = ReadyPipe(ready_fd)
    try:
        cfg = config.load()
        try:
            paths.ensure_private_dir(paths.runtime_dir())
            lock_fd = acquire_lock(paths.daemon_lock())
        except OSError as exc:
            raise TeleError(
                f"Cannot use the runtime directory {paths.runtime_dir()}: {exc.strerror or exc}."
            ) from exc
        if lock_fd is None:
            pid = read_pid(paths.daemon_pid())
            ready.report(f"busy {pid or 0}")
            raise UserError(
                f"A tele daemon is already running (pid {pid})."
                if pid
                else "A tele daemon is already starting or stopping."
            )
        try:
            try:
                log_file = logs.setup_file_logging(
                    "daemon", str(cfg.log_levels.user_daemon), owner=unixsock.delegated_uid()
                )
            except OSError as exc:
                raise TeleError(
                    f"Cannot open the log file in {paths.logs_dir()}: {exc.strerror or exc}."
                ) from exc
            log.info(
                "tele daemon %s starting, pid %d; packet codecs and userspace TCP: %s",
                tele.__version__,
                os.getpid(),
                "compiled (mypyc)" if tele.net.NATIVE else "Python (no current native build)",
            )
            _patches.apply()
            trio.run(_main, cfg, log_file, ready)
        finally:
            os.close(lock_fd)
    except TeleError as exc:
        ready.report(f"error {exc}")
        if logging.getLogger().handlers:  # else the CLI's one-line report is all there is
            log.error("daemon stopped: %s", exc)
        raise
    except BaseException as exc:
        ready.report(f"error The daemon failed to start: {type(exc).__name__}: {exc}.")
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            log.exception("daemon crashed")
        raise
    log.info("daemon stopped")


async def _main(cfg: config.Config, log_file: Path, ready: ReadyPipe) -> None:
    socket_path = paths.daemon_socket()
    pid_path = paths.daemon_pid()
    try:
        listener = await unixsock.open_private_listener(socket_path)
    except OSError as exc:
        raise TeleError(f"Cannot listen on {socket_path}: {exc.strerror or exc}.") from exc
    from tele.vif.helper_link import open_helper_listener, serve_helper_socket

    helper_path = paths.helper_socket()
    try:
        helper_listener = await open_helper_listener(helper_path)
    except OSError as exc:
        await listener.aclose()
        raise TeleError(f"Cannot listen on {helper_path}: {exc.strerror or exc}.") from exc
    level = LogLevelController(str(cfg.log_levels.user_daemon))
    daemon = Daemon(
        listener=listener,
        socket_path=socket_path,
        pid_path=pid_path,
        log_file=log_file,
        log_level=level,
        max_message_size=cfg.rpc.max_message_size,
    )
    try:
        _write_pid_file(pid_path)
        _hand_over(pid_path, paths.daemon_lock())
        await leftovers.at_start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, nursery.cancel_scope, daemon)
            await nursery.start(level.serve)
            await nursery.start(daemon.run_sessions)
            await nursery.start(daemon.serve)
            await nursery.start(serve_helper_socket, helper_listener, daemon.attach_helper)
            log.info("listening on %s", socket_path)
            gctune.settle()  # start-up's modules and objects out of every full collection
            ready.report(f"ready {os.getpid()}")
            if not ready.spawned:
                print(f"tele daemon: listening on {socket_path}; log: {log_file}", file=sys.stderr)
            await daemon.quit_requested.wait()
            with trio.move_on_after(QUIT_GRACE):
                await daemon.connections_closed()
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(CLEANUP_TIMEOUT) as cleanup:
            cleanup.shield = True
            await daemon.stop_listening()
            helper_listener.close()
            helper_path.unlink(missing_ok=True)
        if cleanup.cancelled_caught:
            log.error("cleanup did not finish within %gs", CLEANUP_TIMEOUT)


async def _stop_on_signals(scope: trio.CancelScope, daemon: Daemon) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s; stopping", signal.Signals(signum).name)
            # End the cluster session while its link is up (the manager forgets us at once).
            with trio.move_on_after(CLEANUP_TIMEOUT):
                await daemon.end_session()
            scope.cancel()
            return
