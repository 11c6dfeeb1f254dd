"""Issue 7 as a user lives it, on the sandbox with a node: `tele helm install` runs the traffic
manager as a pod, `tele connect` reaches it through the pods/portforward websocket, the session
survives the manager pod being replaced, and uninstall removes it all."""

from __future__ import annotations

import json
import time

import pytest

from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import connect, install_manager, kubectl
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns


def status(env: dict[str, str]) -> dict[str, object]:
    result = run_tele(env, "status", "-o", "json")
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_install_connect_survive_manager_restart_uninstall(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
) -> None:
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, tele_env)
    connect(tele_env, node_sandbox)
    first = status(tele_env)
    assert first["connection"] == "connected"
    session = first["session"]
    assert isinstance(session, dict)
    assert session["service_subnets"] == ["10.96.0.0/16"]
    old_pod = session["manager_pod"]

    # The manager pod goes away: the Deployment makes another and the daemon follows it.
    kubectl(node_sandbox, "delete", "pod", "-n", "ambassador", str(old_pod), "--wait=false")
    deadline = time.monotonic() + 90
    while True:
        now = status(tele_env)
        current = now["session"]
        assert isinstance(current, dict)
        if now["connection"] == "connected" and current["manager_pod"] != old_pod:
            break
        assert time.monotonic() < deadline, f"the daemon did not follow the new manager: {now}"
        time.sleep(0.5)  # polling a CLI command's output: no event to wait on from here

    listed = run_tele(tele_env, "list", "-n", "ambassador", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    [manager] = json.loads(listed.stdout)
    assert manager["not_interceptable_reason"] == "it is the traffic manager"

    assert run_tele(tele_env, "quit").returncode == 0
    removed = run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
    assert removed.returncode == 0, removed.stderr
    assert "traffic-manager" not in kubectl(node_sandbox, "get", "deployments", "-A")
