"""The manager's side of `tele gather-logs` and `tele loglevel`, attacked through its real port:
a caller gets only the logs RBAC lets it read (`get pods/log`), and only the manager's and the
agents' (never another container's log read with the manager's permissions); only a caller who
may read the manager's log may change its level."""

from __future__ import annotations

import uuid

import pytest
import trio

from tele.contracts.agentconfig import AGENT_CONTAINER
from tele.k8s.client import KubeClient
from tele.rpc import manager_api as api
from tele.rpc.errors import Code, RpcError
from tele.sandbox.apiserver.auth import User
from tele.sandbox.cluster import ClusterInfo
from tele.testing.waits import wait_for
from tests.manager.test_auth import (
    IDENTITY,
    NS,
    admin_token,
    allow_reaching_the_manager,
    link,
    start,
    workload_with_pod,
)


async def test_logs_follow_rbac_and_only_agents_and_the_manager_are_read(
    nursery: trio.Nursery, kube: KubeClient, sandbox_api: ClusterInfo
) -> None:
    manager = await start(nursery, kube)
    injected = await workload_with_pod(kube, "shop", injected=True, account="shop")
    plain = await workload_with_pod(kube, "web", injected=False, account="web")
    pod = injected["metadata"]["name"]
    await wait_for(lambda: (NS, pod) in manager.view.pods)
    nobody = f"nobody-{uuid.uuid4().hex}"
    sandbox_api.api.authn.add_static(nobody, User("nobody", ("system:authenticated",)))
    await allow_reaching_the_manager(kube, "system:authenticated")  # to arrive at all

    async def as_user(token: str) -> tuple[api.LogSources, RpcError]:
        async with link(manager) as client:
            await client.call(api.AUTHENTICATE, api.AuthenticateRequest(token=token))
            session = (await client.call(api.ARRIVE, IDENTITY)).session_id
            found = await client.call(api.LOG_SOURCES, api.LogSourcesRequest(session_id=session))
            source = api.LogSource(
                kind="traffic-agent", pod=pod, namespace=NS, container=AGENT_CONTAINER
            )
            with pytest.raises(RpcError) as refused:
                await client.call(api.POD_LOG, api.PodLogRequest(session_id=session, source=source))
        return found, refused.value

    found, refused = await as_user(nobody)
    assert found.sources == []
    denial = "nobody may not get pods/log in namespace default"
    assert [p.split(" (")[0].rstrip(".") for p in found.problems] == [
        f"The traffic manager's log is not yours to read: {denial}",
        f"The agents' logs in namespace default: {denial}",
    ]
    assert refused.code is Code.PERMISSION_DENIED

    found, refused = await as_user(await admin_token(kube))
    assert found.sources == [
        api.LogSource(
            kind="traffic-agent", pod=pod, namespace=NS, container=AGENT_CONTAINER, workload="shop"
        )
    ]
    assert found.problems == ["No traffic manager pod found in namespace default."]
    # (the sandbox without nodes serves no container logs: the manager says so)
    assert refused.code is Code.UNAVAILABLE
    assert refused.message.startswith(f"cannot read default/{pod}'s log")

    # Whatever else a caller names is not read with the manager's permissions.
    async with link(manager) as client:
        await client.call(api.AUTHENTICATE, api.AuthenticateRequest(token=await admin_token(kube)))
        session = (await client.call(api.ARRIVE, IDENTITY)).session_id
        for source in (
            api.LogSource(kind="traffic-agent", pod=pod, namespace=NS, container="app"),
            api.LogSource(
                kind="traffic-agent",
                pod=plain["metadata"]["name"],
                namespace=NS,
                container=AGENT_CONTAINER,
            ),
            api.LogSource(
                kind="traffic-manager", pod=pod, namespace=NS, container="traffic-manager"
            ),
            api.LogSource(
                kind="traffic-manager",
                pod="kube-apiserver",
                namespace="kube-system",
                container="traffic-manager",
            ),
        ):
            with pytest.raises(RpcError) as not_found:
                await client.call(api.POD_LOG, api.PodLogRequest(session_id=session, source=source))
            assert not_found.value.code is Code.NOT_FOUND, source
            assert "is neither a traffic manager nor an agent pod" in not_found.value.message


async def test_the_managers_log_level_is_set_by_who_may_read_its_log(
    nursery: trio.Nursery, kube: KubeClient, sandbox_api: ClusterInfo
) -> None:
    manager = await start(nursery, kube)
    nobody = f"nobody-{uuid.uuid4().hex}"
    sandbox_api.api.authn.add_static(nobody, User("nobody", ("system:authenticated",)))
    await allow_reaching_the_manager(kube, "system:authenticated")  # to arrive at all

    async def set_level(
        token: str, level: str, duration: float = 0
    ) -> api.LogLevelReply | RpcError:
        async with link(manager) as client:
            await client.call(api.AUTHENTICATE, api.AuthenticateRequest(token=token))
            session = (await client.call(api.ARRIVE, IDENTITY)).session_id
            request = api.LogLevelRequest(session_id=session, level=level, duration=duration)
            try:
                return await client.call(api.SET_LOG_LEVEL, request)
            except RpcError as exc:
                return exc

    refused = await set_level(nobody, "debug")
    assert isinstance(refused, RpcError) and refused.code is Code.PERMISSION_DENIED
    assert manager.log_levels.controller.current != "debug"
    admin = await admin_token(kube)
    bad = await set_level(admin, "loud")
    assert isinstance(bad, RpcError) and bad.code is Code.INVALID_ARGUMENT
    before = manager.log_levels.controller.current
    try:
        reply = await set_level(admin, "debug", 60)
        assert reply == api.LogLevelReply(level="debug", previous=before, agents=0)
        assert manager.log_levels.controller.current == "debug"
        assert manager.log_levels.controller.revert_in() is not None
    finally:
        manager.log_levels.controller.set(before, 0)
