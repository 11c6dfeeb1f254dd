"""Issue 9's other engagements on the sandbox with a node: `tele replace` (the container stops
running in the cluster and comes back after leave; a worker without ports too), `tele ingest`
(env without traffic, `-- cmd` leaves when it exits), a multi-port intercept and `--to-pod`."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.util import DaemonGuard, run_tele, single_error_line
from tests.e2e import (
    HTTP_PORT,
    call,
    caller_pod,
    connect,
    deployment,
    echo_container,
    env_list,
    installed_with,
    kubectl,
    laptop_http,
    manifest,
    service,
    wait_rolled,
)
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

APP_PORT = 18080  # also the --to-pod port on this machine: far from common local services
L4_PORT = 19000  # a UDP (and TCP) echo in a second container, for --to-pod PORT/UDP

APPS = manifest(
    deployment(
        "echo",
        echo_container(
            APP_PORT,
            env={"GREETING": "hello"},
            more_ports=({"name": "alt", "containerPort": 9090},),
        ),
        {"name": "l4", "image": "tele-sandbox/l4-echo", "env": env_list(PORT=str(L4_PORT))},
    ),
    service("echo", HTTP_PORT, {"name": "alt", "port": 9090, "targetPort": "alt"}),
    deployment(
        "worker", {"name": "worker", "image": "tele-sandbox/worker", "env": env_list(QUEUE="jobs")}
    ),
    caller_pod(),
)


def containers_of(sandbox: NodeSandbox, app: str) -> list[str]:
    """The containers of the workload's live pods (terminating ones left out)."""
    pods = json.loads(kubectl(sandbox, "get", "pods", "-l", f"app={app}", "-o", "json"))
    return sorted(
        c["name"]
        for pod in pods["items"]
        if not pod["metadata"].get("deletionTimestamp")
        for c in pod["spec"]["containers"]
    )


@pytest.fixture(scope="module")
def installed(node_sandbox: NodeSandbox) -> Iterator[NodeSandbox]:  # noqa: F811
    """The traffic manager and the apps, once for the module (uninstalled at the end)."""
    with installed_with(node_sandbox, APPS) as sandbox:
        yield sandbox


def test_replace_stops_the_container_and_leave_gives_it_back(
    installed: NodeSandbox, tele_env: dict[str, str], guard: DaemonGuard, tmp_path: Path
) -> None:
    sandbox = installed
    connect(tele_env, sandbox)

    # Bad input first: one sentence, and the pods are left as they were.
    unknown = run_tele(tele_env, "replace", "echo", "--container", "nope", timeout=60)
    assert unknown.returncode == 1
    assert single_error_line(unknown) == "tele: echo has no container named nope (it has echo, l4)."
    several = run_tele(tele_env, "replace", "echo", timeout=60)
    assert single_error_line(several) == (
        "tele: echo has several containers (echo, l4); choose one with --container."
    )
    assert containers_of(sandbox, "echo") == ["echo", "l4"]

    with laptop_http("replaced by the laptop") as port:
        env_file = tmp_path / "echo.env"
        replaced = run_tele(
            tele_env, "replace", "echo", "-c", "echo", "-p", f"{port}:http", "-e", str(env_file),
            timeout=120,
        )  # fmt: skip
        assert replaced.returncode == 0, replaced.stderr
        assert "replaced: it does not run in the cluster" in replaced.stdout
        assert "GREETING=hello" in env_file.read_text()
        wait_rolled(sandbox, "echo")
        assert containers_of(sandbox, "echo") == ["l4", "traffic-agent"]
        assert call(sandbox, "http://echo.default/") == "replaced by the laptop"
        status = run_tele(tele_env, "status").stdout
        assert f"echo: replaced Deployment default/echo -> 127.0.0.1:{port} (tcp)" in status

    # A worker with no ports can be replaced too.
    worker = run_tele(tele_env, "replace", "worker", "-o", "json", timeout=120)
    assert worker.returncode == 0, worker.stderr
    info = json.loads(worker.stdout)
    assert (info["kind"], info["ports"], info["environment"]) == (
        "replace",
        [],
        {
            "QUEUE": "jobs",
            "TELEPRESENCE_INTERCEPT_ID": info["id"],
            "TELEPRESENCE_CONTAINER": "worker",
        },
    )
    wait_rolled(sandbox, "worker")
    assert containers_of(sandbox, "worker") == ["traffic-agent"]
    listed = run_tele(tele_env, "list").stdout
    assert "worker (replaced by " in listed and "echo (replaced by " in listed

    for name, containers in (("echo", ["echo", "l4"]), ("worker", ["worker"])):
        left = run_tele(tele_env, "leave", name, timeout=60)
        assert left.returncode == 0, left.stderr
        wait_rolled(sandbox, name)
        assert containers_of(sandbox, name) == sorted([*containers, "traffic-agent"])
    assert call(sandbox, "http://echo.default/").startswith('{"pod": "echo-')
    assert run_tele(tele_env, "quit").returncode == 0


