"""Helm values that need a real cluster to show their effect (issue 19), on the sandbox with a
node: a non-default `apiPort` (the daemon port-forwards to it, the injected agent dials it),
and the agent's `logLevel`, `resources` and `image.pullPolicy` on the pod the webhook made."""

from __future__ import annotations

import json

import pytest

from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import connect, deployment, echo_container, install_manager, kubectl, manifest
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

APP = manifest(
    deployment("settings-echo", echo_container(18081, env={"GREETING": "settings"})),
)


def test_api_port_and_agent_values_take_effect_in_the_cluster(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
) -> None:
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(
        node_sandbox,
        tele_env,
        "apiPort=9181",
        "agent.logLevel=debug",
        "agent.image.pullPolicy=Always",
        "agent.resources.limits.memory=300Mi",
    )
    kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
    kubectl(
        node_sandbox, "wait", "--for=condition=Ready", "pod", "-l", "app=settings-echo",
        "--timeout=90s",
    )  # fmt: skip
    try:
        # The daemon reaches the manager on its api port 9181 (through the port-forward).
        connect(tele_env, node_sandbox)
        # The ingest succeeds only once the injected agent arrived: it dialed the manager's
        # Service on 9181.
        ingested = run_tele(
            tele_env, "ingest", "settings-echo", "-c", "echo", "--", "true", timeout=150
        )
        assert ingested.returncode == 0, ingested.stderr
        pods = json.loads(
            kubectl(node_sandbox, "get", "pods", "-l", "app=settings-echo", "-o", "json")
        )["items"]
        agents = [
            container
            for pod in pods
            for container in pod["spec"]["containers"]
            if container["name"] == "traffic-agent"
        ]
        assert agents, [p["metadata"]["name"] for p in pods]
        agent = agents[0]
        assert {e["name"]: e.get("value") for e in agent["env"]}["LOG_LEVEL"] == "debug"
        assert agent["imagePullPolicy"] == "Always"
        assert agent["resources"] == {"limits": {"memory": "300Mi"}}
        config = json.loads(
            next(
                p["metadata"]["annotations"]["telepresence.io/agent-config"]
                for p in pods
                if "telepresence.io/agent-config" in (p["metadata"].get("annotations") or {})
            )
        )
        assert config["manager_port"] == 9181
    finally:
        run_tele(tele_env, "quit")
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
        kubectl(node_sandbox, "delete", "deployment", "settings-echo", "--wait=false")
