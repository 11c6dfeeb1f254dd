"""The agent's file server: the app containers' exported volumes, served over SFTP.

The webhook mounts every Remote / RemoteReadOnly volume of app container C into the agent
under /tel_app_mounts/C (tele.contracts.agentconfig); a client mounts that directory with
`sshfs -o directport=PORT` through its tunnel (tele.daemon.mounts). There is no SSH: each TCP
connection accepted here gets its own OpenSSH `sftp-server` process with the socket as its
stdin and stdout, the protocol's only transport requirement.

Why sftp-server + sshfs and not pyfuse3 with a protocol of our own: both ends are small,
long-proven C programs with complete POSIX semantics (symlinks, modes, rename, partial writes),
the bytes never pass through Python on either side, the agent needs no FUSE device or
privilege, and the client mounts any number of engagements from one daemon (pyfuse3 allows one
mount per process). RemoteReadOnly is enforced by the pod's kernel (a read-only bind mount in
the agent), `read_only` below makes the whole export read-only (`sftp-server -R`).

Exposure: sftp-server has no chroot, so a connection sees the agent container's filesystem as
the agent's user does, not only /tel_app_mounts. So only the traffic manager may connect (it
dials the port for clients it has admitted; it tells the agent its pod IP on arrival); others
in the pod network are refused at accept.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from typing import NoReturn

import trio

log = logging.getLogger(__name__)

SFTP_SERVER_ENV = "_TEL_AGENT_SFTP_SERVER"
"""Path of the sftp-server program, when it is not in one of the usual places."""
SFTP_SERVER_PATHS = (
    "/usr/lib/openssh/sftp-server",  # Debian, Ubuntu
    "/usr/libexec/openssh/sftp-server",  # Fedora, RHEL
    "/usr/lib/ssh/sftp-server",  # Arch, Alpine
    "/usr/libexec/sftp-server",
)
_RETRY_LATER = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
MAX_SESSIONS = 64
"""SFTP connections served at once (each is a process); more wait in the listen backlog."""


def find_sftp_server(environ: dict[str, str] | None = None) -> str | None:
    """The sftp-server program to run, or None when this image has none."""
    environ = dict(os.environ if environ is None else environ)
    candidates = [environ.get(SFTP_SERVER_ENV, ""), *SFTP_SERVER_PATHS]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("sftp-server")


async def serve_files(
    *,
    root: str = "/",
    host: str = "0.0.0.0",
    port: int = 0,
    read_only: bool = False,
    program: str | None = None,
    allow: Callable[[str], bool] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve SFTP on host:port (0: any free port) until cancelled; reports the bound port, or
    0 (and returns) when no sftp-server is installed: the agent then exports no volumes.
    `allow(peer IP)` screens each connection (None: everyone)."""
    program = program or find_sftp_server()
    if program is None:
        log.warning(
            "no sftp-server in this image (install openssh-sftp-server): volumes are not exported"
        )
        task_status.started(0)
        return
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = int(listeners[0].socket.getsockname()[1])
    command = [program, "-e", "-d", root, *(["-R"] if read_only else [])]
    log.info("serving volumes over SFTP on port %d (%s)", bound, " ".join(command))
    try:
        task_status.started(bound)
        await _accept(listeners, command, allow)
    finally:
        for listener in listeners:
            listener.socket.close()


async def _accept(
    listeners: list[trio.SocketListener],
    command: list[str],
    allow: Callable[[str], bool] | None,
) -> NoReturn:
    sessions = trio.Semaphore(MAX_SESSIONS)
    async with trio.open_nursery() as nursery:
        while True:
            await sessions.acquire()
            try:
                stream = await listeners[0].accept()
                try:
                    peer = str(stream.socket.getpeername()[0])
                except OSError:
                    stream.socket.close()
                    raise
            except OSError as exc:
                # Out of descriptors or memory for now, or a peer gone before we looked: the
                # file server (and the agent with it) keeps going.
                sessions.release()
                log.warning("SFTP accept: %s", exc.strerror or exc)
                if exc.errno in _RETRY_LATER:
                    await trio.sleep(0.1)
                continue
            except BaseException:
                sessions.release()
                raise
            if allow is not None and not allow(peer):
                log.warning("refused an SFTP connection from %s (not the traffic manager)", peer)
                stream.socket.close()
                sessions.release()
                continue
            nursery.start_soon(_session, stream, command, sessions)


async def _session(stream: trio.SocketStream, command: list[str], sessions: trio.Semaphore) -> None:
    """One SFTP connection: sftp-server owns the socket; this task owns the process."""
    try:
        try:
            peer = stream.socket.getpeername()
            fd = stream.socket.fileno()
            process = await trio.lowlevel.open_process(
                command, stdin=fd, stdout=fd, stderr=None, start_new_session=True
            )
        except OSError as exc:
            log.warning("cannot start %s: %s", command[0], exc.strerror or exc)
            return
        finally:
            # The child has its own copy of the socket; ours would keep the connection open
            # after sftp-server exits.
            stream.socket.close()
        log.debug("SFTP session for %s started (pid %d)", peer, process.pid)
        try:
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
        log.debug("SFTP session for %s ended (%s)", peer, process.returncode)
    finally:
        sessions.release()
