"""An engagement end to end in one process: sandbox API, manager, a stand-in agent and the
laptop side's dial-back server; bytes go agent -> manager -> client -> local handler and back."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import msgspec
import pytest
import trio

import tele
from tele.daemon.engage import serve_dial_backs
from tele.k8s import client as k8s
from tele.k8s.client import KubeClient
from tele.manager.server import Manager
from tele.net.tapcopies import FROM_CLIENT, Kind, RecordReader, record
from tele.net.tunnel import Destination, Protocol
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.client import Client
from tele.rpc.errors import Code, RpcError
from tele.rpc.tunnel import dial
from tele.testing.waits import wait_for
from tests.manager.test_manager import IDENTITY, start_manager

TEMPLATE = {
    "metadata": {"labels": {"app": "api"}},
    "spec": {
        "containers": [
            {
                "name": "app",
                "image": "tele-sandbox/echo",
                "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "grpc", "containerPort": 9090},
                ],
                "env": [{"name": "DB", "value": "pg"}],
            }
        ]
    },
}


async def create_workload(kube: KubeClient, service_ports: list[dict[str, Any]]) -> None:
    deployment = await kube.create(
        k8s.DEPLOYMENTS,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "template": TEMPLATE},
        },
    )
    owner = {"apiVersion": "apps/v1", "controller": True}
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
                        "kind": "Deployment",
                        "name": "api",
                        "uid": deployment["metadata"]["uid"],
                    }
                ],
            },
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "template": TEMPLATE},
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
                    {**owner, "kind": "ReplicaSet", "name": "api-1", "uid": rs["metadata"]["uid"]}
                ],
            },
            "spec": TEMPLATE["spec"],
        },
    )
    await kube.create(
        k8s.SERVICES,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {"selector": {"app": "api"}, "ports": service_ports},
        },
    )


class StandInAgent:
    """What the agent process does towards the manager, driven by the test."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.session = ""
        self.engagements: list[aapi.Engagement] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        info = await self.client.call(
            aapi.ARRIVE_AS_AGENT,
            aapi.AgentIdentity(
                pod_name="api-1-b",
                namespace="default",
                pod_ip="10.244.0.7",
                workload_name="api",
                workload_kind="Deployment",
                version="0.1.0",
                environment={"app": {"DB": "pg"}},
            ),
        )
        self.session = info.session_id
        task_status.started()
        request = api.SessionRequest(session_id=self.session)
        async with self.client.stream(aapi.WATCH_ENGAGEMENTS, request) as updates:
            async for update in updates:
                self.engagements = update.engagements


def api_pod(replicaset: dict[str, Any], name: str, **metadata: Any) -> dict[str, Any]:
    """A pod of the ReplicaSet api-1 with the template's spec (a copy), before any webhook."""
    owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-1", "controller": True}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"app": "api"},
            "ownerReferences": [{**owner, "uid": replicaset["metadata"]["uid"]}],
            **metadata,
        },
        "spec": copy.deepcopy(TEMPLATE["spec"]),
    }


async def create_agent_pod(kube: KubeClient, name: str, **metadata: Any) -> None:
    """A pod of api-1 that carries an agent, as the webhook would have made it."""
    pod = api_pod(await kube.get(k8s.REPLICASETS, "api-1", "default"), name, **metadata)
    pod["spec"]["containers"].append({"name": "traffic-agent", "image": "tele/traffic-agent"})
    await kube.create(k8s.PODS, pod)


async def _engage_with_stand_in_agent(
    nursery: trio.Nursery,
    manager: Manager,
    client: Client,
    engaged: dict[str, tuple[str, int]],
    request: aapi.EngageRequest,
) -> tuple[Any, StandInAgent]:
    """ENGAGE `request` as the daemon does: its session's dial-backs served (each engagement to
    the local address `engaged` gives for its id), and a stand-in agent that arrives once the
    manager wants one for default/api, as the webhook would inject it. The answer and the
    agent."""
    session = request.session_id

    async def dial_back(destination: Destination, dial_id: str) -> Any:
        return await dial(client.link, destination, session=session, dial_id=dial_id)

    nursery.start_soon(
        serve_dial_backs, client, session, dial_back, lambda id_, _port: engaged.get(id_)
    )
    agent = StandInAgent(client)

    async def agent_arrives_when_asked() -> None:
        await wait_for(lambda: ("Deployment", "default", "api") in manager.agent_workloads)
        await nursery.start(agent.run)

    nursery.start_soon(agent_arrives_when_asked)
    return await client.call(aapi.ENGAGE, request), agent


