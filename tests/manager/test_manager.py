"""The traffic manager in-process against the sandbox API server: sessions, cluster info, DNS,
workloads and tunnel dialing, all through its real RPC/tunnel port on loopback."""

from __future__ import annotations

import hashlib

import pytest
import trio

from tele.contracts.namespaces import NamespaceSelector
from tele.k8s import client as k8s
from tele.k8s.client import KubeClient
from tele.manager.server import Manager, ManagerConfig
from tele.net.tunnel import Destination, Protocol, ResetReason
from tele.rpc import manager_api as api
from tele.rpc.client import Client, open_client
from tele.rpc.errors import Code, RpcError
from tele.rpc.tunnel import TunnelError, dial
from tele.testing.waits import wait_for

IDENTITY = api.ClientIdentity(user="dev", host="laptop", client_version="0.1.0")


async def start_manager(
    nursery: trio.Nursery, kube: KubeClient, **options: object
) -> tuple[Manager, Client]:
    options.setdefault("namespace", "default")
    # These tests are about everything but authentication (tests/manager/test_auth.py), and
    # their stand-in agents have no pod token.
    options.setdefault("auth_mode", "disabled")
    options.setdefault("allow_loopback_dials", True)  # their servers listen on 127.0.0.1
    config = ManagerConfig(api_port=0, api_host="127.0.0.1", **options)  # type: ignore[arg-type]
    manager = Manager(config, kube)
    port = await nursery.start(manager.serve)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    clients: list[Client] = []

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_client(stream) as client:
            clients.append(client)
            task_status.started()
            await client.link.wait_closed()

    await nursery.start(run)
    return manager, clients[0]


def service(name: str, namespace: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}], **spec},
    }


