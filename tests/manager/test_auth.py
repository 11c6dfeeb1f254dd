"""Trust boundaries of the manager (issue 15), attacked through its real port with tele's own
client code, against the sandbox API server's TokenReview: nobody is served before
authenticating, a session id is worth nothing to another identity, and a pod cannot pose as
the agent of a workload it is not an injected pod of."""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from tele.contracts.agentconfig import AGENT_CONTAINER, AGENT_TOKEN_AUDIENCE
from tele.k8s import client as k8s
from tele.k8s.client import KubeClient
from tele.manager.auth import UNAUTHENTICATED_STREAMS
from tele.manager.server import Manager, ManagerConfig
from tele.net.tunnel import Destination, Protocol
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc import wire
from tele.rpc.client import Client, open_client
from tele.rpc.errors import Code, RpcError
from tele.rpc.method import Empty
from tele.rpc.tunnel import TunnelError, dial
from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.certs import CertificateAuthority as SandboxCA
from tele.sandbox.cluster import ClusterInfo
from tele.sandbox.identities import client_certificate
from tele.testing.waits import wait_for

IDENTITY = api.ClientIdentity(user="dev", host="laptop", client_version="0.1.0")
NS = "default"


async def start(
    nursery: trio.Nursery, kube: KubeClient, mode: str = "enforcing", **settings: Any
) -> Manager:
    config = ManagerConfig(
        namespace=NS, api_port=0, api_host="127.0.0.1", auth_mode=mode, **settings
    )
    manager = Manager(config, kube)
    manager.bound_port = await nursery.start(manager.serve)  # type: ignore[attr-defined]
    return manager


@asynccontextmanager
async def link(manager: Manager) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", manager.bound_port)  # type: ignore[attr-defined]
    async with open_client(stream) as client:
        yield client


async def admin_token(kube: KubeClient) -> str:
    [(_, value)] = await kube.connection.auth_headers()
    return value.decode().split(" ", 1)[1]


async def service_account_token(
    kube: KubeClient, name: str, *, audience: str | None = None, pod: dict[str, Any] | None = None
) -> str:
    """A TokenRequest, as the kubelet makes for a projected volume (bound to `pod`)."""
    if await kube.get_or_none(k8s.SERVICEACCOUNTS, name, NS) is None:
        account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
        await kube.create(k8s.SERVICEACCOUNTS, account, NS)
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if audience:
        spec["audiences"] = [audience]
    if pod is not None:
        meta = pod["metadata"]
        spec["boundObjectRef"] = {
            "kind": "Pod",
            "apiVersion": "v1",
            "name": meta["name"],
            "uid": meta["uid"],
        }
    reply = await kube.request(
        "POST",
        f"/api/v1/namespaces/{NS}/serviceaccounts/{name}/token",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    return str(reply["status"]["token"])


async def workload_with_pod(
    kube: KubeClient, name: str, *, injected: bool, account: str
) -> dict[str, Any]:
    """A Deployment, its ReplicaSet and one pod (as the controllers would make them)."""
    labels = {"app": name}
    template = {
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }
    deployment = await kube.create(
        k8s.DEPLOYMENTS,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": labels}, "template": template},
        },
        NS,
    )

    def owner(obj: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": obj["metadata"]["name"],
                "uid": obj["metadata"]["uid"],
                "controller": True,
            }
        ]

    replicaset = await kube.create(
        k8s.REPLICASETS,
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {"name": f"{name}-1", "ownerReferences": owner(deployment)},
            "spec": {"selector": {"matchLabels": labels}, "template": template},
        },
        NS,
    )
    containers = [{"name": "app", "image": "app"}]
    if injected:
        containers.append({"name": AGENT_CONTAINER, "image": "tele/traffic-agent"})
    created: dict[str, Any] = await kube.create(
        k8s.PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-1-abcde",
                "labels": labels,
                "ownerReferences": owner(replicaset),
            },
            "spec": {"serviceAccountName": account, "containers": containers},
        },
        NS,
    )
    return created