async def test_engage_routes_connections_to_the_local_handler(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("default", "api") in manager.view.services)
    await wait_for(lambda: ("ReplicaSet", "default", "api-1") in manager.view.workloads)
    await wait_for(lambda: ("default", "api-1-a") in manager.view.pods)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id

    # The local handler: uppercases what it gets.
    async def handler(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some():
            await stream.send_all(data.upper())
        await stream.send_eof()

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    local_port = listeners[0].socket.getsockname()[1]
    engaged: dict[str, tuple[str, int]] = {}
    info, agent = await _engage_with_stand_in_agent(
        nursery,
        manager,
        client,
        engaged,
        aapi.EngageRequest(
            session_id=session, namespace="default", workload="api", agent_timeout=10
        ),
    )
    assert (info.container, info.service, info.container_port) == ("app", "api", 8080)
    assert info.environment == {"DB": "pg"}
    assert info.client == "dev@laptop"
    # The pod without an agent was evicted so that the webhook can inject one.
    assert await kube.get_or_none(k8s.PODS, "api-1-a", "default") is None
    engaged[info.id] = ("127.0.0.1", local_port)
    await wait_for(lambda: [e.id for e in agent.engagements] == [info.id])
    [engagement] = agent.engagements
    assert (engagement.agent_port, engagement.mechanism) == (9900, "tcp")

    # The agent got a connection for the engaged port: it goes to the laptop's handler.
    destination = Destination(Protocol.TCP, ipaddress.ip_address("10.244.0.7"), 8080)
    stream = await dial(
        client.link, destination, session=agent.session, dial_id=aapi.AGENT_DIAL_PREFIX + info.id
    )
    await stream.send_all(b"hello from the cluster")
    await stream.send_eof()
    received = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            received += chunk
    assert received == b"HELLO FROM THE CLUSTER"

    # Nothing listens locally: an HTTP caller gets a 502 naming the engagement and the local
    # port; another protocol's connection is reset.
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    engaged[info.id] = ("127.0.0.1", closed)
    stream = await dial(
        client.link, destination, session=agent.session, dial_id=aapi.AGENT_DIAL_PREFIX + info.id
    )
    await stream.send_all(b"POST /x HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello")
    await stream.send_eof()
    received = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            received += chunk
    body = f"tele: nothing listens on 127.0.0.1:{closed}, the local handler of {info.id}\n"
    assert (
        received
        == (
            "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
        ).encode()
    )
    stream = await dial(
        client.link, destination, session=agent.session, dial_id=aapi.AGENT_DIAL_PREFIX + info.id
    )
    await stream.send_all(b"\x16\x03\x01 not http\n")
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        while await stream.receive_some():
            pass
    engaged[info.id] = ("127.0.0.1", local_port)

    # A wiretap's copy channel for an engagement that is no wiretap is refused.
    for prefix in (aapi.AGENT_TAP_DIAL_PREFIX, aapi.AGENT_TAP_RESPONSE_DIAL_PREFIX):
        with pytest.raises(Exception, match="refused"):
            await dial(client.link, destination, session=agent.session, dial_id=prefix + info.id)

    # Someone else cannot take the same port; leaving frees it and tells the agent.
    other = (
        await client.call(api.ARRIVE, api.ClientIdentity(user="eve", host="pc", client_version="0"))
    ).session_id
    with pytest.raises(RpcError) as conflict:
        await client.call(
            aapi.ENGAGE, aapi.EngageRequest(session_id=other, namespace="default", workload="api")
        )
    assert conflict.value.code is Code.ALREADY_EXISTS
    assert "already engaged by dev@laptop" in conflict.value.message
    await client.call(aapi.LEAVE, aapi.LeaveRequest(session_id=session, name="api"))
    await wait_for(lambda: agent.engagements == [])

    # An agent stream for an engagement that ended is refused.
    with pytest.raises(Exception, match="refused"):
        await dial(
            client.link,
            destination,
            session=agent.session,
            dial_id=aapi.AGENT_DIAL_PREFIX + info.id,
        )


async def test_ambiguous_ports_ask_for_service_and_port(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    await create_workload(
        kube,
        [
            {"name": "web", "port": 80, "targetPort": "http"},
            {"name": "rpc", "port": 90, "targetPort": "grpc"},
        ],
    )
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("default", "api") in manager.view.services)
    await wait_for(lambda: ("Deployment", "default", "api") in manager.view.workloads)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    with pytest.raises(RpcError) as info:
        await client.call(
            aapi.ENGAGE, aapi.EngageRequest(session_id=session, namespace="default", workload="api")
        )
    assert info.value.code is Code.FAILED_PRECONDITION
    assert "api:web" in info.value.message and "--service and --port" in info.value.message
    with pytest.raises(RpcError) as missing:
        await client.call(
            aapi.ENGAGE,
            aapi.EngageRequest(session_id=session, namespace="default", workload="nope"),
        )
    assert missing.value.code is Code.NOT_FOUND
    # With the port named, no agent arrives (no webhook here): a clear timeout.
    with pytest.raises(RpcError) as timeout:
        await client.call(
            aapi.ENGAGE,
            aapi.EngageRequest(
                session_id=session,
                namespace="default",
                workload="api",
                port="rpc",
                agent_timeout=0.5,
            ),
        )
    assert timeout.value.code is Code.DEADLINE_EXCEEDED
    assert "No traffic agent of Deployment default/api arrived" in timeout.value.message


async def test_list_shows_engagement_state(nursery: trio.Nursery, kube: KubeClient) -> None:
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    await kube.create(
        k8s.DEPLOYMENTS,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "lonely", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "lonely"}},
                "template": {
                    "metadata": {"labels": {"app": "lonely"}},
                    "spec": {"containers": [{"name": "c", "image": "tele-sandbox/worker"}]},
                },
            },
        },
    )
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("Deployment", "default", "lonely") in manager.view.workloads)
    await wait_for(lambda: ("default", "api") in manager.view.services)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    agent = StandInAgent(client)
    await nursery.start(agent.run)
    await client.call(
        aapi.ENGAGE, aapi.EngageRequest(session_id=session, namespace="default", workload="api")
    )
    listed = await client.call(
        api.LIST_WORKLOADS, api.WorkloadsRequest(session_id=session, namespace="default")
    )
    by_name = {w.name: w for w in listed.workloads}
    assert by_name["api"].agent_installed
    assert by_name["api"].engaged_by == [
        "api (intercepted by dev@laptop: tcp, service port api:web)"
    ]
    assert "no Service selects" in by_name["lonely"].not_interceptable_reason
    assert not by_name["lonely"].agent_installed


