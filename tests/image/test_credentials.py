from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tele.image.credentials import (
    Credentials,
    credentials_from_docker_config,
    docker_config_json,
)
from tele.image.errors import InvalidDockerConfig


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_auth_entries_are_found_by_host_in_every_spelling() -> None:
    config = json.dumps(
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": _auth("hub", "p1")},
                "reg.example:5000": {"auth": _auth("me", "p:with:colons")},
                "https://other.example/v2/": {"username": "u", "password": "p"},
                "tokens.example": {"identitytoken": "refresh"},
            }
        }
    ).encode()
    assert credentials_from_docker_config(config, "docker.io") == Credentials("hub", "p1")
    assert credentials_from_docker_config(config, "reg.example:5000") == Credentials(
        "me", "p:with:colons"
    )
    assert credentials_from_docker_config(config, "other.example") == Credentials("u", "p")
    assert credentials_from_docker_config(config, "tokens.example") == Credentials(
        "", "", "refresh"
    )
    assert credentials_from_docker_config(config, "nowhere.example") is None


def test_docker_config_env_and_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert credentials_from_docker_config(None, "r.example") is None
    (tmp_path / "config.json").write_bytes(docker_config_json("r.example", Credentials("a", "b")))
    assert credentials_from_docker_config(None, "r.example") == Credentials("a", "b")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"auths": {"r.example": {"auth": "!!!"}}}',
        b'{"auths": {"r.example": {"auth": "' + base64.b64encode(b"nocolon") + b'"}}}',
        b'{"auths": []}',
        b'{"x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b" " * (2 * 1024 * 1024),
    ],
)
def test_malformed_configs_raise_one_sentence(body: bytes) -> None:
    with pytest.raises(InvalidDockerConfig) as info:
        credentials_from_docker_config(body, "r.example")
    assert "\n" not in str(info.value)


def test_repr_hides_the_password() -> None:
    assert "secret" not in repr(Credentials("u", "secret", "secret"))


def test_credential_helpers_of_the_users_own_config_are_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    helper = tmp_path / "bin" / "docker-credential-tele-test"
    helper.parent.mkdir()
    helper.write_text(
        "#!/bin/sh\nread server\n"
        'if [ "$server" = reg.example ]; then echo \'{"Username":"h","Secret":"s"}\'; exit 0; fi\n'
        'echo "credentials not found in native keychain"; exit 1\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:/usr/bin:/bin")
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"credsStore": "tele-test", "auths": {"other.example": {"auth": _auth("a", "b")}}}
        )
    )
    assert credentials_from_docker_config(config, "reg.example") == Credentials("h", "s")
    # The helper has nothing: the file's own entry, or anonymous.
    assert credentials_from_docker_config(config, "other.example") == Credentials("a", "b")
    assert credentials_from_docker_config(config, "none.example") is None
    # A pull secret's JSON (bytes) never runs a program.
    assert credentials_from_docker_config(config.read_bytes(), "reg.example") is None
    config.write_text(json.dumps({"credHelpers": {"reg.example": "missing-helper"}}))
    with pytest.raises(InvalidDockerConfig, match="docker-credential-missing-helper is not"):
        credentials_from_docker_config(config, "reg.example")
    config.write_text(json.dumps({"credsStore": "../../bin/sh"}))
    with pytest.raises(InvalidDockerConfig, match="not a credential helper name"):
        credentials_from_docker_config(config, "reg.example")
