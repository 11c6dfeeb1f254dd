"""Which Docker Engine to talk to, found as the docker CLI finds it, and a client for it.

The docker CLI's order (cli/command/cli.go `resolveContextName`): `DOCKER_HOST` (the default
context, pointed there), then `DOCKER_CONTEXT`, then `currentContext` of the CLI's config file
(`$DOCKER_CONFIG/config.json`, default `~/.docker/config.json`), else the default socket. A named
context's endpoint is in `$DOCKER_CONFIG/contexts/meta/<sha256 of its name>/meta.json`, its TLS
files in `contexts/tls/<same>/docker/`. The Engine API is spoken by docker-py (`docker`), which
is synchronous: trio code calls it through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tele.errors import ConnectionFailed, UserError

if TYPE_CHECKING:
    import docker

DEFAULT_HOST = "unix:///var/run/docker.sock"
MAX_CONFIG_BYTES = 1 << 20
"""The CLI's config and a context's meta.json are read only up to this size (a file that large
is not the CLI's)."""


@dataclass(frozen=True)
class Engine:
    """Where the engine is (`host`, as DOCKER_HOST spells it) and why there (`source`, for the
    sentence that says it does not answer)."""

    host: str
    source: str
    tls_dir: Path | None = None
    """A directory with ca.pem, cert.pem, key.pem (a context's, or DOCKER_CERT_PATH)."""
    tls_verify: bool = False


def config_dir(environ: Mapping[str, str]) -> Path:
    if environ.get("DOCKER_CONFIG"):
        return Path(environ["DOCKER_CONFIG"])
    return Path(environ.get("HOME") or Path.home()) / ".docker"


def _read_json(path: Path) -> object:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; it is not docker's.")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}.") from exc


def find(environ: Mapping[str, str] | None = None) -> Engine:
    """The engine the docker CLI would use with this environment (no flags)."""
    env = os.environ if environ is None else environ
    if env.get("DOCKER_HOST"):
        cert_path = env.get("DOCKER_CERT_PATH")
        verify = env.get("DOCKER_TLS_VERIFY", "") not in ("", "0")
        tls_dir = Path(cert_path) if cert_path else (config_dir(env) if verify else None)
        return Engine(env["DOCKER_HOST"], "DOCKER_HOST", tls_dir, verify)
    where = config_dir(env)
    if env.get("DOCKER_CONTEXT"):
        name, source = env["DOCKER_CONTEXT"], "DOCKER_CONTEXT"
    else:
        config = _read_json(where / "config.json")
        current = config.get("currentContext") if isinstance(config, dict) else None
        name = current if isinstance(current, str) else ""
        source = f"the current context of {where / 'config.json'}"
    if name in ("", "default"):
        return Engine(DEFAULT_HOST, "the default")
    return _context(where, name, source)


def _context(where: Path, name: str, source: str) -> Engine:
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta_path = where / "contexts" / "meta" / digest / "meta.json"
    meta = _read_json(meta_path)
    if meta is None:
        raise UserError(
            f"The docker context {name!r} ({source}) does not exist: `docker context ls` lists "
            "them."
        )
    endpoints = meta.get("Endpoints") if isinstance(meta, dict) else None
    endpoint = endpoints.get("docker") if isinstance(endpoints, dict) else None
    host = endpoint.get("Host") if isinstance(endpoint, dict) else None
    if not isinstance(host, str) or not host:
        raise UserError(f"The docker context {name!r} names no Docker endpoint ({meta_path}).")
    assert isinstance(endpoint, dict)
    tls_dir = where / "contexts" / "tls" / digest / "docker"
    has_tls = (tls_dir / "ca.pem").is_file() or (tls_dir / "cert.pem").is_file()
    return Engine(
        host,
        f"docker context {name!r}",
        tls_dir if has_tls else None,
        has_tls and not endpoint.get("SkipTLSVerify", False),
    )


def connect(engine: Engine | None = None, *, timeout: float = 60) -> docker.DockerClient:
    """A client for `engine` (default: `find()`) that has answered a ping; ConnectionFailed
    with one sentence naming the engine and why when none answers."""
    import docker.errors
    import docker.tls
    import requests.exceptions

    import docker

    engine = engine or find()
    tls: docker.tls.TLSConfig | bool = False
    if engine.tls_dir is not None:
        certs = (str(engine.tls_dir / "cert.pem"), str(engine.tls_dir / "key.pem"))
        ca = engine.tls_dir / "ca.pem"
        tls = docker.tls.TLSConfig(
            client_cert=certs if Path(certs[0]).is_file() else None,
            ca_cert=str(ca) if ca.is_file() else None,
            verify=engine.tls_verify,
        )
    client: docker.DockerClient | None = None
    try:
        if engine.host.startswith("unix://"):
            _probe_unix(engine.host.removeprefix("unix://"))
        client = docker.DockerClient(
            base_url=engine.host,
            tls=tls,
            timeout=int(timeout),
            use_ssh_client=engine.host.startswith("ssh://"),
        )
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        if client is not None:
            client.close()
        raise ConnectionFailed(
            f"No Docker engine answers at {engine.host} ({engine.source}): {_reason(exc)}; "
            "start one, or point DOCKER_HOST or `docker context use` at one."
        ) from exc
    return client


def _probe_unix(path: str) -> None:
    """Connect once to the engine's unix socket: docker-py leaks its socket when this fails
    (docker/transport/unixconn.py never closes it), so the common failure is found here."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(10)
        probe.connect(path)


def _reason(exc: BaseException) -> str:
    """The innermost cause in a few words (requests wraps the OS's error several times)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        inner = exc.__cause__ or exc.__context__
        assert inner is not None
        exc = inner
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
