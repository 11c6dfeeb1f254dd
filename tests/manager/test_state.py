"""A replaced manager pod still knows which workloads get an agent: the set is saved in a
ConfigMap after each engagement and read before the new manager's webhook answers."""

from __future__ import annotations

import json

import trio

from tele.contracts.names import STATE_CONFIGMAP
from tele.k8s import client as k8s
from tele.k8s.client import KubeClient, open_kube_client
from tele.manager.server import Manager
from tele.manager.state import KEY
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.testing.waits import wait_for
from tests.manager.test_engage import StandInAgent, create_workload
from tests.manager.test_manager import IDENTITY, start_manager
from tests.manager.test_webhook import WEBHOOK, webhook_config

WORKLOAD = ("Deployment", "default", "api")
WEBHOOK_OPTIONS = {
    "webhook_port": 0,
    "webhook_name": WEBHOOK,
    "webhook_extra_names": ("127.0.0.1",),
}


async def saved(kube: KubeClient) -> list[list[str]]:
    found = await kube.get_or_none(k8s.CONFIGMAPS, STATE_CONFIGMAP, "default")
    return [] if found is None else list(json.loads(found["data"][KEY]))


async def wait_saved(manager: Manager) -> None:
    """Until every change of the manager's set reached the API server."""
    workloads = manager.agent_workloads
    await wait_for(lambda: workloads.saved_version == workloads.version)


async def test_a_new_manager_keeps_injecting_the_agent(kube: KubeClient) -> None:
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    await kube.create(k8s.MUTATING_WEBHOOKS, webhook_config("https://127.0.0.1:1/traffic-agent"))
    # The first manager has an API client of its own, closed with it (as its pod's would be):
    # requests it had in flight when it was stopped leave nothing open on the shared one.
    async with open_kube_client(connection=kube.connection) as own, trio.open_nursery() as first:
        manager, client = await start_manager(first, own, **WEBHOOK_OPTIONS)
        await wait_for(lambda: ("ReplicaSet", "default", "api-1") in manager.view.workloads)
        session = (await client.call(api.ARRIVE, IDENTITY)).session_id
        await first.start(StandInAgent(client).run)
        engage = aapi.EngageRequest(session_id=session, namespace="default", workload="api")
        await client.call(aapi.ENGAGE, engage)
        await wait_saved(manager)
        assert await saved(kube) == [list(WORKLOAD)]
        first.cancel_scope.cancel()  # the manager pod is gone

    async with trio.open_nursery() as second:
        manager, client = await start_manager(second, kube, **WEBHOOK_OPTIONS)
        assert WORKLOAD in manager.agent_workloads  # known before the webhook answered
        url = f"https://127.0.0.1:{manager.webhook_port}/traffic-agent"
        patch = [{"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": url}]
        await kube.patch(k8s.MUTATING_WEBHOOKS, WEBHOOK, patch, patch_type="json")
        await wait_for(lambda: ("ReplicaSet", "default", "api-1") in manager.view.workloads)
        rs = await kube.get(k8s.REPLICASETS, "api-1", "default")
        template = rs["spec"]["template"]
        pod = await kube.create(
            k8s.PODS,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "api-1-new",
                    "namespace": "default",
                    "labels": template["metadata"]["labels"],
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "ReplicaSet",
                            "name": "api-1",
                            "uid": rs["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": template["spec"],
            },
        )
        assert [c["name"] for c in pod["spec"]["containers"]] == ["app", "traffic-agent"]

        # Uninstalling takes the workload out of the saved set as well.
        session = (await client.call(api.ARRIVE, IDENTITY)).session_id
        uninstall = aapi.UninstallRequest(session_id=session, namespace="default", all_agents=True)
        assert (await client.call(aapi.UNINSTALL, uninstall)).removed == ["api"]
        await wait_saved(manager)
        assert await saved(kube) == []
        second.cancel_scope.cancel()


async def test_an_unreadable_state_is_ignored(nursery: trio.Nursery, kube: KubeClient) -> None:
    await kube.create(
        k8s.CONFIGMAPS,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": STATE_CONFIGMAP, "namespace": "default"},
            "data": {KEY: "{not json"},
        },
    )
    manager, _ = await start_manager(nursery, kube)
    assert len(manager.agent_workloads) == 0
    # The first change overwrites it with a readable set.
    manager.agent_workloads.add(WORKLOAD)
    await wait_saved(manager)
    assert await saved(kube) == [list(WORKLOAD)]
