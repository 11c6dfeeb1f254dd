"""A handler container on a real (private) Docker Engine: the pod's environment (a value with a
line break too), its volumes at the pod's paths, the host's network, the exit status passed
on, and nothing left behind; --docker-build's image; the docker run arguments' parsing."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tele.docker import engine, run
from tele.errors import UserError
from tests.daemon.util import run_tele, single_error_line
from tests.docker.dockerd import PrivateDockerd, busybox_image


@pytest.fixture(scope="module")
def busybox(dockerd: PrivateDockerd) -> str:
    return busybox_image(dockerd)


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server on this machine's loopback that keeps what each connection sent."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(10)
                chunks = []
                while chunk := connection.recv(4096):
                    chunks.append(chunk)
                received.append(b"".join(chunks))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], received
    finally:
        server.close()
        thread.join(5)


def _client(dockerd: PrivateDockerd):  # type: ignore[no-untyped-def]
    return engine.connect(dockerd.engine)


def test_the_container_gets_the_pods_environment_volumes_and_the_hosts_network(
    dockerd: PrivateDockerd,
    busybox: str,
    listener: tuple[int, list[bytes]],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    port, received = listener
    mounted = tmp_path / "mnt"
    (mounted / "etc" / "creds").mkdir(parents=True)
    (mounted / "etc" / "creds" / "password").write_text("s3cr3t\n")
    environment = {
        "GREETING": "hello there",
        "TWO_LINES": "first\nsecond",
        "DOCKER_CERT_PATH": "/evil\n",  # would steer the docker CLI: left out
        "TELEPRESENCE_MOUNTS": "/etc/creds",
        "TELEPRESENCE_ROOT": str(mounted),
    }
    script = (
        'echo "greeting=$GREETING"; echo "two=$TWO_LINES"; echo "root=$TELEPRESENCE_ROOT"; '
        'echo "cert=${DOCKER_CERT_PATH:-unset}"; echo "pw=$(cat /etc/creds/password)"; '
        f"echo from-the-container | nc 127.0.0.1 {port}; exit 7"
    )
    wanted = run.DockerRun(("--rm=false", busybox, "sh", "-c", script))
    prepared = run.prepare(
        wanted,
        image=busybox,
        environment=environment,
        local_mount=str(mounted),
        network="host",
        engagement="echo",
        found=dockerd.engine,
    )
    assert prepared.notes == ["DOCKER_CERT_PATH"]
    assert "s3cr3t" not in " ".join(prepared.argv) and "hello there" not in prepared.argv
    client = _client(dockerd)
    try:
        assert run.run(prepared, client) == 7
        out = capfd.readouterr().out
        assert "greeting=hello there\n" in out
        assert "two=first\nsecond\n" in out
        assert "root=/\n" in out
        assert "cert=unset\n" in out
        assert "pw=s3cr3t\n" in out
        assert received == [b"from-the-container\n"]
        # Removed, with its env file.
        assert client.containers.list(all=True, filters={"label": run.LABEL}) == []
        # The pod's variables went through a pipe: no file holds them.
        assert "--env-file" not in prepared.argv and "GREETING=hello there\n" in (
            prepared.env_lines
        )
    finally:
        client.close()


def test_docker_mount_puts_the_volumes_under_a_root_of_its_own(
    dockerd: PrivateDockerd, busybox: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_text("content\n")
    environment = {"TELEPRESENCE_MOUNTS": "/data"}
    script = 'cat "$TELEPRESENCE_ROOT/data/f"; ls /data 2>&1 | head -1'
    wanted = run.DockerRun((busybox, "sh", "-c", script), mount_root="/remote")
    prepared = run.prepare(
        wanted,
        image=busybox,
        environment=environment,
        local_mount=str(tmp_path),
        network="none",
        engagement="x",
        found=dockerd.engine,
    )
    client = _client(dockerd)
    try:
        assert run.run(prepared, client) == 0
    finally:
        client.close()
    out = capfd.readouterr().out
    assert out.startswith("content\n")
    assert "No such file" in out


def test_docker_build_makes_the_image_that_replaces_the_placeholder(
    dockerd: PrivateDockerd, busybox: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile.tele").write_text(f"FROM {busybox}\nARG WORD\nRUN echo $WORD > /word\n")
    wanted = run.DockerRun(
        ("--rm", "IMAGE", "cat", "/word"),
        build=str(tmp_path),
        build_opts=("file=Dockerfile.tele", "build-arg=WORD=built", "tag=tele-test/built:1"),
    )
    lines: list[str] = []
    client = _client(dockerd)
    try:
        resolved = run.resolve_image(wanted, client, lines.append)
        _, image, args = run.split_run_args(resolved.args)
        assert image.startswith("sha256:") and args == ["cat", "/word"]
        assert any("Step" in line for line in lines)
        assert client.images.get("tele-test/built:1").id == image
        with pytest.raises(UserError, match="write IMAGE where the image goes"):
            run.resolve_image(run.DockerRun(("ubuntu",), build=str(tmp_path)), client, print)
        with pytest.raises(UserError, match="KEY=VALUE with KEY one of tag, file"):
            run.build(client, str(tmp_path), ["squash=true"], print)
        (tmp_path / "Dockerfile").write_text("FROM tele-test/none:404\n")
        with pytest.raises(UserError, match=f"docker build {tmp_path} failed"):
            run.build(client, str(tmp_path), [], print)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("args", "flags", "image", "rest"),
    [
        (["ubuntu"], [], "ubuntu", []),
        (["-it", "--rm", "ubuntu", "bash"], ["-it", "--rm"], "ubuntu", ["bash"]),
        (["-e", "A=1", "-p8080:80", "img", "-e"], ["-e", "A=1", "-p8080:80"], "img", ["-e"]),
        (["--name", "x", "--env=B", "-v", "/a:/b", "i"], ["--name", "x", "--env=B", "-v", "/a:/b"],
         "i", []),
        (["-ite", "X=1", "i"], ["-ite", "X=1"], "i", []),
        (["--rm", "--", "i", "a"], ["--rm"], "i", ["a"]),
    ],
)  # fmt: skip
def test_the_image_is_the_first_word_that_is_no_flag_nor_a_flags_value(
    args: list[str], flags: list[str], image: str, rest: list[str]
) -> None:
    assert run.split_run_args(args) == (flags, image, rest)


def test_no_image_or_a_detached_run_is_refused() -> None:
    with pytest.raises(UserError, match="needs an image"):
        run.split_run_args(["--rm", "-e", "A"])
    for flag in ("-d", "-itd", "--detach"):
        with pytest.raises(UserError, match="cannot detach"):
            run.check_flags([flag])


def test_the_cli_says_in_one_sentence_when_no_engine_answers_and_engages_nothing(
    tele_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**tele_env, "DOCKER_HOST": f"unix://{tmp_path}/no.sock"}
    result = run_tele(env, "intercept", "echo", "--docker-run", "--", "busybox")
    assert result.returncode == 3
    line = single_error_line(result)
    assert f"No Docker engine answers at unix://{tmp_path}/no.sock (DOCKER_HOST)" in line
    # No daemon was started for it: nothing was engaged.
    assert not (Path(env["XDG_RUNTIME_DIR"]) / "tele" / "daemon.pid").exists()
    assert single_error_line(run_tele(env, "intercept", "echo", "--docker-run")).endswith(
        "--docker-run -- [FLAGS] IMAGE [ARGS]"
    )
    result = run_tele(env, "replace", "echo", "--docker-mount", "rel", "--docker-run", "--", "i")
    assert "must be an absolute path" in single_error_line(result)
    result = run_tele(env, "ingest", "echo", "--docker-build-opt", "tag=x")
    assert "go with --docker-run" in single_error_line(result)
