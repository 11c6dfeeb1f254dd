"""Registry credentials as every container tool stores them: docker's `config.json`.

`auths.<registry>.auth` is base64("user:password"); `username`/`password` and `identitytoken`
are read as well. The same JSON is what a `kubernetes.io/dockerconfigjson` pull secret holds.
For a config file of the user's own, credential helpers (`credHelpers.<registry>`, else
`credsStore`: `docker-credential-<name> get`) are asked first, as docker does; a pull secret's
JSON never runs a program.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from .. import paths
from ..jsonlimits import check_depth
from .errors import InvalidDockerConfig
from .reference import DOCKER_HUB

MAX_CONFIG_FILE_BYTES = 1024 * 1024
"""A config.json or pull secret holds a few credentials; more is a mistake or an attack."""

_HUB_ALIASES = (DOCKER_HUB, "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str | None = field(default=None, repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


class _Entry(msgspec.Struct):
    auth: str | None = None
    username: str | None = None
    password: str | None = None
    identitytoken: str | None = None


class _DockerConfig(msgspec.Struct):
    auths: dict[str, _Entry] = {}
    credsStore: str | None = None
    credHelpers: dict[str, str] = {}


class _HelperAnswer(msgspec.Struct):
    Username: str = ""
    Secret: str = ""


_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_HELPER_OUTPUT = 64 * 1024
HELPER_TIMEOUT = 30.0


def _from_helper(helper: str, registry: str, where: str) -> Credentials | None:
    """`docker-credential-<helper> get` for the registry; None when it has nothing for it."""
    if not _HELPER_NAME.fullmatch(helper):
        raise InvalidDockerConfig(f"{where}: {helper!r} is not a credential helper name.")
    program = f"docker-credential-{helper}"
    server = "https://index.docker.io/v1/" if registry in _HUB_ALIASES else registry
    try:
        result = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise InvalidDockerConfig(
            f"{where} names the credential helper {helper!r}, but {program} is not installed."
        ) from None
    except subprocess.TimeoutExpired:
        raise InvalidDockerConfig(
            f"The credential helper {program} did not answer within {HELPER_TIMEOUT:.0f} s."
        ) from None
    if result.returncode != 0:
        return None  # "credentials not found in native keychain": anonymous, as docker does
    try:
        answer = msgspec.json.decode(result.stdout[:MAX_HELPER_OUTPUT], type=_HelperAnswer)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidDockerConfig(f"The credential helper {program} answered garbage.") from None
    if not answer.Secret:
        return None
    if answer.Username == "<token>":
        return Credentials("", "", answer.Secret)
    return Credentials(answer.Username, answer.Secret)


def docker_config_path() -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`."""
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else paths.home() / ".docker") / "config.json"


def _host_of(key: str) -> str:
    """`https://index.docker.io/v1/` → `index.docker.io`; `host:5000` stays."""
    host = key.strip()
    for prefix in ("https://", "http://"):
        if host.startswith(prefix):
            host = host[len(prefix) :]
    return host.split("/", 1)[0].lower()


def _matches(key: str, registry: str) -> bool:
    host = _host_of(key)
    registry = registry.lower()
    if registry in _HUB_ALIASES:
        return host in _HUB_ALIASES
    return host == registry


def credentials_from_docker_config(
    source: bytes | str | Path | None, registry: str
) -> Credentials | None:
    """The credentials for `registry` in a docker config (bytes, or a path; None: the default).

    Returns None when the file does not exist or has no entry for the registry; raises
    `InvalidDockerConfig` (one sentence) when the JSON or an entry is malformed.
    """
    where = "the docker config"
    own_file = source is None or isinstance(source, (str, Path))
    if source is None or isinstance(source, (str, Path)):
        path = Path(source) if source is not None else docker_config_path()
        where = str(path)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_CONFIG_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InvalidDockerConfig(f"Cannot read {where}: {exc.strerror}.") from None
    else:
        data = bytes(source)
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise InvalidDockerConfig(f"{where} is larger than {MAX_CONFIG_FILE_BYTES} bytes.")
    try:
        check_depth(data)
        config = msgspec.json.decode(data, type=_DockerConfig)
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise InvalidDockerConfig(f"{where} is not a valid docker config: {exc}.") from None
    if own_file:
        helper = next(
            (h for key, h in sorted(config.credHelpers.items()) if _matches(key, registry)),
            config.credsStore,
        )
        if helper:
            found = _from_helper(helper, registry, where)
            if found is not None:
                return found
    for key, entry in sorted(config.auths.items()):
        if not _matches(key, registry):
            continue
        if entry.identitytoken:
            return Credentials(entry.username or "", "", entry.identitytoken)
        if entry.auth:
            try:
                decoded = base64.b64decode(entry.auth, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidDockerConfig(
                    f"{where}: the auth of {key!r} is not base64 of user:password."
                ) from None
            user, sep, password = decoded.partition(":")
            if not sep:
                raise InvalidDockerConfig(
                    f"{where}: the auth of {key!r} is not base64 of user:password."
                )
            return Credentials(user, password)
        if entry.username is not None:
            return Credentials(entry.username, entry.password or "")
    return None


def docker_config_json(registry: str, credentials: Credentials) -> bytes:
    """A config.json (and `.dockerconfigjson`) holding one registry's credentials."""
    auth = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    entry = {"auth": auth, "username": credentials.username, "password": credentials.password}
    return msgspec.json.encode({"auths": {registry: entry}})