def agent_identity(pod: str, workload: str) -> aapi.AgentIdentity:
    return aapi.AgentIdentity(
        pod_name=pod,
        namespace=NS,
        pod_ip="10.244.0.9",
        workload_name=workload,
        workload_kind="Deployment",
        version="0",
    )


async def test_nothing_but_the_version_before_authentication(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    manager = await start(nursery, kube)
    async with link(manager) as client:
        assert (await client.call(api.VERSION, Empty())).version
        for method, request in (
            (api.ARRIVE, IDENTITY),
            (api.LIST_WORKLOADS, api.WorkloadsRequest(session_id="x", namespace=NS)),
            (aapi.ARRIVE_AS_AGENT, agent_identity("p", "w")),
        ):
            with pytest.raises(RpcError) as refused:
                await client.call(method, request)  # type: ignore[arg-type]
            assert refused.value.code is Code.UNAUTHENTICATED
            assert "authenticated" in refused.value.message
        # A tunnel stream is refused too (the manager would dial anything for it).
        with pytest.raises(TunnelError):
            await dial(
                client.link,
                Destination(Protocol.TCP, ipaddress.ip_address("127.0.0.1"), 1),
                session="0" * 32,
            )
        with pytest.raises(RpcError) as bad:
            await client.call(api.AUTHENTICATE, api.AuthenticateRequest(token="forged"))
        assert bad.value.code is Code.UNAUTHENTICATED
        with pytest.raises(RpcError) as still:
            await client.call(api.ARRIVE, IDENTITY)
        assert "not accepted" in still.value.message  # why, for the user


async def test_a_stolen_session_id_is_refused_to_another_identity(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    manager = await start(nursery, kube)
    thief_token = await service_account_token(kube, "thief")
    async with link(manager) as owner, link(manager) as thief:
        me = await owner.call(
            api.AUTHENTICATE, api.AuthenticateRequest(token=await admin_token(kube))
        )
        assert me.username == "kubernetes-admin"
        session = (await owner.call(api.ARRIVE, IDENTITY)).session_id
        who = await thief.call(api.AUTHENTICATE, api.AuthenticateRequest(token=thief_token))
        assert who.username == f"system:serviceaccount:{NS}:thief"
        stolen = api.SessionRequest(session_id=session)
        for method, request in (
            (api.GET_CLUSTER_INFO, stolen),
            (api.REMAIN, stolen),
            (api.LIST_WORKLOADS, api.WorkloadsRequest(session_id=session, namespace=NS)),
            (aapi.LEAVE, aapi.LeaveRequest(session_id=session, name="any")),
        ):
            with pytest.raises(RpcError) as refused:
                await thief.call(method, request)  # type: ignore[arg-type]
            assert refused.value.code is Code.NOT_FOUND, method.path
        await thief.call(api.DEPART, stolen)  # answers like an unknown id, and ends nothing
        with pytest.raises(TunnelError):
            await dial(
                thief.link,
                Destination(Protocol.TCP, ipaddress.ip_address("127.0.0.1"), 1),
                session=session,
            )
        # The thief cannot take over the owner's link's identity either.
        with pytest.raises(RpcError) as swap:
            await owner.call(api.AUTHENTICATE, api.AuthenticateRequest(token=thief_token))
        assert swap.value.code is Code.PERMISSION_DENIED
        # The owner still has its session, and its own calls work.
        await owner.call(api.REMAIN, stolen)
        await owner.call(api.GET_CLUSTER_INFO, stolen)
    assert manager.sessions.get(session, trio.current_time()) is not None


async def test_a_plain_pod_cannot_arrive_as_the_agent_of_another_workload(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    manager = await start(nursery, kube)
    victim = await workload_with_pod(kube, "victim", injected=True, account="victim")
    plain = await workload_with_pod(kube, "plain", injected=False, account="plain")
    await wait_for(
        lambda: (
            {("default", victim["metadata"]["name"]), ("default", plain["metadata"]["name"])}
            <= set(manager.view.pods)
            and ("Deployment", NS, "victim") in manager.view.workloads
        )
    )
    claim = agent_identity(victim["metadata"]["name"], "victim")

    async def arrive(token: str, identity: aapi.AgentIdentity) -> aapi.AgentSessionInfo:
        failure: RpcError | None = None
        async with link(manager) as client:
            try:
                await client.call(
                    api.AUTHENTICATE, api.AuthenticateRequest(token=token, agent=True)
                )
                return await client.call(aapi.ARRIVE_AS_AGENT, identity)
            except RpcError as exc:
                failure = exc
        raise failure

    # The attacker's own pod, its own token (bound to its pod, for the manager's audience):
    plain_token = await service_account_token(
        kube, "plain", audience=AGENT_TOKEN_AUDIENCE, pod=plain
    )
    with pytest.raises(RpcError) as posing:
        await arrive(plain_token, claim)
    assert posing.value.code is Code.PERMISSION_DENIED
    assert "has no traffic agent injected" in posing.value.message
    # A token for the API server (what the pod's default volume holds) is not an agent's.
    api_token = await service_account_token(kube, "plain", pod=plain)
    with pytest.raises(RpcError) as wrong_audience:
        await arrive(api_token, claim)
    assert wrong_audience.value.code is Code.UNAUTHENTICATED
    # The victim's account, but a token not bound to a pod: no pod claims, no agent.
    unbound = await service_account_token(kube, "victim", audience=AGENT_TOKEN_AUDIENCE)
    with pytest.raises(RpcError) as no_pod:
        await arrive(unbound, claim)
    assert no_pod.value.code is Code.UNAUTHENTICATED
    # (the fixture's pod has no token volume, as a pod injected by an older manager: said so)
    assert "restart its workload to inject it anew" in no_pod.value.message
    # The victim's own injected pod arrives, and only as itself.
    victim_token = await service_account_token(
        kube, "victim", audience=AGENT_TOKEN_AUDIENCE, pod=victim
    )
    with pytest.raises(RpcError) as lying:
        await arrive(victim_token, agent_identity(victim["metadata"]["name"], "plain"))
    assert lying.value.code is Code.PERMISSION_DENIED
    info = await arrive(victim_token, claim)
    assert info.session_id
    assert [a.pod_name for a in manager.agents.of_workload(("Deployment", NS, "victim"))] == [
        victim["metadata"]["name"]
    ]
    assert not manager.agents.of_workload(("Deployment", NS, "plain"))


async def test_permissive_serves_and_logs_what_it_would_refuse(
    nursery: trio.Nursery, kube: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    manager = await start(nursery, kube, mode="permissive")
    with caplog.at_level(logging.WARNING, logger="tele.manager.auth"):
        async with link(manager) as client:
            session = await client.call(api.ARRIVE, IDENTITY)
    assert session.session_id
    assert "permissive: would refuse" in caplog.text


def test_the_mode_is_the_charts() -> None:
    assert ManagerConfig.from_env({}).auth_mode == "enforcing"
    assert ManagerConfig.from_env({"TELE_AUTH_MODE": "permissive"}).auth_mode == "permissive"


async def test_engaging_follows_rbac_and_each_denial_is_audited(
    nursery: trio.Nursery,
    kube: KubeClient,
    sandbox_api: ClusterInfo,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = await start(nursery, kube)
    await workload_with_pod(kube, "web", injected=False, account="web")
    await wait_for(lambda: ("Deployment", NS, "web") in manager.view.workloads)
    tokens = {}
    for user in ("nobody", "porter"):
        tokens[user] = f"{user}-{uuid.uuid4().hex}"
        sandbox_api.api.authn.add_static(tokens[user], User(user, ("system:authenticated",)))
    rbac = "rbac.authorization.k8s.io/v1"
    await kube.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles",
        body={
            "apiVersion": rbac,
            "kind": "Role",
            "metadata": {"name": "portforward"},
            "rules": [{"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]}],
        },
    )
    await kube.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
        body={
            "apiVersion": rbac,
            "kind": "RoleBinding",
            "metadata": {"name": "porter"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "portforward",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "porter"}
            ],
        },
    )

    async def engage(user: str, kind: str) -> RpcError:
        failure: RpcError | None = None
        async with link(manager) as client:
            await client.call(api.AUTHENTICATE, api.AuthenticateRequest(token=tokens[user]))
            try:
                # Arriving needs create pods/portforward in the manager's namespace (here the
                # workload's too): nobody is refused there already.
                session = (await client.call(api.ARRIVE, IDENTITY)).session_id
                request = aapi.EngageRequest(
                    session_id=session, namespace=NS, workload="web", kind=kind, agent_timeout=0.5
                )
                await client.call(aapi.ENGAGE, request)
            except RpcError as exc:
                failure = exc
        assert failure is not None
        return failure

    with caplog.at_level(logging.INFO, logger="tele.audit"):
        denied = await engage("nobody", "ingest")
        assert denied.code is Code.PERMISSION_DENIED
        assert denied.message.startswith(
            "nobody may not create pods/portforward in namespace default"
        )
        replace = await engage("porter", "replace")
        assert replace.code is Code.PERMISSION_DENIED
        assert replace.message.startswith(
            "porter may not patch deployments.apps in namespace default"
        )
        # Allowed to port-forward: ingest gets past authorization (and fails later only for
        # want of an agent: there is no node here).
        ingest = await engage("porter", "ingest")
        assert ingest.code is not Code.PERMISSION_DENIED
    lines = [r.getMessage() for r in caplog.records if r.name == "tele.audit"]
    denials = [json.loads(line.split(" ", 1)[1]) for line in lines if '"denied"' in line]
    assert [(d["user"], d["needed"]) for d in denials] == [
        ("nobody", "create pods/portforward"),
        ("porter", "patch deployments.apps"),
    ]
    assert sum('"arrival"' in line for line in lines) == 2  # porter's; nobody never arrived


async def test_list_shows_only_the_workloads_the_caller_may_list(
    nursery: trio.Nursery, kube: KubeClient, sandbox_api: ClusterInfo
) -> None:
    manager = await start(nursery, kube)
    await workload_with_pod(kube, "web", injected=False, account="web")
    await wait_for(lambda: ("Deployment", NS, "web") in manager.view.workloads)
    tokens = {"admin": await admin_token(kube)}
    for user in ("nobody", "lister"):
        tokens[user] = f"{user}-{uuid.uuid4().hex}"
        sandbox_api.api.authn.add_static(tokens[user], User(user, ("system:authenticated",)))
    rbac = "rbac.authorization.k8s.io"
    await kube.request(
        "POST",
        f"/apis/{rbac}/v1/namespaces/{NS}/roles",
        body={
            "apiVersion": f"{rbac}/v1",
            "kind": "Role",
            "metadata": {"name": "list-deployments"},
            "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list"]}],
        },
    )
    await kube.request(
        "POST",
        f"/apis/{rbac}/v1/namespaces/{NS}/rolebindings",
        body={
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "lister"},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "list-deployments"},
            "subjects": [{"apiGroup": rbac, "kind": "User", "name": "lister"}],
        },
    )
    # Both may reach the manager (arriving needs create pods/portforward in its namespace).
    await kube.request(
        "POST",
        f"/apis/{rbac}/v1/namespaces/{NS}/roles",
        body={
            "apiVersion": f"{rbac}/v1",
            "kind": "Role",
            "metadata": {"name": "reach"},
            "rules": [{"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]}],
        },
    )
    await kube.request(
        "POST",
        f"/apis/{rbac}/v1/namespaces/{NS}/rolebindings",
        body={
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reach"},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "reach"},
            "subjects": [
                {"apiGroup": rbac, "kind": "User", "name": name} for name in ("nobody", "lister")
            ],
        },
    )

    async def listed(user: str) -> list[tuple[str, str]]:
        async with link(manager) as client:
            await client.call(api.AUTHENTICATE, api.AuthenticateRequest(token=tokens[user]))
            session = (await client.call(api.ARRIVE, IDENTITY)).session_id
            reply = await client.call(
                api.LIST_WORKLOADS, api.WorkloadsRequest(session_id=session, namespace=NS)
            )
        return [(w.kind, w.name) for w in reply.workloads]

    assert ("Deployment", "web") in await listed("admin")
    assert await listed("nobody") == []
    assert await listed("lister") == [("Deployment", "web")]


async def test_an_unauthenticated_link_holds_at_most_a_few_streams(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    manager = await start(nursery, kube)
    async with link(manager) as client, trio.open_nursery() as watchers:
        # Streams whose request body never comes: each would hold a handler until its deadline.
        answered: list[int] = []

        async def watch(index: int, stream: Any) -> None:
            await stream.receive_response()
            answered.append(index)

        for index in range(UNAUTHENTICATED_STREAMS + 1):
            stream = await client.link.open_stream(
                wire.request_headers(api.AUTHENTICATE.path, None)
            )
            watchers.start_soon(watch, index, stream)
        await wait_for(lambda: len(answered) == 1)  # one over the limit: refused at once
        with pytest.raises(RpcError) as refused:
            await client.call(api.VERSION, Empty())  # the limit is taken
        assert refused.value.code is Code.RESOURCE_EXHAUSTED
        assert len(answered) == 1
        watchers.cancel_scope.cancel()


async def allow_reaching_the_manager(kube: KubeClient, group: str) -> None:
    """Arriving needs create pods/portforward in the manager's namespace: grant it to `group`."""
    rbac = "rbac.authorization.k8s.io"
    name = f"reach-{uuid.uuid4().hex[:6]}"
    rule = {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]}
    await kube.request(
        "POST",
        f"/apis/{rbac}/v1/namespaces/{NS}/roles",
        body={
            "apiVersion": f"{rbac}/v1",
            "kind": "Role",
            "metadata": {"name": name},
            "rules": [rule],
        },
    )
    await kube.request(
        "POST",
        f"/apis/{rbac}/v1/namespaces/{NS}/rolebindings",
        body={
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": name},
            "subjects": [{"apiGroup": rbac, "kind": "Group", "name": group}],
        },
    )


async def _bare_pod(kube: KubeClient, name: str, account: str) -> dict[str, Any]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"serviceAccountName": account, "containers": [{"name": "c", "image": "c"}]},
    }
    created: dict[str, Any] = await kube.create(k8s.PODS, pod, NS)
    return created


