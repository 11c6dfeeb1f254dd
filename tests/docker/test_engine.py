"""Finding the Docker Engine as the docker CLI does (DOCKER_HOST, DOCKER_CONTEXT, the config's
current context, the default) and the one sentence when none answers; then a real engine."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tele.docker import engine
from tele.errors import ConnectionFailed, UserError
from tests.docker.dockerd import private_dockerd


def _context(home: Path, name: str, host: str, *, tls: bool = False) -> None:
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta = home / ".docker" / "contexts" / "meta" / digest
    meta.mkdir(parents=True)
    endpoint = {"Host": host, "SkipTLSVerify": False}
    (meta / "meta.json").write_text(json.dumps({"Name": name, "Endpoints": {"docker": endpoint}}))
    if tls:
        certs = home / ".docker" / "contexts" / "tls" / digest / "docker"
        certs.mkdir(parents=True)
        (certs / "ca.pem").write_text("not used here\n")


def test_docker_host_wins_over_every_context(tmp_path: Path) -> None:
    _context(tmp_path, "remote", "tcp://192.0.2.9:2376")
    (tmp_path / ".docker" / "config.json").write_text('{"currentContext": "remote"}')
    env = {"HOME": str(tmp_path), "DOCKER_HOST": "unix:///x.sock", "DOCKER_CONTEXT": "remote"}
    assert engine.find(env) == engine.Engine("unix:///x.sock", "DOCKER_HOST")


def test_the_current_context_of_the_config_file_names_the_endpoint(tmp_path: Path) -> None:
    _context(tmp_path, "remote", "tcp://192.0.2.9:2376", tls=True)
    (tmp_path / ".docker" / "config.json").write_text('{"currentContext": "remote"}')
    found = engine.find({"HOME": str(tmp_path)})
    assert found.host == "tcp://192.0.2.9:2376"
    assert found.source == "docker context 'remote'"
    assert found.tls_dir is not None and found.tls_verify
    # DOCKER_CONTEXT overrides the file's choice; "default" is the default socket.
    assert engine.find({"HOME": str(tmp_path), "DOCKER_CONTEXT": "default"}).host == (
        engine.DEFAULT_HOST
    )


def test_docker_config_moves_the_config_directory(tmp_path: Path) -> None:
    _context(tmp_path, "elsewhere", "unix:///run/other.sock")
    (tmp_path / ".docker" / "config.json").write_text('{"currentContext": "elsewhere"}')
    env = {"HOME": "/nonexistent", "DOCKER_CONFIG": str(tmp_path / ".docker")}
    assert engine.find(env).host == "unix:///run/other.sock"


def test_no_config_is_the_default_socket(tmp_path: Path) -> None:
    assert engine.find({"HOME": str(tmp_path)}) == engine.Engine(engine.DEFAULT_HOST, "the default")


def test_a_missing_or_broken_context_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"context 'gone' \(DOCKER_CONTEXT\) does not exist"):
        engine.find({"HOME": str(tmp_path), "DOCKER_CONTEXT": "gone"})
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json is not valid JSON"):
        engine.find({"HOME": str(tmp_path)})
    (tmp_path / ".docker" / "config.json").write_bytes(b" " * (engine.MAX_CONFIG_BYTES + 1))
    with pytest.raises(UserError, match="larger than"):
        engine.find({"HOME": str(tmp_path)})


def test_no_engine_answering_is_one_sentence_naming_where(tmp_path: Path) -> None:
    where = engine.Engine(f"unix://{tmp_path}/none.sock", "DOCKER_HOST")
    with pytest.raises(ConnectionFailed) as caught:
        engine.connect(where, timeout=5)
    message = str(caught.value)
    assert message.startswith(f"No Docker engine answers at unix://{tmp_path}/none.sock")
    assert "(DOCKER_HOST)" in message and "no such file or directory" in message
    assert "\n" not in message


def _host_network() -> list[bytes]:
    """The host's routes (all tables), firewall (nftables, which iptables-nft writes to) and
    links, as text."""
    commands = (["ip", "route", "show", "table", "all"], ["ip", "-6", "route", "show", "table",
        "all"], ["nft", "list", "ruleset"], ["ip", "-o", "link"])  # fmt: skip
    return [subprocess.run(c, capture_output=True, check=True).stdout for c in commands]


def test_the_private_engine_answers_and_leaves_the_hosts_network_as_it_was() -> None:
    before = _host_network()
    with private_dockerd() as dockerd:
        client = engine.connect(engine.find(dockerd.env({})))
        try:
            assert client.info()["DockerRootDir"] == str(dockerd.root / "data")
            assert client.info()["ContainersRunning"] == 0
        finally:
            client.close()
        assert _host_network() == before
        root = dockerd.root
    assert _host_network() == before
    assert not root.exists()
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(root) in line]  # fmt: skip
