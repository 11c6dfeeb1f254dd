"""`tele helm uninstall` finds the workloads whose pods carry a traffic agent (through their
ReplicaSets to the Deployment), keeps those whose template asks for one, and removes the agent:
a Deployment is restarted (its template annotated), a bare pod deleted."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import trio

from tele.helm import ops
from tele.k8s import client as k8s
from tele.k8s.client import KubeClient

AGENT = {"name": "traffic-agent", "image": "tele"}
APP = {"name": "app", "image": "tele-sandbox/echo"}


def _template(app: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": app}, "annotations": annotations or {}},
        "spec": {"containers": [APP]},
    }


async def _deployment(kube: KubeClient, name: str, **annotations: str) -> None:
    deployment = await kube.create(
        k8s.DEPLOYMENTS,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "replicas": 0,  # the test makes the pods itself
                "selector": {"matchLabels": {"app": name}},
                "template": _template(name, annotations),
            },
        },
    )
    owner = {"apiVersion": "apps/v1", "controller": True}
    replicaset = await kube.create(
        k8s.REPLICASETS,
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{name}-5d8f7",
                "namespace": "default",
                "ownerReferences": [
                    {
                        **owner,
                        "kind": "Deployment",
                        "name": name,
                        "uid": deployment["metadata"]["uid"],
                    }
                ],
            },
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": name}},
                "template": _template(name),
            },
        },
    )
    await _pod(
        kube,
        f"{name}-5d8f7-x1",
        owner={
            **owner,
            "kind": "ReplicaSet",
            "name": f"{name}-5d8f7",
            "uid": replicaset["metadata"]["uid"],
        },
    )


async def _pod(
    kube: KubeClient, name: str, *, owner: dict[str, Any] | None = None, agent: bool = True
) -> None:
    metadata: dict[str, Any] = {"name": name, "namespace": "default"}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    await kube.create(
        k8s.PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {"containers": [APP, AGENT] if agent else [APP]},
        },
    )


async def test_workloads_with_agent_pods_are_found_and_the_agents_removed(kube: KubeClient) -> None:
    await _deployment(kube, "api")
    await _deployment(kube, "pinned", **{"telepresence.io/inject-traffic-agent": "enabled"})
    await _deployment(kube, "hand", **{"telepresence.io/manually-injected": "true"})
    await _pod(kube, "loner")
    await _pod(kube, "plain", agent=False)

    found = await ops.agent_workloads(kube)
    assert found == [
        ops.AgentWorkload("Deployment", "default", "api"),
        ops.AgentWorkload("Deployment", "default", "hand", by_hand=True),
        ops.AgentWorkload("Deployment", "default", "pinned", by_template=True),
        ops.AgentWorkload("Pod", "default", "loner"),
    ]

    # The Deployment's controller would replace its pod; here the test plays it.
    async def controller_replaces_the_pod() -> None:
        watch = kube.watch(k8s.DEPLOYMENTS, "default", field_selector="metadata.name=api")
        async with aclosing(watch) as events:
            async for event in events:
                template = event.object["spec"]["template"]["metadata"]
                if "telepresence.io/restartedAt" in (template.get("annotations") or {}):
                    await kube.delete(k8s.PODS, "api-5d8f7-x1", "default")
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(controller_replaces_the_pod)
        with trio.fail_after(30):
            removed = await ops.remove_agents(kube, found, wait=30)
    assert removed == [found[0], found[3]]
    assert await kube.get_or_none(k8s.PODS, "loner", "default") is None
    for kept in ("pinned", "hand"):  # no restart can remove their agent: none is tried
        deployment = await kube.get(k8s.DEPLOYMENTS, kept, "default")
        assert "telepresence.io/restartedAt" not in (
            deployment["spec"]["template"]["metadata"].get("annotations") or {}
        )
    assert await kube.get_or_none(k8s.PODS, "hand-5d8f7-x1", "default") is not None
    assert await kube.get_or_none(k8s.PODS, "plain", "default") is not None
