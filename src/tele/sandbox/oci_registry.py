"""The sandbox's image registry: Debian's `docker-registry` (CNCF Distribution) as a child process.

It serves HTTPS with a certificate from the sandbox CA and basic auth from an htpasswd file
(bcrypt, the only hash Distribution accepts, made with pyca's `bcrypt`); its storage is a
directory of the sandbox's own. `serve_registry` reports a `RegistryInfo` once `/v2/` answers.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..certs import CertificateAuthority
from ..errors import TeleError
from ..image.credentials import Credentials, docker_config_json

log = logging.getLogger(__name__)

REGISTRY_BINARY = "docker-registry"
"""Debian's package `docker-registry` (Distribution 2.8); `registry` in other distributions."""
REGISTRY_USER = "tele"
_LISTENING = re.compile(rb"listening on (\S+?):(\d+)\b")
_START_TIMEOUT = 20.0


class RegistryMissing(TeleError):
    """The registry program is not installed."""


@dataclass(frozen=True)
class RegistryInfo:
    """Where the sandbox registry listens and how to use it (shown by `tele sandbox status`)."""

    host: str
    port: int
    username: str
    password: str
    ca_file: Path
    data_dir: Path

    @property
    def address(self) -> str:
        """`host:port`, the registry part of an image reference."""
        return f"{self.host}:{self.port}"

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.username, self.password)

    def docker_config(self) -> bytes:
        """A docker `config.json` (or a pull secret's `.dockerconfigjson`) for this registry."""
        return docker_config_json(self.address, self.credentials)

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "username": self.username,
            "password": self.password,
            "ca_file": str(self.ca_file),
            "data_dir": str(self.data_dir),
        }


def find_binary() -> str:
    for name in (REGISTRY_BINARY, "registry"):
        path = shutil.which(name) or (
            f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None
        )
        if path:
            return path
    raise RegistryMissing(
        "The sandbox registry needs Debian's docker-registry package: apt-get install "
        "docker-registry."
    )


def _htpasswd_line(username: str, password: str) -> bytes:
    import bcrypt

    # The registry checks the hash on every request: the fewest rounds keep a push of dozens of
    # requests fast, and the password is 144 random bits, so the hash's cost protects nothing.
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
    return username.encode() + b":" + hashed + b"\n"