async def test_list_counts_pods_that_carry_an_agent_not_in_session(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    """After the manager was reinstalled, pods still carry agents that have not arrived (yet):
    `tele list` says installed, not connected, rather than "not yet installed"."""
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    await create_agent_pod(kube, "api-1-b")
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("default", "api-1-b") in manager.view.pods)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    listed = await client.call(
        api.LIST_WORKLOADS, api.WorkloadsRequest(session_id=session, namespace="default")
    )
    [workload] = [w for w in listed.workloads if w.name == "api"]
    assert (workload.agent_installed, workload.agent_pods, workload.agents_connected) == (
        True,
        1,
        0,
    )


async def test_uninstall_rolls_the_agent_out(nursery: trio.Nursery, kube: KubeClient) -> None:
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("default", "api") in manager.view.services)
    await wait_for(lambda: ("ReplicaSet", "default", "api-1") in manager.view.workloads)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    agent = StandInAgent(client)
    await nursery.start(agent.run)
    await client.call(
        aapi.ENGAGE, aapi.EngageRequest(session_id=session, namespace="default", workload="api")
    )
    assert ("Deployment", "default", "api") in manager.agent_workloads
    request = aapi.UninstallRequest(session_id=session, namespace="default", workloads=["api"])
    with pytest.raises(RpcError) as busy:
        await client.call(aapi.UNINSTALL, request)
    assert "engaged by dev@laptop (api); it must leave first" in busy.value.message
    await client.call(aapi.LEAVE, aapi.LeaveRequest(session_id=session, name="api"))
    await create_agent_pod(kube, "api-1-agent")
    await wait_for(lambda: ("default", "api-1-agent") in manager.view.pods)
    reply = await client.call(aapi.UNINSTALL, request)
    assert reply.removed == ["api"]
    assert ("Deployment", "default", "api") not in manager.agent_workloads
    assert await kube.get_or_none(k8s.PODS, "api-1-agent", "default") is None
    everything = aapi.UninstallRequest(session_id=session, namespace="default", all_agents=True)
    assert (await client.call(aapi.UNINSTALL, everything)).removed == []


