"""Issue 9's story on the sandbox with a node: a pod calls a Service; `tele intercept` makes the
webhook inject the traffic agent (by evicting the pod), and the next call is answered by a
handler on this machine; after `tele leave` the cluster's app answers again."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import (
    apply_ready,
    caller_pod,
    deployment,
    echo_container,
    in_caller,
    install_manager,
    kubectl,
    laptop_http,
    manifest,
    service,
)
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

APP = manifest(
    deployment("echo", echo_container(env={"GREETING": "hello"})),
    service("echo"),
    caller_pod(),
)

CALL = (
    "import urllib.request; "
    "print(urllib.request.urlopen('http://echo.default/', timeout=10).read().decode())"
)

# A request matching the intercept's header; prints the status and the body, even for errors.
CALL_502 = """
import urllib.error, urllib.request
request = urllib.request.Request("http://echo.default/", headers={"x-me": "yes"})
try:
    response = urllib.request.urlopen(request, timeout=10)
    print(response.status, response.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


@pytest.fixture
def laptop_handler() -> Iterator[int]:
    with laptop_http("hello from the laptop\n") as port:
        yield port


def test_intercept_answers_a_cluster_call_from_this_machine(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    laptop_handler: int,
    tmp_path: Path,
) -> None:
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, tele_env)
    apply_ready(node_sandbox, APP)
    assert '"pod": "echo-' in in_caller(node_sandbox, CALL)

    assert (
        run_tele(
            tele_env, "connect", "--no-vif", "--kubeconfig", kubeconfig, timeout=120
        ).returncode
        == 0
    )
    env_file = tmp_path / "echo.env"
    engaged = run_tele(
        tele_env,
        "intercept",
        "echo",
        "--port",
        str(laptop_handler),
        "-e",
        str(env_file),
        timeout=120,
    )
    assert engaged.returncode == 0, engaged.stderr
    assert "State                  : ACTIVE" in engaged.stdout
    assert "GREETING=hello" in env_file.read_text()
    pods = kubectl(
        node_sandbox,
        "get",
        "pods",
        "-l",
        "app=echo",
        "-o",
        "jsonpath={.items[*].spec.containers[*].name}",
    )
    assert "traffic-agent" in pods.split()

    assert in_caller(node_sandbox, CALL) == "hello from the laptop\n\n"

    # The manager pod is replaced: the new one still injects the agent (its state ConfigMap),
    # the daemon arrives again and engages again, and the call comes back to this machine.
    manager_pod = kubectl(
        node_sandbox, "get", "pods", "-n", "ambassador", "-o", "jsonpath={.items[0].metadata.name}"
    )
    kubectl(node_sandbox, "delete", "pod", "-n", "ambassador", manager_pod, "--wait=false")
    deleted = time.monotonic()
    deadline = deleted + 60
    answers: list[str] = []
    ready_at: float | None = None
    others = f'{{.items[?(@.metadata.name!="{manager_pod}")].status.containerStatuses[0].ready}}'
    while not answers or answers[-1] != "hello from the laptop\n\n":
        assert time.monotonic() < deadline, f"the intercept did not come back: {answers[-3:]}"
        time.sleep(0.5)  # polling a cluster call's answer: no event to wait on from here
        new_ready = kubectl(
            node_sandbox, "get", "pods", "-n", "ambassador", "-o", "jsonpath=" + others
        )
        if ready_at is None and "true" in new_ready:
            ready_at = time.monotonic()
        answers.append(in_caller(node_sandbox, CALL))
    back = time.monotonic()
    print(
        f"\nintercept served again {back - deleted:.1f} s after the manager pod was deleted"
        + (f", {back - ready_at:.1f} s after the new one was ready" if ready_at else "")
    )
    assert manager_pod not in kubectl(node_sandbox, "get", "pods", "-n", "ambassador")

    assert run_tele(tele_env, "leave", "echo").returncode == 0
    assert '"pod": "echo-' in in_caller(node_sandbox, CALL)

    # Nothing listens on the local port: the CLI says so, and a matching request gets a 502
    # whose body says why, while the others still reach the app.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    idle = run_tele(
        tele_env, "intercept", "echo", "--port", str(closed), "--http-header", "x-me=yes"
    )
    assert idle.returncode == 0, idle.stderr
    assert f"nothing listens on 127.0.0.1:{closed} yet" in idle.stderr
    refused = in_caller(node_sandbox, CALL_502)
    assert refused.startswith("502 "), refused
    assert "local handler" in refused, refused
    assert '"pod": "echo-' in in_caller(node_sandbox, CALL)
    assert run_tele(tele_env, "leave", "echo").returncode == 0

    removed = run_tele(tele_env, "uninstall", "--agent", "echo")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == "Removed the traffic agent from echo."
    kubectl(node_sandbox, "rollout", "status", "deployment/echo", "--timeout=90s")
    kubectl(node_sandbox, "wait", "--for=condition=Ready", "pod", "-l", "app=echo", "--timeout=90s")
    containers = kubectl(
        node_sandbox,
        "get",
        "pods",
        "-l",
        "app=echo",
        "-o",
        "jsonpath={.items[*].spec.containers[*].name}",
    )
    assert containers.split() == ["echo"]
    assert '"pod": "echo-' in in_caller(node_sandbox, CALL)
    assert run_tele(tele_env, "quit").returncode == 0
    assert (
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120).returncode
        == 0
    )