def _config(directory: Path, host: str, port: int, secret: str) -> str:
    # JSON is YAML: no YAML writer needed, and every path is quoted correctly.
    import json

    return json.dumps(
        {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}, "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(directory / "data")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{host}:{port}",
                "secret": secret,
                "tls": {
                    "certificate": str(directory / "server" / "tls.crt"),
                    "key": str(directory / "server" / "tls.key"),
                },
            },
            "auth": {"htpasswd": {"realm": "tele-sandbox", "path": str(directory / "htpasswd")}},
        },
        indent=1,
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def prepare(
    directory: Path, ca: CertificateAuthority, *, host: str = "127.0.0.1", port: int = 0
) -> tuple[Path, str]:
    """Write config, certificate, htpasswd (a password kept across restarts) into `directory`.

    Returns the config file and the password.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    (directory / "data").mkdir(exist_ok=True)
    password_file = directory / "password"
    if password_file.exists():
        password = password_file.read_text().strip()
    else:
        password = secrets.token_urlsafe(18)
        _write_private(password_file, password.encode())
    pair = ca.issue("tele-sandbox-registry", [host, "localhost", "127.0.0.1", "::1"])
    # The CA alone in its directory: `skopeo --cert-dir` / docker's certs.d take a directory
    # and would read a key beside it as a client certificate.
    for sub in ("server", "ca"):
        (directory / sub).mkdir(mode=0o700 if sub == "server" else 0o755, exist_ok=True)
    (directory / "server" / "tls.crt").write_bytes(pair.cert_pem)
    _write_private(directory / "server" / "tls.key", pair.key_pem)
    (directory / "ca" / "ca.crt").write_bytes(ca.cert_pem)
    _write_private(directory / "htpasswd", _htpasswd_line(REGISTRY_USER, password))
    config = directory / "config.yml"
    _write_private(config, _config(directory, host, port, secrets.token_hex(16)).encode())
    return config, password


async def serve_registry(
    directory: Path,
    ca: CertificateAuthority,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[RegistryInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the registry until cancelled; report its `RegistryInfo` once it listens.

    Its log goes to `directory/registry.log`. The storage stays (the caller removes the
    directory when the sandbox goes away), so pushed images survive a restart.
    """
    binary = find_binary()
    config, password = await trio.to_thread.run_sync(
        lambda: prepare(directory, ca, host=host, port=port)
    )
    log_path = directory / "registry.log"
    stop_leftover(directory)
    process = await trio.lowlevel.open_process(
        [binary, "serve", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    (directory / PID_FILE).write_text(str(process.pid))
    try:
        assert process.stderr is not None
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(_START_TIMEOUT) as scope:
                bound = await _wait_listening(process.stderr, log_path)
            if scope.cancelled_caught or bound is None:
                raise TeleError(f"The sandbox registry did not start; see {log_path}.")
            nursery.start_soon(_copy_log, process.stderr, log_path)
            info = RegistryInfo(
                bound[0], bound[1], REGISTRY_USER, password, directory / "ca" / "ca.crt", directory
            )
            log.info("sandbox registry listening on %s", info.address)
            task_status.started(info)
            await process.wait()
            raise TeleError(
                f"The sandbox registry exited with status {process.returncode}; see {log_path}."
            )
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            (directory / PID_FILE).unlink(missing_ok=True)


async def _wait_listening(stderr: trio.abc.ReceiveStream, log_path: Path) -> tuple[str, int] | None:
    seen = bytearray()
    async with await trio.open_file(log_path, "wb") as out:
        while True:
            chunk = await stderr.receive_some(65536)
            if not chunk:
                return None
            await out.write(chunk)
            seen += chunk
            match = _LISTENING.search(seen)
            if match:
                host = match.group(1).decode().strip("[]")
                return host, int(match.group(2))
            del seen[: max(0, len(seen) - 4096)]


_MAX_LOG = 8 * 1024 * 1024
"""The registry logs a line per request; the log is truncated when it grows past this."""


async def _copy_log(stderr: trio.abc.ReceiveStream, log_path: Path) -> None:
    async with await trio.open_file(log_path, "ab") as out:
        size = (await trio.Path(log_path).stat()).st_size
        while chunk := await stderr.receive_some(65536):
            if size > _MAX_LOG:
                await out.truncate(0)
                await out.seek(0)
                size = 0
            await out.write(chunk)
            await out.flush()
            size += len(chunk)


PID_FILE = "registry.pid"


def stop_leftover(directory: Path) -> bool:
    """End the registry of `directory` left running by a sandbox that died (SIGKILL, a crash):
    the pid file names it, its command line must name this directory's config. True if one ran.
    """
    try:
        pid = int((directory / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    if str(directory / "config.yml").encode() not in cmdline:
        return False  # the pid was reused by another process
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return False
    log.info("stopped the registry (pid %d) a previous sandbox left running", pid)
    return True


def registry_available() -> str | None:
    """None when the registry program is installed, else what is missing (for a test's skip)."""
    try:
        find_binary()
    except RegistryMissing:
        return "docker-registry (apt-get install docker-registry)"
    return None


@asynccontextmanager
async def open_registry(
    directory: Path, ca: CertificateAuthority | None = None
) -> AsyncIterator[RegistryInfo]:
    """A registry on 127.0.0.1 (random port) for the body of the `async with`; its directory
    (storage included) is removed afterwards. For tests and tools."""
    ca = ca or CertificateAuthority.create("tele-registry-ca")
    try:
        async with trio.open_nursery() as nursery:
            info: RegistryInfo = await nursery.start(serve_registry, directory, ca)
            try:
                yield info
            finally:
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