async def test_uninstall_returns_when_the_agent_pods_are_on_their_way_out(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    """`tele uninstall` then `tele list --agents`: the workload is not listed, also while its
    pod with the agent is still terminating (a finalizer holds it here, as a grace period
    would)."""
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    await create_agent_pod(kube, "api-1-agent", finalizers=["tele.test/hold"])
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("default", "api-1-agent") in manager.view.pods)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    workloads = api.WorkloadsRequest(session_id=session, namespace="default")

    async def listed() -> tuple[bool, int]:
        reply = await client.call(api.LIST_WORKLOADS, workloads)
        [workload] = [w for w in reply.workloads if w.name == "api"]
        return workload.agent_installed, workload.agent_pods

    assert await listed() == (True, 1)
    request = aapi.UninstallRequest(session_id=session, namespace="default", workloads=["api"])
    assert (await client.call(aapi.UNINSTALL, request)).removed == ["api"]
    # Evicted, still there (the finalizer), and no longer counted.
    pod = await kube.get(k8s.PODS, "api-1-agent", "default")
    assert pod["metadata"].get("deletionTimestamp")
    assert await listed() == (False, 0)
    await kube.patch(k8s.PODS, "api-1-agent", {"metadata": {"finalizers": None}}, "default")
    await wait_for(lambda: ("default", "api-1-agent") not in manager.view.pods)


@pytest.mark.parametrize(
    ("fields", "sentence"),
    [
        (
            {"mechanism": "http", "path_regex": ["(["]},
            "--http-path-regex '([' does not compile: unterminated character set at position 1",
        ),
        (
            {"mechanism": "http", "headers": [("x dev", "me")]},
            "--http-header 'x dev' is not a valid header name",
        ),
        (
            {"mechanism": "tcp", "headers": [("x-dev", "me")]},
            "HTTP filters need an intercept with --mechanism http",
        ),
    ],
)
async def test_a_filter_that_cannot_match_is_refused(
    nursery: trio.Nursery, kube: KubeClient, fields: dict[str, Any], sentence: str
) -> None:
    """Issue 18 item 2: the manager checks what a CLI might not have (another client, an older
    one): nothing is activated, so nothing is reported ACTIVE that the agent would not match."""
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    with pytest.raises(RpcError) as refused:
        await client.call(
            aapi.ENGAGE,
            aapi.EngageRequest(session_id=session, namespace="default", workload="api", **fields),
        )
    assert refused.value.code is Code.INVALID_ARGUMENT
    assert refused.value.message == sentence
    assert manager.table.active == {}


async def test_refusals_say_what_exists(nursery: trio.Nursery, kube: KubeClient) -> None:
    """Issue 18: an unknown workload gets a "did you mean" from the namespace's workloads (and
    no Argo Rollouts note: there is no Rollout of that name); a namespace that does not exist
    says so; a workload scaled to 0 is refused at once instead of waiting for an agent."""
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("Deployment", "default", "api") in manager.view.workloads)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id

    async def refused(namespace: str, workload: str) -> tuple[Code, str]:
        request = aapi.EngageRequest(
            session_id=session, namespace=namespace, workload=workload, agent_timeout=30
        )
        with pytest.raises(RpcError) as refusal:
            await client.call(aapi.ENGAGE, request)
        return refusal.value.code, refusal.value.message

    assert await refused("default", "apii") == (
        Code.NOT_FOUND,
        "No workload named apii in namespace default; did you mean api?",
    )
    assert await refused("default", "zzz") == (
        Code.NOT_FOUND,
        "No workload named zzz in namespace default.",
    )
    assert await refused("nowhere", "api") == (Code.NOT_FOUND, "There is no namespace nowhere.")

    await kube.patch(k8s.DEPLOYMENTS, "api", {"spec": {"replicas": 0}}, "default")
    await wait_for(
        lambda: (
            manager.view.workloads[("Deployment", "default", "api")]["spec"].get("replicas") == 0
        )
    )
    with trio.fail_after(10):  # not the 30 s agent timeout
        assert await refused("default", "api") == (
            Code.FAILED_PRECONDITION,
            "Deployment default/api has 0 replicas: scale it up first "
            "(kubectl scale -n default deployment/api --replicas=1).",
        )


class OldClientIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """ClientIdentity as clients sent it before wiretap copy channels: no `capabilities`."""

    user: str
    host: str
    client_version: str
    install_id: str = ""
    kube_context: str = ""
    mapped_namespaces: list[str] = []


