"""The manager and Argo Rollouts, in one process against the sandbox API with the Rollout CRD:
a Rollout is a workload (its ReplicaSet is not) only when `argoRollouts` is enabled, and when a
disruption budget refuses the eviction, the Rollout is restarted with a merge patch of its pod
template (custom objects take no strategic merge patch) and its new agent is engaged."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import yaml

from tele.k8s import client as k8s
from tele.k8s.client import KubeClient
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.errors import Code, RpcError
from tele.sandbox import addons
from tele.sandbox.apiserver.store import Event
from tele.sandbox.cluster import ClusterInfo
from tele.testing.waits import wait_for
from tests.manager.test_manager import IDENTITY, start_manager

TEMPLATE = {
    "metadata": {"labels": {"app": "api"}},
    "spec": {
        "containers": [
            {
                "name": "app",
                "image": "tele-sandbox/echo",
                "ports": [{"name": "http", "containerPort": 8080}],
            }
        ]
    },
}
ALL_KINDS = ("deployments", "replicaSets", "statefulSets", "argoRollouts")


async def create_rollout(kube: KubeClient) -> None:
    manifest = yaml.safe_load(addons.manifest_path("argo-rollouts").read_text())
    await kube.create(addons.CRDS, manifest)
    selector = {"matchLabels": {"app": "api"}}
    rollout = await kube.create(
        k8s.ROLLOUTS,
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {"selector": selector, "template": TEMPLATE, "strategy": {"canary": {}}},
        },
    )
    owner: dict[str, Any] = {"controller": True}
    rs = await kube.create(
        k8s.REPLICASETS,
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": "api-1",
                "namespace": "default",
                "ownerReferences": [
                    {
                        **owner,
                        "apiVersion": "argoproj.io/v1alpha1",
                        "kind": "Rollout",
                        "name": "api",
                        "uid": rollout["metadata"]["uid"],
                    }
                ],
            },
            "spec": {"selector": selector, "template": TEMPLATE},
        },
    )
    await kube.create(
        k8s.PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "api-1-a",
                "namespace": "default",
                "labels": {"app": "api"},
                "ownerReferences": [
                    {
                        **owner,
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": "api-1",
                        "uid": rs["metadata"]["uid"],
                    }
                ],
            },
            "spec": TEMPLATE["spec"],
        },
    )
    # Running (as a kubelet would say), so that a disruption budget applies to its eviction.
    await kube.patch(
        k8s.PODS, "api-1-a", {"status": {"phase": "Running"}}, "default", subresource="status"
    )
    await kube.create(
        k8s.SERVICES,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {
                "selector": {"app": "api"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        },
    )


async def _listed(client: Any, session: str) -> dict[str, str]:
    listed = await client.call(
        api.LIST_WORKLOADS, api.WorkloadsRequest(session_id=session, namespace="default")
    )
    return {w.name: w.kind for w in listed.workloads}


async def test_rollouts_are_seen_only_when_enabled(nursery: trio.Nursery, kube: KubeClient) -> None:
    await create_rollout(kube)
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("ReplicaSet", "default", "api-1") in manager.view.workloads)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    assert await _listed(client, session) == {}  # the Rollout's ReplicaSet is not listed either
    with pytest.raises(RpcError) as refused:
        await client.call(
            aapi.ENGAGE,
            aapi.EngageRequest(session_id=session, namespace="default", workload="api"),
        )
    assert refused.value.code is Code.NOT_FOUND
    assert refused.value.message == (
        "No workload named api in namespace default; it is an Argo Rollout, seen only with the "
        "Helm value workloads.argoRollouts.enabled=true."
    )


async def test_a_refused_eviction_restarts_the_rollout_by_merge_patch(
    nursery: trio.Nursery,
    kube: KubeClient,
    sandbox_api: ClusterInfo,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tele.manager.rollouts")
    await create_rollout(kube)
    # No disruption controller runs here: the budget's status allows no disruption at all.
    await kube.create(
        k8s.PDBS,
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "api"}}},
        },
    )
    manager, client = await start_manager(nursery, kube, workloads=ALL_KINDS)
    await wait_for(lambda: ("Rollout", "default", "api") in manager.view.workloads)
    await wait_for(lambda: ("default", "api-1-a") in manager.view.pods)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    assert await _listed(client, session) == {"api": "Rollout"}

    def restarted() -> str:
        rollout = manager.view.workloads[("Rollout", "default", "api")]
        annotations = rollout["spec"]["template"]["metadata"].get("annotations") or {}
        return str(annotations.get("telepresence.io/restartedAt", ""))

    def refusals() -> int:
        return sum("eviction refused" in r.getMessage() for r in caplog.records)

    async def agent_arrives_after_the_restart() -> None:
        # The manager looks again on every change: the Rollout it restarted is one (a second
        # refusal), an agent arriving is another (a third); it restarts only once meanwhile.
        await wait_for(lambda: bool(restarted()) and refusals() >= 2, timeout=10)
        agent = aapi.AgentIdentity(
            pod_name="api-2-a",
            namespace="default",
            pod_ip="10.244.0.8",
            workload_name="api",
            workload_kind="Rollout",
            version="0.1.0",
        )
        await client.call(aapi.ARRIVE_AS_AGENT, agent)
        await wait_for(lambda: refusals() >= 3, timeout=10)
        assert restarts == 1
        # As the Rollout controller would once the new pod is up: the old one goes.
        await kube.delete(k8s.PODS, "api-1-a", "default")

    restarts = 0

    def count_restarts(event: Event) -> None:
        nonlocal restarts
        if event.type == "MODIFIED" and event.obj["spec"] != (event.old or {}).get("spec"):
            restarts += 1

    sandbox_api.api.store.subscribe("argoproj.io/rollouts", count_restarts)

    nursery.start_soon(agent_arrives_after_the_restart)
    info = await client.call(
        aapi.ENGAGE,
        aapi.EngageRequest(
            session_id=session, namespace="default", workload="api", agent_timeout=10
        ),
    )
    assert (info.workload_kind, info.service, info.container_port) == ("Rollout", "api", 8080)
    assert restarted() and restarts == 1


async def test_rollouts_enabled_without_the_crd(
    nursery: trio.Nursery, kube: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    manager, client = await start_manager(
        nursery, kube, workloads=ALL_KINDS, missing_kind_retry=0.05
    )
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    assert await _listed(client, session) == {}  # the manager runs, with no Rollouts
    await wait_for(
        lambda: any(
            "does not serve argoproj.io/v1alpha1 rollouts" in r.getMessage() for r in caplog.records
        )
    )
    # Argo Rollouts installed later: the manager finds them.
    await create_rollout(kube)
    await wait_for(lambda: ("Rollout", "default", "api") in manager.view.workloads)
    assert await _listed(client, session) == {"api": "Rollout"}