async def test_a_revoked_credential_ends_its_links_and_sessions_within_the_session(
    nursery: trio.Nursery, kube: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15 item 1: a token that stops being valid mid-session (its ServiceAccount
    deleted) is noticed at the next review: the link is refused and closed, and the identity's
    sessions end after the grace. Another identity's session is untouched, and an identity
    whose old token died but which came back with a valid one on a new link (a rotated token)
    keeps its session."""
    manager = await start(nursery, kube, credential_recheck=0.2, revoked_grace=0.5)
    await allow_reaching_the_manager(kube, "system:serviceaccounts")
    leaver_token = await service_account_token(kube, "leaver")
    pod = await _bare_pod(kube, "rotator-pod", "rotator")
    bound = await service_account_token(kube, "rotator", pod=pod)
    fresh = await service_account_token(kube, "rotator")
    now = trio.current_time
    with caplog.at_level(logging.INFO, logger="tele.audit"):
        async with link(manager) as leaver, link(manager) as admin, link(manager) as rotator:
            await leaver.call(api.AUTHENTICATE, api.AuthenticateRequest(token=leaver_token))
            gone = (await leaver.call(api.ARRIVE, IDENTITY)).session_id
            await admin.call(
                api.AUTHENTICATE, api.AuthenticateRequest(token=await admin_token(kube))
            )
            stays = (await admin.call(api.ARRIVE, IDENTITY)).session_id
            await rotator.call(api.AUTHENTICATE, api.AuthenticateRequest(token=bound))
            rotated = (await rotator.call(api.ARRIVE, IDENTITY)).session_id

            await kube.delete(k8s.SERVICEACCOUNTS, "leaver", NS)
            await kube.delete(k8s.PODS, "rotator-pod", NS)  # the bound token dies with it
            await wait_for(lambda: not leaver.link.is_open and not rotator.link.is_open)
            async with link(manager) as renewed:  # the rotator's daemon: a new link, a new token
                await renewed.call(api.AUTHENTICATE, api.AuthenticateRequest(token=fresh))
                await wait_for(lambda: manager.auth.pending_revocations == 0, timeout=10)
                assert manager.sessions.get(gone, now()) is None
                await renewed.call(api.REMAIN, api.SessionRequest(session_id=rotated))
                await admin.call(api.REMAIN, api.SessionRequest(session_id=stays))
            # The revoked identity cannot come back with its dead token.
            async with link(manager) as again:
                with pytest.raises(RpcError) as refused:
                    await again.call(api.AUTHENTICATE, api.AuthenticateRequest(token=leaver_token))
                assert refused.value.code is Code.UNAUTHENTICATED
    assert manager.sessions.get(stays, now()) is not None
    assert manager.sessions.get(rotated, now()) is not None
    lines = [r.getMessage() for r in caplog.records if r.name == "tele.audit"]
    events = [json.loads(line.split(" ", 1)[1]) for line in lines]
    revoked = [e["user"] for e in events if e["event"] == "revoked"]
    assert sorted(revoked) == [
        f"system:serviceaccount:{NS}:leaver",
        f"system:serviceaccount:{NS}:rotator",
    ]
    ended = [e for e in events if e["event"] == "sessions-ended"]
    assert [(e["user"], e["sessions"]) for e in ended] == [
        (f"system:serviceaccount:{NS}:leaver", [gone])
    ]


def _tls_context(pair: Any | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # as the daemon: the port-forward says it is the manager
    if pair is not None:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "c").write_bytes(pair.cert_pem)
            Path(tmp, "k").write_bytes(pair.key_pem)
            ctx.load_cert_chain(Path(tmp, "c"), Path(tmp, "k"))
    return ctx


@asynccontextmanager
async def tls_link(manager: Manager, pair: Any | None) -> AsyncIterator[Client]:
    raw = await trio.open_tcp_stream("127.0.0.1", manager.bound_port)  # type: ignore[attr-defined]
    stream = trio.SSLStream(raw, _tls_context(pair), server_hostname="traffic-manager")
    await stream.do_handshake()
    async with open_client(stream) as client:
        yield client


async def test_a_client_certificate_of_the_clusters_ca_is_a_user(
    nursery: trio.Nursery, kube: KubeClient, sandbox_api: ClusterInfo
) -> None:
    """Issue 15 item 1, beyond Telepresence: a kubeconfig user with a client certificate
    proves it over TLS inside the tunnel; the manager checks it against the cluster's client
    CA (kube-system/extension-apiserver-authentication) and takes CN as the user, O as groups,
    as the API server does. Another CA's certificate, or none, is not a user."""
    manager = await start(nursery, kube)
    assert manager.link_tls.client_ca  # read from the ConfigMap at start
    await allow_reaching_the_manager(kube, "devs")
    pair = client_certificate(sandbox_api.ca, "cert-dev", ["devs"])
    async with tls_link(manager, pair) as client:
        session = (await client.call(api.ARRIVE, IDENTITY)).session_id
        await client.call(api.REMAIN, api.SessionRequest(session_id=session))
        # Its user is what RBAC is asked about.
        request = aapi.EngageRequest(
            session_id=session, namespace=NS, workload="nothing", kind="ingest"
        )
        with pytest.raises(RpcError) as denied:
            await client.call(aapi.ENGAGE, request)
        assert denied.value.code in (Code.PERMISSION_DENIED, Code.NOT_FOUND)
    owner = manager.sessions.get(session, trio.current_time())
    assert owner is not None and owner.owner.startswith("cert-dev\x00")
    # A TLS link without a certificate is nobody.
    async with tls_link(manager, None) as anonymous:
        with pytest.raises(RpcError) as refused:
            await anonymous.call(api.ARRIVE, IDENTITY)
        assert refused.value.code is Code.UNAUTHENTICATED
        assert "client certificate of the cluster's client CA" in refused.value.message
    # The same name from a CA of the attacker's ends the handshake (TLS 1.3: the client hears
    # of it on its first read).
    forged = client_certificate(SandboxCA.create(), "kubernetes-admin", ["system:masters"])
    failed: list[Exception] = []
    try:
        async with tls_link(manager, forged) as client:
            await client.call(api.ARRIVE, IDENTITY)
    except* (trio.BrokenResourceError, RpcError) as group:
        failed += group.exceptions
    assert failed and all(not isinstance(e, RpcError) or e.code is Code.UNAVAILABLE for e in failed)
    assert len(manager.sessions.sessions) == 1  # only cert-dev's


async def test_the_managers_own_expired_token_is_named_and_a_rotated_one_is_used(
    nursery: trio.Nursery,
    kube: KubeClient,
    sandbox_api: ClusterInfo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The manager reviews tokens with its pod's service-account token, re-read from the file
    the kubelet rotates. Once that token has expired (a kubelet that did not rotate it), a
    client hears that the manager's own credentials are at fault, not its token, and the
    manager's log says so; when the kubelet puts a new token in the file, the next review
    works without restarting anything."""
    from tele.k8s.client import open_kube_client
    from tele.k8s.incluster import in_cluster_connection

    rbac = "rbac.authorization.k8s.io"
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tm-sa"}}
    await kube.create(k8s.SERVICEACCOUNTS, account, NS)
    await kube.request(
        "POST",
        f"/apis/{rbac}/v1/clusterrolebindings",
        body={
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"tm-sa-{uuid.uuid4().hex[:6]}"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "tm-sa", "namespace": NS}],
        },
    )
    stored = sandbox_api.api.store.get("/serviceaccounts", NS, "tm-sa")
    assert stored is not None
    issuer = sandbox_api.api.authn.service_accounts
    account_dir = tmp_path / "serviceaccount"
    account_dir.mkdir()
    (account_dir / "ca.crt").write_bytes(sandbox_api.ca.cert_pem)
    (account_dir / "namespace").write_text(NS)
    token_file = account_dir / "token"
    token_file.write_text(issuer.issue(stored, seconds=600)[0])
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", sandbox_api.host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(sandbox_api.port))
    client_token = await admin_token(kube)
    async with open_kube_client(connection=in_cluster_connection(account_dir)) as own:
        manager = await start(nursery, own)
        async with link(manager) as client:
            me = await client.call(api.AUTHENTICATE, api.AuthenticateRequest(token=client_token))
            assert me.username == "kubernetes-admin"
        # 11 minutes pass for the API server: the manager's token expires, nothing replaces it.
        later = time.time() + 660
        monkeypatch.setattr(issuer, "_clock", lambda: later)
        caplog.set_level(logging.ERROR, logger="tele.manager.auth")
        async with link(manager) as client:
            with pytest.raises(RpcError) as refused:
                await client.call(
                    api.AUTHENTICATE,
                    api.AuthenticateRequest(token=await service_account_token(kube, "dev")),
                )
            # What `tele connect` shows: the arrival that follows says why.
            with pytest.raises(RpcError) as arrival:
                await client.call(api.ARRIVE, IDENTITY)
            assert "the traffic manager's own credentials" in arrival.value.message
        assert refused.value.code is Code.UNAVAILABLE
        assert "the traffic manager's own credentials" in refused.value.message
        assert "service-account token has expired" in refused.value.message
        assert any("own credentials" in r.getMessage() for r in caplog.records)
        # The kubelet rotates it: the next review uses the new token.
        token_file.write_text(issuer.issue(stored, seconds=600)[0])
        async with link(manager) as client:
            who = await client.call(
                api.AUTHENTICATE,
                api.AuthenticateRequest(token=await service_account_token(kube, "dev")),
            )
            assert who.username == f"system:serviceaccount:{NS}:dev"