async def test_an_old_client_is_refused_wiretaps_and_a_new_one_gets_the_copy_channel(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("default", "api") in manager.view.services)
    await wait_for(lambda: ("ReplicaSet", "default", "api-1") in manager.view.workloads)
    await wait_for(lambda: ("default", "api-1-a") in manager.view.pods)
    old_identity = OldClientIdentity(user="old", host="pc", client_version="0.0.9")
    assert b"capabilities" not in msgspec.json.encode(old_identity)
    old = (await client.call(api.ARRIVE, old_identity)).session_id  # type: ignore[arg-type]
    wiretap = aapi.EngageRequest(
        session_id=old, namespace="default", workload="api", kind=aapi.WIRETAP, agent_timeout=10
    )

    # The old client's wiretap: one sentence naming both versions, and nothing asked of the
    # cluster (no agent wanted, no engagement).
    with pytest.raises(RpcError) as refused:
        await client.call(aapi.ENGAGE, wiretap)
    assert refused.value.code is Code.FAILED_PRECONDITION
    assert refused.value.message == (
        f"This traffic manager needs tele {tele.__version__} or newer for wiretap (it sends a "
        "wiretap's copies on one stream that older clients cannot read); your client is tele "
        "0.0.9: upgrade tele to use wiretap."
    )
    assert manager.table.active == {}
    assert ("Deployment", "default", "api") not in manager.agent_workloads

    # A client of this version announces the copy channel and gets its wiretap; the agent's
    # channel reaches it as a channel (records, each copy to the handler on its own connection).
    new_identity = api.ClientIdentity(
        user="dev",
        host="laptop",
        client_version=tele.__version__,
        capabilities=list(api.CLIENT_CAPABILITIES),
    )
    session = (await client.call(api.ARRIVE, new_identity)).session_id
    copies: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        received = b""
        while data := await stream.receive_some():
            received += data
        copies.append(received)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    local = ("127.0.0.1", listeners[0].socket.getsockname()[1])
    engaged: dict[str, tuple[str, int]] = {}
    info, agent = await _engage_with_stand_in_agent(
        nursery,
        manager,
        client,
        engaged,
        aapi.EngageRequest(
            session_id=session, namespace="default", workload="api", kind=aapi.WIRETAP
        ),
    )
    engaged[info.id] = local
    await wait_for(lambda: [e.id for e in agent.engagements] == [info.id])
    destination = Destination(Protocol.TCP, ipaddress.ip_address("10.244.0.7"), 8080)
    channel = await dial(
        client.link,
        destination,
        session=agent.session,
        dial_id=aapi.AGENT_TAP_DIAL_PREFIX + info.id,
    )
    await channel.send_all(
        record(Kind.OPEN, 1) + record(Kind.DATA, 1, b"GET / HTTP/1.1\r\n\r\n") + record(Kind.END, 1)
    )
    reader = RecordReader(FROM_CLIENT)
    verdicts: list[tuple[Kind, int]] = []
    with trio.fail_after(10):
        while not verdicts:
            data = await channel.receive_some()
            assert data, "the channel ended without a verdict"
            verdicts += [(kind, copy_id) for kind, copy_id, _ in reader.feed(data)]
    assert verdicts == [(Kind.DONE, 1)]
    await wait_for(lambda: copies == [b"GET / HTTP/1.1\r\n\r\n"])
    channel.close()

    # Were a client without the capability to hold a wiretap anyway (its session's identity
    # made an old one's here), its copy channel is refused, never handed over as raw bytes;
    # per-connection copies (as older agents send them) still reach it.
    assert manager.clients.can(session, api.WIRETAP_CHANNELS)
    held = manager.clients.sessions.sessions[session]
    held.identity = msgspec.structs.replace(held.identity, capabilities=[])
    assert not manager.clients.can(session, api.WIRETAP_CHANNELS)
    with pytest.raises(Exception, match="refused"):
        await dial(
            client.link,
            destination,
            session=agent.session,
            dial_id=aapi.AGENT_TAP_DIAL_PREFIX + info.id,
        )
    per_connection = await dial(
        client.link, destination, session=agent.session, dial_id=aapi.AGENT_DIAL_PREFIX + info.id
    )
    await per_connection.send_all(b"a copy the old way")
    await per_connection.send_eof()
    await wait_for(lambda: copies[1:] == [b"a copy the old way"])
    per_connection.close()
