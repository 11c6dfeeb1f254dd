"""replace, ingest and multi-port intercepts on the manager (sandbox API, a stand-in agent):
which pods are rolled and how the webhook makes them, conflicts between the kinds, and the
roll-back when a replace ends by leave or with its session."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
import pytest
import trio

from tele.contracts import agentconfig
from tele.k8s import client as k8s
from tele.k8s.client import KubeClient
from tele.manager.server import Manager
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.client import Client
from tele.rpc.errors import Code, RpcError
from tele.testing.waits import wait_for
from tests.manager.test_engage import api_pod, create_workload
from tests.manager.test_manager import IDENTITY, start_manager

KEY = ("Deployment", "default", "api")
EVE = api.ClientIdentity(user="eve", host="pc", client_version="0")


class Agent:
    """A stand-in traffic agent of a pod made with `replaced` containers left out."""

    def __init__(self, client: Client, pod: str, replaced: list[str]) -> None:
        self.client = client
        self.pod = pod
        self.replaced = replaced
        self.engagements: list[aapi.Engagement] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        identity = aapi.AgentIdentity(
            pod_name=self.pod,
            namespace="default",
            pod_ip="10.244.0.9",
            workload_name="api",
            workload_kind="Deployment",
            version="0.1.0",
            environment={"app": {"DB": "pg"}},
            replaced=self.replaced,
        )
        info = await self.client.call(aapi.ARRIVE_AS_AGENT, identity)
        task_status.started()
        request = api.SessionRequest(session_id=info.session_id)
        try:
            async with self.client.stream(aapi.WATCH_ENGAGEMENTS, request) as updates:
                async for update in updates:
                    self.engagements = update.engagements
        except RpcError as exc:
            # The test's client link closing as the test ends (a real agent would arrive
            # again; the stand-in just stops). Anything else is a failure.
            if exc.code is not Code.UNAVAILABLE:
                raise


async def ready(nursery: trio.Nursery, kube: KubeClient) -> tuple[Manager, Client]:
    await create_workload(
        kube,
        [
            {"name": "web", "port": 80, "targetPort": "http"},
            {"name": "rpc", "port": 90, "targetPort": "grpc"},
        ],
    )
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("default", "api") in manager.view.services)
    await wait_for(lambda: ("ReplicaSet", "default", "api-1") in manager.view.workloads)
    await wait_for(lambda: ("default", "api-1-a") in manager.view.pods)
    return manager, client


async def made_by_webhook(manager: Manager, kube: KubeClient, name: str) -> dict[str, Any]:
    """Create a pod of the workload as the API server would after the webhook's patch."""
    pod = api_pod(await kube.get(k8s.REPLICASETS, "api-1", "default"), name)
    review = {"operation": "CREATE", "kind": {"kind": "Pod"}, "namespace": "default"}
    answer = await manager.injector({**review, "object": pod})
    if "patch" in answer:
        pod = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(answer["patch"])))
    await kube.create(k8s.PODS, pod)
    await wait_for(lambda: ("default", name) in manager.view.pods)
    return pod


def engage(session: str, **fields: Any) -> aapi.EngageRequest:
    return aapi.EngageRequest(
        session_id=session, namespace="default", workload="api", agent_timeout=10, **fields
    )