def test_multi_port_intercept_to_pod_and_ingest(
    installed: NodeSandbox, tele_env: dict[str, str], guard: DaemonGuard, tmp_path: Path
) -> None:
    sandbox = installed
    connect(tele_env, sandbox)
    # A --to-pod port that is taken here: one sentence, and the engagement is undone.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        refused = run_tele(
            tele_env, "intercept", "echo", "-p", "8080:http", "--to-pod", str(busy), timeout=120
        )
    assert refused.returncode == 1
    assert single_error_line(refused).startswith(f"tele: Local port {busy}/TCP on 127.0.0.1 is")
    assert "Intercepts:         0 total" in run_tele(tele_env, "status").stdout
    assert "echo (intercepted" not in run_tele(tele_env, "list").stdout

    with laptop_http("http port") as http_port, laptop_http("alt port") as alt_port:
        engaged = run_tele(
            tele_env,
            "intercept",
            "echo",
            "-p",
            f"{http_port}:http",
            "-p",
            f"{alt_port}:9090",
            "--to-pod",
            str(APP_PORT),
            "--to-pod",
            f"{L4_PORT}/UDP",
            timeout=120,
        )
        assert engaged.returncode == 0, engaged.stderr
        assert call(sandbox, "http://echo.default/") == "http port"
        assert call(sandbox, "http://echo.default:9090/") == "alt port"
        # --to-pod: this machine's APP_PORT is the pod's (the app itself answers there).
        with urllib.request.urlopen(f"http://127.0.0.1:{APP_PORT}/", timeout=10) as answer:
            assert json.loads(answer.read())["pod"].startswith("echo-")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(10)
            udp.sendto(b"datagram", ("127.0.0.1", L4_PORT))
            assert udp.recvfrom(2048)[0] == b"datagram"

        # An ingest of the same container is no conflict; `-- cmd` gets the env, then leaves.
        out = tmp_path / "seen"
        ingested = run_tele(
            tele_env,
            "ingest",
            "echo",
            "-c",
            "echo",
            "--",
            "sh",
            "-c",
            f'echo "$GREETING $PORT" > {out}',
            timeout=120,
        )
        assert ingested.returncode == 0, ingested.stderr
        assert "Ingest name   : echo/echo" in ingested.stdout
        assert out.read_text() == f"hello {APP_PORT}\n"
        status = run_tele(tele_env, "status").stdout
        assert "Intercepts:         1 total" in status
        assert "echo: intercepted Deployment default/echo" in status

    assert run_tele(tele_env, "leave", "echo").returncode == 0
    with pytest.raises(OSError):  # the forward ended with the intercept
        urllib.request.urlopen(f"http://127.0.0.1:{APP_PORT}/", timeout=5)
    assert call(sandbox, "http://echo.default/").startswith('{"pod": "echo-')
    assert run_tele(tele_env, "quit").returncode == 0