def namespace(name: str, **labels: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


async def test_arrive_reports_the_cluster(nursery: trio.Nursery, kube: KubeClient) -> None:
    _, client = await start_manager(nursery, kube)
    session = await client.call(api.ARRIVE, IDENTITY)
    info = session.cluster
    assert info.service_subnets == ["10.96.0.0/16"]  # learnt from the API server's own error
    assert {"default", "kube-system"} <= set(info.managed_namespaces)
    assert info.cluster_wide
    assert session.lease_seconds == 60
    again = await client.call(
        api.GET_CLUSTER_INFO, api.SessionRequest(session_id=session.session_id)
    )
    assert again.managed_namespaces == info.managed_namespaces


async def test_dns_answers_cluster_names(nursery: trio.Nursery, kube: KubeClient) -> None:
    manager, client = await start_manager(nursery, kube)
    created = await kube.create(k8s.SERVICES, service("echo", "default"))
    ip = created["spec"]["clusterIP"]
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    await wait_for(lambda: ("default", "echo") in manager.view.services)

    async def lookup(name: str, qtype: str = "A") -> api.LookupReply:
        return await client.call(
            api.LOOKUP_DNS, api.LookupRequest(session_id=session, name=name, qtype=qtype)
        )

    for name in (
        "echo.default",
        "echo.default.svc",
        "echo.default.svc.cluster.local.",
        "ECHO.Default",
    ):
        reply = await lookup(name)
        assert reply.rcode == "NOERROR" and [r.value for r in reply.records] == [ip], name
    assert (await lookup("missing.default")).rcode == "NXDOMAIN"
    assert (await lookup("echo.nonexistent-ns.svc.cluster.local")).rcode == "NXDOMAIN"
    srv = await lookup("_http._tcp.echo.default", "SRV")
    assert [r.value for r in srv.records] == ["0 100 80 echo.default.svc.cluster.local"]
    assert (await lookup("localhost")).records[0].value in ("127.0.0.1", "::1")
    with pytest.raises(RpcError) as info:
        await client.call(
            api.LOOKUP_DNS, api.LookupRequest(session_id="bogus", name="echo.default")
        )
    assert info.value.code is Code.NOT_FOUND


async def test_static_namespaces_limit_what_is_managed(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    for name in ("alpha", "beta"):
        await kube.create(k8s.NAMESPACES, namespace(name))
        await kube.create(k8s.SERVICES, service("web", name))
    manager, client = await start_manager(
        nursery, kube, selector=NamespaceSelector.for_names(["alpha"])
    )
    session = await client.call(api.ARRIVE, IDENTITY)
    assert session.cluster.managed_namespaces == ["alpha"]
    assert not session.cluster.cluster_wide
    await wait_for(lambda: ("alpha", "web") in manager.view.services)
    sid = session.session_id
    alpha = await client.call(api.LOOKUP_DNS, api.LookupRequest(session_id=sid, name="web.alpha"))
    beta = await client.call(api.LOOKUP_DNS, api.LookupRequest(session_id=sid, name="web.beta"))
    assert alpha.rcode == "NOERROR" and beta.rcode == "NXDOMAIN"
    with pytest.raises(RpcError) as info:
        await client.call(
            api.ARRIVE,
            api.ClientIdentity(user="u", host="h", client_version="0", mapped_namespaces=["beta"]),
        )
    assert info.value.code is Code.FAILED_PRECONDITION
    assert "does not manage namespace beta" in info.value.message


async def test_dynamic_selector_follows_labels_live(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    selector = NamespaceSelector.parse({"matchLabels": {"team": "blue"}})
    _, client = await start_manager(nursery, kube, selector=selector)
    session = await client.call(api.ARRIVE, IDENTITY)
    assert session.cluster.managed_namespaces == []
    request = api.SessionRequest(session_id=session.session_id)
    async with client.stream(api.WATCH_CLUSTER_INFO, request) as updates:
        assert (await anext(updates)).managed_namespaces == []
        await kube.create(k8s.NAMESPACES, namespace("gamma", team="blue"))
        with trio.fail_after(10):
            async for info in updates:
                if info.managed_namespaces == ["gamma"]:
                    break
        await kube.patch(k8s.NAMESPACES, "gamma", {"metadata": {"labels": {"team": "red"}}})
        with trio.fail_after(10):
            async for info in updates:
                if info.managed_namespaces == []:
                    break


async def test_lease_expiry_and_depart_end_sessions(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    manager, client = await start_manager(nursery, kube, session_lease=0.5)
    ended: list[str] = []
    manager.on_session_end.append(lambda s: ended.append(s.session_id))
    silent = (await client.call(api.ARRIVE, IDENTITY)).session_id
    departing = (await client.call(api.ARRIVE, IDENTITY)).session_id
    before = manager.sessions.sessions[departing].expires_at
    await client.call(api.REMAIN, api.SessionRequest(session_id=departing))
    assert manager.sessions.sessions[departing].expires_at > before
    await client.call(api.DEPART, api.SessionRequest(session_id=departing))
    assert ended == [departing]
    # No heartbeat: the reaper ends the session once its lease has run out.
    await wait_for(lambda: silent in ended)
    with pytest.raises(RpcError) as info:
        await client.call(api.REMAIN, api.SessionRequest(session_id=silent))
    assert info.value.code is Code.NOT_FOUND
    assert ended == [departing, silent]


async def test_tunnel_dials_for_sessions_only(nursery: trio.Nursery, kube: KubeClient) -> None:
    _, client = await start_manager(nursery, kube)

    async def echo(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()

    listeners = await nursery.start(trio.serve_tcp, echo, 0)
    port = listeners[0].socket.getsockname()[1]
    destination = Destination(Protocol.TCP, Destination.parse("tcp", f"127.0.0.1:{port}").ip, port)
    with pytest.raises(TunnelError) as info:
        await dial(client.link, destination, session="not-a-session")
    assert info.value.reason is ResetReason.POLICY
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    stream = await dial(client.link, destination, session=session)
    payload = bytes(range(256)) * 4096
    digest = hashlib.sha256()

    async def send() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with trio.open_nursery() as inner:
        inner.start_soon(send)
        while chunk := await stream.receive_some():
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_list_workloads(nursery: trio.Nursery, kube: KubeClient) -> None:
    manager, client = await start_manager(nursery, kube)
    await kube.create(k8s.SERVICES, service("api", "default"))
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "api"}},
            "template": {
                "metadata": {"labels": {"app": "api"}},
                "spec": {"containers": [{"name": "app", "image": "tele-sandbox/echo"}]},
            },
        },
    }
    await kube.create(k8s.DEPLOYMENTS, deployment)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    await wait_for(lambda: ("Deployment", "default", "api") in manager.view.workloads)
    await wait_for(lambda: ("default", "api") in manager.view.services)
    listed = await client.call(
        api.LIST_WORKLOADS, api.WorkloadsRequest(session_id=session, namespace="default")
    )
    [workload] = [w for w in listed.workloads if w.name == "api"]
    assert (workload.kind, workload.replicas, workload.services) == ("Deployment", 2, ["api"])
