"""A hand-injected agent (`tele genyaml`) runs with the configuration its pod template gives it,
whatever agent port that names: the manager engages it by that configuration, not by its own
Helm agent.port (a mismatch would send the agent an engagement on a port it does not own)."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import msgspec
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
from tests.manager.test_engage import TEMPLATE, StandInAgent
from tests.manager.test_manager import IDENTITY, start_manager

SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "api", "namespace": "default", "uid": "svc-uid"},
    "spec": {
        "selector": {"app": "api"},
        "ports": [{"name": "web", "port": 80, "targetPort": "http"}],
    },
}


def _hand_injected(agent_port: int, **change: Any) -> dict[str, Any]:
    """The Deployment as `tele genyaml config --agent-port N` and `container` make it."""
    workload: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "api"}},
            "template": copy.deepcopy(TEMPLATE),
        },
    }
    generated = agentconfig.for_manual_injection(
        agentconfig.generate(
            workload=workload,
            services=[SERVICE],
            manager_namespace="default",
            agent_image="tele/traffic-manager:test",
            agent_port=agent_port,
        )
    )
    generated = msgspec.structs.replace(generated, **change)
    template = workload["spec"]["template"]
    template["metadata"]["annotations"] = {"telepresence.io/manually-injected": "true"}
    template["spec"]["containers"].append(
        {
            "name": agentconfig.AGENT_CONTAINER,
            "image": "tele/traffic-manager:test",
            "env": [agentconfig.literal_config_env(generated)],
        }
    )
    return workload


def _broken_config() -> dict[str, Any]:
    workload = _hand_injected(9950)
    agent = workload["spec"]["template"]["spec"]["containers"][-1]
    agent["env"] = [{"name": "_TEL_AGENT_CONFIG", "value": json.dumps({"agent_name": 7})}]
    return workload


async def _create(kube: KubeClient, workload: dict[str, Any]) -> None:
    await kube.create(k8s.DEPLOYMENTS, workload)
    await kube.create(k8s.SERVICES, SERVICE)


async def test_the_engagement_names_the_agent_port_of_the_hand_injected_configuration(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    await _create(kube, _hand_injected(9950))
    manager, client = await start_manager(nursery, kube)  # its Helm agent.port: 9900
    await wait_for(lambda: ("Deployment", "default", "api") in manager.view.workloads)
    await wait_for(lambda: ("default", "api") in manager.view.services)
    agent = StandInAgent(client)
    await nursery.start(agent.run)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    info = await client.call(
        aapi.ENGAGE,
        aapi.EngageRequest(
            session_id=session, namespace="default", workload="api", agent_timeout=10
        ),
    )
    assert (info.container, info.container_port) == ("app", 8080)
    await wait_for(lambda: [e.id for e in agent.engagements] == [info.id])
    assert agent.engagements[0].agent_port == 9950


@pytest.mark.parametrize(
    ("workload", "reason"),
    [
        (
            lambda: _hand_injected(9950, workload_name="other"),
            "api cannot be engaged: the traffic agent in its pod template was configured for "
            "Deployment default/other; write its configuration for this workload with "
            "`tele genyaml config`.",
        ),
        (
            _broken_config,
            "api cannot be engaged: the traffic-agent container of its pod template has an "
            "_TEL_AGENT_CONFIG that is not an agent configuration",
        ),
    ],
)
async def test_a_hand_injected_configuration_that_is_not_this_workloads_is_one_sentence(
    nursery: trio.Nursery, kube: KubeClient, workload: Any, reason: str
) -> None:
    await _create(kube, workload())
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("Deployment", "default", "api") in manager.view.workloads)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    with pytest.raises(RpcError) as refused:
        await client.call(
            aapi.ENGAGE,
            aapi.EngageRequest(session_id=session, namespace="default", workload="api"),
        )
    assert refused.value.code is Code.FAILED_PRECONDITION
    assert refused.value.message.startswith(reason)


async def _engage_without_an_agent(manager: Manager, client: Client) -> RpcError:
    """ENGAGE default/api once the manager sees the workload, with an agent_timeout of 0.5 s
    that no agent meets: the refusal (DEADLINE_EXCEEDED)."""
    await wait_for(lambda: ("Deployment", "default", "api") in manager.view.workloads)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    with pytest.raises(RpcError) as refused:
        await client.call(
            aapi.ENGAGE,
            aapi.EngageRequest(
                session_id=session, namespace="default", workload="api", agent_timeout=0.5
            ),
        )
    assert refused.value.code is Code.DEADLINE_EXCEEDED
    return refused.value


async def test_a_hand_injected_agent_configured_for_another_manager_port_is_named_as_the_cause(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    """`tele genyaml config --manager-port` must be the Helm apiPort: with another one the
    agent never arrives, and the error says where it is looking for the manager."""
    await _create(kube, _hand_injected(9950, manager_port=8099))
    manager, client = await start_manager(nursery, kube)
    # As deployed, with its apiPort (the test's manager listens on an ephemeral port).
    settings = dataclasses.replace(manager.engagements._settings, manager_port=8081)
    manager.engagements._settings = settings
    refused = await _engage_without_an_agent(manager, client)
    assert refused.message == (
        "No traffic agent of Deployment default/api arrived within 0.5s: its hand-injected "
        "traffic agent is configured to reach the traffic manager at traffic-manager.default:"
        "8099, but it listens at traffic-manager.default:8081 (Helm apiPort); write the agent's "
        "configuration again with `tele genyaml config` while connected, and apply it."
    )


async def test_a_hand_injected_agent_configured_for_this_manager_is_not_said_to_miss_it(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    await _create(kube, _hand_injected(9950))
    manager, client = await start_manager(nursery, kube)
    refused = await _engage_without_an_agent(manager, client)
    assert refused.message.startswith(
        "No traffic agent of Deployment default/api arrived within 0.5s: it has no running pod;"
    )
