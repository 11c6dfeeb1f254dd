"""Issue 9's crash story on the sandbox: the client is killed (`kill -9`) while it replaces a
workload's container; when its session's lease runs out, the manager ends the engagement and
rolls the container back, and the cluster's app answers again — nobody has to clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.daemon.util import DaemonGuard, run_tele, wait_exit
from tests.e2e import apply_ready, install_manager, kubectl
from tests.e2e.test_intercept_on_sandbox import APP, CALL, laptop_handler  # noqa: F401
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns


def test_a_killed_client_gives_the_workload_back_after_its_lease(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    laptop_handler: int,  # noqa: F811
) -> None:
    install_manager(node_sandbox, tele_env, "timeouts.sessionLease=3s")
    apply_ready(node_sandbox, APP)
    kubeconfig = str(node_sandbox.kubeconfig)
    assert run_tele(tele_env, "connect", "--kubeconfig", kubeconfig, timeout=120).returncode == 0
    replaced = run_tele(
        tele_env, "replace", "echo", "--port", f"{laptop_handler}:8080", "--mount", "false"
    )
    assert replaced.returncode == 0, replaced.stderr
    call = ("exec", "caller", "--", "python3", "-c", CALL)
    assert kubectl(node_sandbox, *call) == "hello from the laptop\n\n"

    pid = guard.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_exit(pid)
    deadline = time.monotonic() + 60
    answers: list[str] = []
    while not answers or '"pod": "echo-' not in answers[-1]:
        assert time.monotonic() < deadline, f"the app did not come back: {answers[-3:]}"
        time.sleep(0.5)  # polling a cluster call's answer: no event to wait on from here
        answers.append(kubectl_ok(node_sandbox, *call))
    containers = kubectl(
        node_sandbox,
        "get",
        "pods",
        "-l",
        "app=echo",
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={.items[*].spec.containers[*].name}",
    )
    assert "echo" in containers.split()  # the replaced container runs again


def kubectl_ok(sandbox: NodeSandbox, *args: str) -> str:
    """kubectl's stdout, or its error (a call may fail while the pods roll)."""
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(sandbox.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout if result.returncode == 0 else result.stderr
