"""Which pod serves an engagement (the one its client's `--to-pod` forwards and volumes reach):
when that pod is deleted, the manager names another pod whose agent is up (WATCH_SERVING)."""

from __future__ import annotations

from typing import Any

import trio

from tele.k8s import client as k8s
from tele.k8s.client import KubeClient
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.client import Client
from tele.testing.waits import wait_for
from tests.manager.test_engage import TEMPLATE, create_workload
from tests.manager.test_manager import IDENTITY, start_manager


async def _agent_arrives(client: Client, pod: str, ip: str, sftp_port: int = 2222) -> str:
    """An agent of Deployment api in pod `pod` arrives; its session (kept up by the test's
    short run: the lease is 15 s)."""
    info = await client.call(
        aapi.ARRIVE_AS_AGENT,
        aapi.AgentIdentity(
            pod_name=pod,
            namespace="default",
            pod_ip=ip,
            workload_name="api",
            workload_kind="Deployment",
            version="0.1.0",
            sftp_port=sftp_port,
        ),
    )
    return info.session_id


async def _engage_and_watch(
    nursery: trio.Nursery, client: Client
) -> tuple[str, aapi.EngagementInfo, list[aapi.ServingPods]]:
    """A client session engages Deployment api and watches its serving pods: the session, the
    engagement and the list the updates are added to (the first one there already)."""
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    info = await client.call(
        aapi.ENGAGE,
        aapi.EngageRequest(
            session_id=session, namespace="default", workload="api", agent_timeout=10
        ),
    )
    updates: list[aapi.ServingPods] = []

    async def watch() -> None:
        request = api.SessionRequest(session_id=session)
        async with client.stream(aapi.WATCH_SERVING, request) as stream:
            async for update in stream:
                updates.append(update)

    nursery.start_soon(watch)
    await wait_for(lambda: len(updates) == 1)
    return session, info, updates


async def _pod(kube: KubeClient, name: str) -> None:
    """A pod of the workload in the API (its deletion is what the manager sees)."""
    await kube.create(
        k8s.PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "api"}},
            "spec": TEMPLATE["spec"],
        },
    )


async def test_a_deleted_serving_pod_is_followed_by_a_pod_whose_agent_is_up(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("Deployment", "default", "api") in manager.view.workloads)
    await wait_for(lambda: ("default", "api-1-a") in manager.view.pods)
    await _pod(kube, "api-1-b")
    await wait_for(lambda: ("default", "api-1-b") in manager.view.pods)
    await _agent_arrives(client, "api-1-b", "10.244.0.7")
    session, info, updates = await _engage_and_watch(nursery, client)
    assert (info.pod_name, info.pod_ips) == ("api-1-b", ["10.244.0.7"])

    def serving() -> Any:
        [pod] = updates[-1].pods
        return (pod.engagement_id, pod.name, pod.pod_name, pod.pod_ips, pod.sftp_port)

    assert serving() == (info.id, "api", "api-1-b", ["10.244.0.7"], 2222)

    # Another pod's agent arriving changes nothing: the serving pod stays as long as it lives.
    await _pod(kube, "api-1-c")
    await _agent_arrives(client, "api-1-c", "10.244.0.8")
    with trio.move_on_after(0.5):
        await wait_for(lambda: len(updates) > 1)
    assert len(updates) == 1

    # The serving pod is deleted: its agent ends with it, and the other pod serves.
    await kube.delete(k8s.PODS, "api-1-b", "default")
    await wait_for(lambda: serving()[2] == "api-1-c")
    assert serving() == (info.id, "api", "api-1-c", ["10.244.0.8"], 2222)
    # Engaging again as before answers with the pod that serves now.
    again = await client.call(
        aapi.ENGAGE,
        aapi.EngageRequest(
            session_id=session, namespace="default", workload="api", agent_timeout=10
        ),
    )
    assert (again.id, again.pod_name) == (info.id, "api-1-c")

    # Its last pod gone, the engagement keeps the pod it had until an agent is up again.
    await kube.delete(k8s.PODS, "api-1-c", "default")
    await wait_for(lambda: not manager.agents.of_workload(("Deployment", "default", "api")))
    assert serving()[2] == "api-1-c"
    await _pod(kube, "api-1-d")
    await _agent_arrives(client, "api-1-d", "10.244.0.9")
    await wait_for(lambda: serving()[2] == "api-1-d")


async def test_an_agent_that_arrives_again_in_the_serving_pod_is_a_new_arrival(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    """The agent restarts in the same pod (a crash, an OOM kill): the pod's name stays, and
    the serving pod's `agent` tag changes, so that its client mounts the volumes again."""
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("default", "api-1-a") in manager.view.pods)
    await _pod(kube, "api-1-b")
    await wait_for(lambda: ("default", "api-1-b") in manager.view.pods)
    first = await _agent_arrives(client, "api-1-b", "10.244.0.7")
    _, info, updates = await _engage_and_watch(nursery, client)
    [pod] = updates[0].pods
    assert (pod.engagement_id, pod.pod_name) == (info.id, "api-1-b")
    assert pod.agent and first not in pod.agent  # a tag, not the agent's own session id

    # The agent restarts: a new session from the same pod, while the old one's lease runs;
    # its file server listens on another port.
    await _agent_arrives(client, "api-1-b", "10.244.0.7", sftp_port=2223)
    await wait_for(lambda: len(updates) == 2)
    [again] = updates[1].pods
    assert (again.pod_name, again.pod_ips, again.sftp_port) == ("api-1-b", ["10.244.0.7"], 2223)
    assert again.agent and again.agent != pod.agent
    # The old session's end changes nothing: the new arrival still serves.
    manager.agents.sessions.depart(first)
    manager.agents._changes.notify()
    with trio.move_on_after(0.5):
        await wait_for(lambda: len(updates) > 2)
    assert len(updates) == 2
