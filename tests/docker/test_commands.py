"""`tele docker-run` and `tele curl` on a private Docker Engine, connected to the sandbox API
server and a traffic manager process: the container has the connection's network (here, the
daemon runs on this machine: the host's), its status is tele's, and it is removed."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tele.docker import run
from tele.sandbox.testing import ThreadedCluster
from tests.conftest import VENV_BIN
from tests.daemon.test_connect import ManagerProcess, cluster, manager  # noqa: F401 - fixtures
from tests.daemon.util import DaemonGuard, run_tele
from tests.docker.dockerd import PrivateDockerd, busybox_image
from tests.e2e import laptop_http


@pytest.fixture
def web() -> Iterator[int]:
    """An HTTP server on this machine's loopback that says which path it was asked for."""
    with laptop_http(lambda path: f"asked for {path}\n") as port:
        yield port


def test_docker_run_and_curl_run_with_the_connections_network_and_are_removed(
    dockerd: PrivateDockerd,
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],  # noqa: F811
    manager: ManagerProcess,  # noqa: F811
    web: int,
    tmp_path: Path,
) -> None:
    base = busybox_image(dockerd)
    # curlimages/curl is not reachable here: a stand-in of the same name answers as curl would.
    (tmp_path / "Dockerfile").write_text(f'FROM {base}\nENTRYPOINT ["wget", "-qO-"]\n')
    built = dockerd.docker("build", "-t", "curlimages/curl:latest", str(tmp_path))
    assert built.returncode == 0, built.stderr
    env = dockerd.env(tele_env)
    connected = run_tele(
        env,
        "connect",
        "--no-vif",
        "--kubeconfig",
        str(cluster[1]),
        "--manager-address",
        f"127.0.0.1:{manager.port}",
        timeout=60,
    )
    assert connected.returncode == 0, connected.stderr

    ran = run_tele(
        env,
        "docker-run",
        "--",
        "--rm",
        base,
        "sh",
        "-c",
        f"wget -qO- http://127.0.0.1:{web}/from-docker-run; exit 3",
        timeout=60,
    )
    assert ran.returncode == 3, ran.stderr
    assert ran.stdout == "asked for /from-docker-run\n"

    curled = run_tele(env, "curl", f"http://127.0.0.1:{web}/from-curl", timeout=60)
    assert curled.returncode == 0, curled.stderr
    assert curled.stdout == "asked for /from-curl\n"

    left = dockerd.docker("ps", "-aq", "--filter", f"label={run.LABEL}")
    assert left.returncode == 0 and left.stdout == ""

    # SIGTERM to tele (a closed terminal, a supervisor) removes the container too.
    running = subprocess.Popen(
        [str(VENV_BIN / "tele"), "docker-run", "--", base, "sh", "-c", "echo up; sleep 120"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert running.stdout is not None
        assert running.stdout.readline() == "up\n"
        running.send_signal(signal.SIGTERM)
        _, err = running.communicate(timeout=60)
        assert running.returncode == 130, err
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
    left = dockerd.docker("ps", "-aq", "--filter", f"label={run.LABEL}")
    assert left.returncode == 0 and left.stdout == ""
    assert run_tele(env, "quit").returncode == 0
