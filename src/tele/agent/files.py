"""The agent's file server: each app container's exported volumes, served over SFTP.

The webhook mounts every Remote / RemoteReadOnly volume of app container C into the agent
under /tel_app_mounts/C (tele.contracts.agentconfig); the agent serves each such container on a
port of its own (`serve_files`, one listener per container); a client mounts it with
`sshfs -o passive` through its tunnel (tele.daemon.mounts). There is no SSH: each TCP
connection accepted here gets its own SFTP process (tele.agent.sftp) with the socket as its
stdin and stdout, the protocol's only transport requirement.

Confinement: that process chroots into /tel_app_mounts/C and becomes a non-root user before it
reads a byte (see tele.agent.sftp), so a connection sees that container's exported volumes and
nothing else of the agent: not its token, not /proc, not another container's volumes. It is
read-only when none of C's volumes is Remote, and writes only below the Remote ones otherwise.
Besides, only the traffic manager may connect (it dials the port for the session that engages
the workload; it tells the agent its pod IP on arrival); others are refused at accept.

Why SFTP + sshfs and not pyfuse3 with a protocol of our own: sshfs is a small, long-proven C
program with complete POSIX semantics (symlinks, modes, rename, partial writes), the agent
needs no FUSE device or privilege, and the client mounts any number of engagements from one
daemon (pyfuse3 allows one mount per process).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tele.agent.sftp import DEFAULT_USER
from tele.contracts.agentconfig import AgentConfig
from tele.rpc.agent_api import FILES_CLIENT_NAME

log = logging.getLogger(__name__)

_RETRY_LATER = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
MAX_SESSIONS = 64
"""SFTP connections served at once (each is a process); more wait in the listen backlog."""


@dataclass(frozen=True)
class Export:
    """What one listener serves: a container's export directory, as whom, writable where."""

    root: str
    read_only: bool = True
    writable: tuple[str, ...] = ()
    """Paths inside `root` below which writes are allowed (the Remote mounts)."""
    uid: int = DEFAULT_USER
    gid: int = DEFAULT_USER
    groups: tuple[int, ...] = ()
    tls_dir: str = ""
    """Mutual TLS with the key and certificate there (FileServerKeys); "" plain (tests)."""

    def command(self) -> list[str]:
        """The per-connection SFTP process (tele.agent.sftp)."""
        command = [sys.executable, "-m", "tele.agent.sftp", "--root", self.root]
        command += ["--uid", str(self.uid), "--gid", str(self.gid)]
        command += [arg for g in self.groups for arg in ("--group", str(g))]
        if self.read_only:
            command.append("--read-only")
        command += [arg for w in self.writable for arg in ("--writable", w)]
        if self.tls_dir:
            command += ["--tls-dir", self.tls_dir, "--peer-name", FILES_CLIENT_NAME]
        return command


class FileServerKeys:
    """The file servers' TLS key (made here, never sent) and the certificate the manager
    issues for it on each arrival, in a private directory the SFTP processes read while they
    are still root. No certificate (before arrival, after the session ended): every
    connection is refused, so an agent the manager no longer knows serves no files."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="tele-files-tls-")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        self._write(
            "key.pem",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        self.public_key_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def store(self, cert_pem: str, ca_pem: str) -> None:
        self._write("ca.pem", ca_pem.encode())
        self._write("cert.pem", cert_pem.encode())

    def forget(self) -> None:
        for name in ("cert.pem", "ca.pem"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, name))

    def _write(self, name: str, data: bytes) -> None:
        path = os.path.join(self.directory, name)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)


def exports(config: AgentConfig, *, tls_dir: str = "") -> dict[str, Export]:
    """Per app container with exported volumes, what its file server serves."""
    found = {}
    for container in config.containers:
        if not container.mounts:
            continue
        writable = tuple(
            sorted(p for p, policy in container.mount_policies.items() if policy == "Remote")
        )
        uid, gid, *groups = container.run_as or [0, 0]
        if uid == 0:  # root, or not said: tele's image user, never root
            uid, gid, groups = DEFAULT_USER, DEFAULT_USER, [g for g in groups if g]
        found[container.name] = Export(
            root=container.mount_point,
            read_only=not writable,
            writable=writable,
            uid=uid,
            gid=gid or DEFAULT_USER,
            groups=tuple(groups),
            tls_dir=tls_dir,
        )
    return found


async def serve_files(
    export: Export,
    *,
    host: str = "0.0.0.0",
    port: int = 0,
    allow: Callable[[str], bool] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `export` over SFTP on host:port (0: any free port) until cancelled; reports the
    bound port. `allow(peer IP)` screens each connection (None: everyone)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = int(listeners[0].socket.getsockname()[1])
    command = export.command()
    log.info("serving %s over SFTP on port %d (%s)", export.root, bound, " ".join(command[1:]))
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
    """One SFTP connection: the SFTP process owns the socket; this task owns the process."""
    try:
        try:
            peer = stream.socket.getpeername()
            fd = stream.socket.fileno()
            process = await trio.lowlevel.open_process(
                command, stdin=fd, stdout=fd, stderr=None, start_new_session=True
            )
        except OSError as exc:
            log.warning("cannot start the SFTP process %s: %s", command[0], exc.strerror or exc)
            return
        finally:
            # The child has its own copy of the socket; ours would keep the connection open
            # after the SFTP process exits.
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
