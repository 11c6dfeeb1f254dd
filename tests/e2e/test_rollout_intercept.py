"""An Argo Rollout engaged on the sandbox (the Rollout CRD add-on and controller): with the Helm
value `workloads.argoRollouts.enabled` false the manager never sees Rollouts (not listed, one
sentence when intercepted); with it true `tele list` shows the Rollout, `tele intercept` gets
the agent injected (the webhook walks pod -> ReplicaSet -> Rollout) and a pod's call to the
Service is answered on this machine; `tele leave` and `tele uninstall --agent` give it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tele.sandbox import addons
from tests.daemon.util import DaemonGuard, run_tele, single_error_line
from tests.e2e import (
    caller_pod,
    deployment,
    echo_container,
    in_caller,
    install_manager,
    kubectl,
    manifest,
    service,
)
from tests.e2e.test_intercept_on_sandbox import CALL, laptop_handler  # noqa: F401 - fixture
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

APP = manifest(
    deployment(
        "echo",
        echo_container(),
        kind="Rollout",
        strategy={"canary": {"maxSurge": 1, "maxUnavailable": 0}},
    ),
    service("echo"),
    caller_pod(),
)


def _containers(sandbox: NodeSandbox) -> list[str]:
    pods = json.loads(kubectl(sandbox, "get", "pods", "-l", "app=echo", "-o", "json"))["items"]
    return [
        c["name"]
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        for c in p["spec"]["containers"]
    ]


def _healthy(sandbox: NodeSandbox) -> None:
    kubectl(sandbox, "wait", "--for=jsonpath={.status.phase}=Healthy", "rollout/echo")
    kubectl(sandbox, "wait", "--for=condition=Ready", "pod", "-l", "app=echo", "--timeout=90s")


def _workloads(env: dict[str, str]) -> list[dict[str, object]]:
    listed = run_tele(env, "list", "-o", "json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    found: list[dict[str, object]] = json.loads(listed.stdout)
    return found


def test_rollout_intercept_follows_the_helm_value(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    laptop_handler: int,  # noqa: F811
    tmp_path: Path,
) -> None:
    kubeconfig = str(node_sandbox.kubeconfig)
    kubectl(node_sandbox, "apply", "-f", str(addons.manifest_path("argo-rollouts")))
    kubectl(node_sandbox, "wait", "--for=condition=Established", "crd/rollouts.argoproj.io")
    kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
    kubectl(node_sandbox, "wait", "--for=condition=Ready", "pod/caller", "--timeout=90s")
    _healthy(node_sandbox)

    # Rollouts not enabled: the manager does not see them.
    install_manager(node_sandbox, tele_env)
    connect = ("connect", "--no-vif", "--kubeconfig", kubeconfig)
    assert run_tele(tele_env, *connect, timeout=120).returncode == 0
    assert "echo" not in [w.get("name") for w in _workloads(tele_env)]
    refused = run_tele(tele_env, "intercept", "echo", "--port", str(laptop_handler), timeout=60)
    assert refused.returncode != 0
    assert "workloads.argoRollouts.enabled" in single_error_line(refused)
    assert _containers(node_sandbox) == ["echo"]
    assert run_tele(tele_env, "quit").returncode == 0

    # Enabled: listed, engaged, answered here, left, uninstalled.
    upgraded = run_tele(
        tele_env,
        "helm",
        "upgrade",
        "--kubeconfig",
        kubeconfig,
        "--set",
        "workloads.argoRollouts.enabled=true",
        timeout=120,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    kubectl(
        node_sandbox,
        "rollout",
        "status",
        "-n",
        "ambassador",
        "deployment/traffic-manager",
        "--timeout=90s",
    )
    assert run_tele(tele_env, *connect, timeout=120).returncode == 0
    listed = {w.get("name"): w for w in _workloads(tele_env)}
    assert listed["echo"]["kind"] == "Rollout", listed
    engaged = run_tele(tele_env, "intercept", "echo", "--port", str(laptop_handler), timeout=120)
    assert engaged.returncode == 0, engaged.stderr
    assert "traffic-agent" in _containers(node_sandbox)
    assert in_caller(node_sandbox, CALL) == "hello from the laptop\n\n"

    assert run_tele(tele_env, "leave", "echo").returncode == 0
    assert '"pod": "echo-' in in_caller(node_sandbox, CALL)
    removed = run_tele(tele_env, "uninstall", "--agent", "echo", timeout=60)
    assert removed.returncode == 0, removed.stderr
    _healthy(node_sandbox)
    assert _containers(node_sandbox) == ["echo"]
    assert '"pod": "echo-' in in_caller(node_sandbox, CALL)
    assert run_tele(tele_env, "quit").returncode == 0
    uninstalled = run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
    assert uninstalled.returncode == 0, uninstalled.stderr