async def test_replace_rolls_pods_without_the_container_and_back(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    manager, client = await ready(nursery, kube)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    other = (await client.call(api.ARRIVE, EVE)).session_id

    # Bad input changes nothing: no pod rolled, nothing marked.
    with pytest.raises(RpcError) as unknown:
        await client.call(aapi.ENGAGE, engage(session, kind="replace", container="nope"))
    assert (unknown.value.code, unknown.value.message) == (
        Code.NOT_FOUND,
        "api has no container named nope (it has app).",
    )
    assert KEY not in manager.agent_workloads
    assert await kube.get_or_none(k8s.PODS, "api-1-a", "default") is not None

    agent = Agent(client, "api-1-r", ["app"])

    async def agent_of_the_replaced_pod() -> None:
        await wait_for(lambda: "app" in manager.table.replaced_containers(KEY))
        # What the webhook makes now: the agent alone, owning the app's ports.
        pod = await made_by_webhook(manager, kube, "api-1-r")
        assert [c["name"] for c in pod["spec"]["containers"]] == [agentconfig.AGENT_CONTAINER]
        await nursery.start(agent.run)

    nursery.start_soon(agent_of_the_replaced_pod)
    info = await client.call(aapi.ENGAGE, engage(session, kind="replace"))
    assert (info.kind, info.name, info.container) == ("replace", "api", "app")
    assert [p.container_port for p in info.ports] == [8080, 9090]
    assert info.environment == {"DB": "pg"}
    assert await kube.get_or_none(k8s.PODS, "api-1-a", "default") is None  # rolled
    await wait_for(lambda: [e.ports() for e in agent.engagements] == [[8080, 9090]])

    # The container is taken: no intercept of it, but an ingest is fine.
    with pytest.raises(RpcError) as taken:
        await client.call(aapi.ENGAGE, engage(other, port="web", name="eve-api"))
    assert taken.value.code is Code.ALREADY_EXISTS
    assert "Container app of api is already replaced by dev@laptop (api)." in taken.value.message
    ingest = await client.call(aapi.ENGAGE, engage(other, kind="ingest"))
    assert (ingest.kind, ingest.name, ingest.ports) == ("ingest", "api/app", [])

    # Leaving rolls the replaced pod back (the webhook then makes it with the container) and
    # returns once the agent of a pod with the container running again is up.
    restored = Agent(client, "api-1-b", [])

    async def agent_of_the_restored_pod() -> None:
        await wait_for(lambda: ("default", "api-1-r") not in manager.view.pods)
        pod = await made_by_webhook(manager, kube, "api-1-b")
        names = [c["name"] for c in pod["spec"]["containers"]]
        assert names == ["app", agentconfig.AGENT_CONTAINER]
        await nursery.start(restored.run)

    nursery.start_soon(agent_of_the_restored_pod)
    await client.call(aapi.LEAVE, aapi.LeaveRequest(session_id=session, name="api"))
    assert await kube.get_or_none(k8s.PODS, "api-1-r", "default") is None
    assert manager.table.replaced_containers(KEY) == frozenset()
    # The agent of the evicted pod ended with it (agents are killed; they never depart).
    assert [a.pod_name for a in manager.agents.of_workload(KEY)] == ["api-1-b"]

    # A replace that ends with its session is rolled back too.
    async def agent_of_the_second_replace() -> None:
        await wait_for(lambda: "app" in manager.table.replaced_containers(KEY))
        await made_by_webhook(manager, kube, "api-1-s")
        await nursery.start(Agent(client, "api-1-s", ["app"]).run)

    nursery.start_soon(agent_of_the_second_replace)
    await client.call(aapi.ENGAGE, engage(session, kind="replace", ports=["grpc"]))
    await client.call(api.DEPART, api.SessionRequest(session_id=session))
    await wait_for(lambda: ("default", "api-1-s") not in manager.view.pods)


async def test_multi_port_intercept_and_ingests_of_several_clients(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    _, client = await ready(nursery, kube)
    agent = Agent(client, "api-1-b", [])
    await nursery.start(agent.run)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    other = (await client.call(api.ARRIVE, EVE)).session_id

    with pytest.raises(RpcError) as twice:
        await client.call(aapi.ENGAGE, engage(session, ports=["web", "80"]))
    assert (twice.value.code, twice.value.message) == (
        Code.INVALID_ARGUMENT,
        "Port 80 is named twice.",
    )

    info = await client.call(aapi.ENGAGE, engage(session, ports=["rpc", "web"]))
    assert [(p.service_port_name, p.container_port) for p in info.ports] == [
        ("rpc", 9090),
        ("web", 8080),
    ]
    await wait_for(lambda: [e.ports() for e in agent.engagements] == [[9901, 9900]])

    # Both clients ingest the same container; one leaving leaves the other's in place.
    mine = await client.call(aapi.ENGAGE, engage(session, kind="ingest"))
    theirs = await client.call(aapi.ENGAGE, engage(other, kind="ingest"))
    assert mine.name == theirs.name == "api/app" and mine.id != theirs.id
    assert theirs.environment == {"DB": "pg"}
    await client.call(aapi.LEAVE, aapi.LeaveRequest(session_id=other, name="api/app"))
    listed = await client.call(
        api.LIST_WORKLOADS, api.WorkloadsRequest(session_id=session, namespace="default")
    )
    [workload] = [w for w in listed.workloads if w.name == "api"]
    assert workload.engaged_by == [
        "api (intercepted by dev@laptop: tcp, service port api:rpc, api:web)",
        "api/app (ingested by dev@laptop: container app)",
    ]
    # Ingests never reach the agent as traffic.
    assert [e.kind for e in agent.engagements] == ["intercept", "ingest"]
    assert [e.ports() for e in agent.engagements] == [[9901, 9900], []]


async def test_a_new_manager_rolls_back_pods_nobody_replaces(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    manager, _ = await ready(nursery, kube)
    # A pod as a previous manager made it for a replace of "app" (this one knows of none).
    manager.agent_workloads.add(KEY)
    manager.table.replacing[(KEY, "app")] = "someone@gone"
    await made_by_webhook(manager, kube, "api-1-r")
    del manager.table.replacing[(KEY, "app")]
    assert await manager.rollouts.restore_orphans() == [KEY]
    assert await kube.get_or_none(k8s.PODS, "api-1-r", "default") is None
    # Pods made without replaced containers are nobody's orphans.
    await made_by_webhook(manager, kube, "api-1-b")
    assert await manager.rollouts.restore_orphans() == []
    assert await kube.get_or_none(k8s.PODS, "api-1-b", "default") is not None
