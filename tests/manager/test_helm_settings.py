"""Helm values that shape agents take effect: each goes chart -> TELE_* env -> ManagerConfig ->
the injected pod (or the engagement), one test per value (issue 19)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import trio
from cryptography import x509

from tele.config import network_from_manager
from tele.contracts import agentconfig
from tele.daemon.locate import api_port
from tele.errors import UserError
from tele.helm.chart import Chart
from tele.helm.errors import ValuesError
from tele.k8s import client as k8s
from tele.k8s.client import KubeClient
from tele.manager.server import Manager, ManagerConfig
from tele.manager.webhook import ensure_tls
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.errors import Code, RpcError
from tele.testing.waits import wait_for
from tests.helm.test_chart import find, render
from tests.manager.test_engage import TEMPLATE, create_workload
from tests.manager.test_manager import IDENTITY, start_manager
from tests.manager.test_webhook import WEBHOOK, webhook_config

Obj = dict[str, Any]

SERVICES = [
    {
        "metadata": {"name": "api", "namespace": "default", "uid": "u1"},
        "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
]
WORKLOAD = {
    "kind": "Deployment",
    "metadata": {"name": "api", "namespace": "default"},
    "spec": {"template": TEMPLATE},
}


@pytest.fixture(scope="module")
def chart() -> Chart:
    return Chart()


def config_from_chart(chart: Chart, values: Obj) -> ManagerConfig:
    """The manager's configuration as the chart with `values` makes it."""
    objects = render(chart, values)
    deployment = find(objects, "Deployment", "traffic-manager", "ambassador")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return ManagerConfig.from_env({e["name"]: e["value"] for e in env if "value" in e})


def injected(config: ManagerConfig) -> tuple[agentconfig.AgentConfig, list[Obj]]:
    """The agent configuration and the pod patch the manager's injector makes for WORKLOAD."""
    manager = Manager(config, kube=None)  # type: ignore[arg-type]  # nothing here calls it
    settings = manager.agent_settings()
    made = settings.config(WORKLOAD, SERVICES, (), require_service=False)
    pod = {"metadata": {"name": "api-x"}, "spec": json.loads(json.dumps(TEMPLATE["spec"]))}
    return made, agentconfig.pod_patch(pod, made)


def agent_container(patch: list[Obj]) -> Obj:
    for op in patch:
        if op["path"] == "/spec/containers/-":
            return dict(op["value"])
    raise AssertionError("no agent container in the patch")


def test_agent_log_level_is_the_agents_own(chart: Chart) -> None:
    config = config_from_chart(chart, {"logLevel": "info", "agent": {"logLevel": "debug"}})
    made, patch = injected(config)
    env = {e["name"]: e.get("value") for e in agent_container(patch)["env"]}
    assert env["LOG_LEVEL"] == "debug"  # what tele.agent.__main__ sets its logging from
    assert made.log_level == "debug"
    # Unset: the manager's level.
    _, patch = injected(config_from_chart(chart, {"logLevel": "warning"}))
    assert {e["name"]: e.get("value") for e in agent_container(patch)["env"]}["LOG_LEVEL"] == (
        "warning"
    )


def test_agent_resources_go_to_the_agent_container(chart: Chart) -> None:
    resources = {"limits": {"cpu": "200m", "memory": "128Mi"}, "requests": {"cpu": "50m"}}
    _, patch = injected(config_from_chart(chart, {"agent": {"resources": resources}}))
    assert agent_container(patch)["resources"] == resources
    _, patch = injected(config_from_chart(chart, {}))
    assert "resources" not in agent_container(patch)


def test_agent_pull_policy_goes_to_the_agent_and_its_init_container(chart: Chart) -> None:
    values = {"agent": {"image": {"pullPolicy": "Always"}}}
    template = json.loads(json.dumps(TEMPLATE))
    config = config_from_chart(chart, values)
    manager = Manager(config, kube=None)  # type: ignore[arg-type]
    numeric = [{"metadata": {"name": "api"}, "spec": {**SERVICES[0]["spec"]}}]  # type: ignore[dict-item]
    numeric[0]["spec"]["ports"] = [{"port": 80, "targetPort": 8080}]
    made = manager.agent_settings().config(WORKLOAD, numeric, (), require_service=True)
    patch = agentconfig.pod_patch({"metadata": {}, "spec": template["spec"]}, made)
    assert agent_container(patch)["imagePullPolicy"] == "Always"
    (init,) = [op["value"] for op in patch if op["path"].startswith("/spec/initContainers")]
    assert (init[0] if isinstance(init, list) else init)["imagePullPolicy"] == "Always"


def test_api_port_reaches_the_agents_and_the_daemon(chart: Chart) -> None:
    """A non-default `apiPort`: agents are told to dial it, and the daemon port-forwards to the
    manager pod's `api` container port (not a hard-wired 8081)."""
    objects = render(chart, {"apiPort": 9081})
    deployment = find(objects, "Deployment", "traffic-manager", "ambassador")
    pod = {"spec": deployment["spec"]["template"]["spec"]}
    assert api_port(pod) == 9081
    service = find(objects, "Service", "traffic-manager", "ambassador")
    assert service["spec"]["ports"][0]["port"] == 9081
    made, _ = injected(config_from_chart(chart, {"apiPort": 9081}))
    assert (made.manager_host, made.manager_port) == ("traffic-manager.ambassador", 9081)


async def test_agent_arrival_bounds_the_wait_for_an_agent(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube, agent_arrival=0.3)
    await wait_for(lambda: ("Deployment", "default", "api") in manager.view.workloads)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    request = aapi.EngageRequest(
        session_id=session, namespace="default", workload="api", agent_timeout=60
    )
    started = trio.current_time()
    with pytest.raises(RpcError) as refused:
        await client.call(aapi.ENGAGE, request)
    assert refused.value.code is Code.DEADLINE_EXCEEDED
    assert "arrived within 0.3s" in refused.value.message
    assert trio.current_time() - started < 30  # the chart's value, not the client's 60 s


async def test_inject_policy_when_enabled_refuses_an_unannotated_workload(
    nursery: trio.Nursery, kube: KubeClient, chart: Chart
) -> None:
    assert config_from_chart(
        chart, {"agentInjector": {"injectPolicy": "WhenEnabled"}}
    ).inject_policy == ("WhenEnabled")
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube, inject_policy="WhenEnabled")
    await wait_for(lambda: ("Deployment", "default", "api") in manager.view.workloads)
    session = (await client.call(api.ARRIVE, IDENTITY)).session_id
    with pytest.raises(RpcError) as refused:
        await client.call(
            aapi.ENGAGE,
            aapi.EngageRequest(session_id=session, namespace="default", workload="api"),
        )
    assert refused.value.code is Code.FAILED_PRECONDITION
    assert refused.value.message == (
        "The traffic manager injects agents only into workloads whose pod template is annotated "
        "telepresence.io/inject-traffic-agent: enabled (Helm agentInjector.injectPolicy "
        "WhenEnabled); annotate Deployment default/api first."
    )
    assert ("Deployment", "default", "api") not in manager.agent_workloads
    # Nor does the injector give it an agent on demand (were it engaged by an older manager).
    manager.agent_workloads.add(("Deployment", "default", "api"))
    await wait_for(lambda: ("default", "api-1-a") in manager.view.pods)
    pod = manager.view.pods[("default", "api-1-a")]
    review = {"operation": "CREATE", "kind": {"kind": "Pod"}, "namespace": "default", "object": pod}
    assert await manager.injector(review) == {"allowed": True}
    # The same manager with OnDemand injects it.
    settings = dataclasses.replace(manager.agent_settings(), inject_policy="OnDemand")
    on_demand = dataclasses.replace(manager.injector, settings=settings)
    assert (await on_demand(review)).get("patchType") == "JSONPatch"


def test_client_dns_and_routing_values_are_delivered_to_clients(chart: Chart) -> None:
    client = {
        "dns": {
            "includeSuffixes": [".corp.example"],
            "excludeSuffixes": [".com"],
            "excludes": ["metadata.internal"],
            "mappings": [{"name": "db.local", "aliasFor": "postgres.data"}],
            "lookupTimeout": "2s",
        },
        "routing": {"alsoProxySubnets": ["10.10.0.0/16"], "neverProxySubnets": ["10.96.5.0/24"]},
    }
    config = config_from_chart(chart, {"client": client})
    delivered = Manager(config, kube=None).cluster_info().client_config  # type: ignore[arg-type]
    network = network_from_manager(delivered)  # as the client reads it
    assert network.dns.mappings is not None and network.dns.mappings[0].alias_for == (
        "postgres.data"
    )
    assert network.dns.lookup_timeout == 2.0
    assert network.routing.also_proxy_subnets == ["10.10.0.0/16"]


def test_bad_client_values_are_refused_by_the_schema_or_the_manager(chart: Chart) -> None:
    with pytest.raises(ValuesError) as refused:
        render(chart, {"client": {"dns": {"mappings": [{"name": "db.local"}]}}})
    assert "client.dns.mappings" in str(refused.value)
    bad = {"dns": {"mappings": [{"name": "db.local", "aliasFor": "no such name!"}]}}
    with pytest.raises(UserError) as refused_by_manager:
        ManagerConfig.from_env({"TELE_CLIENT_CONFIG": json.dumps(bad)})
    assert str(refused_by_manager.value) == (
        "In the traffic manager's Helm values (client.*), the DNS mapping of db.local is an "
        "alias for 'no such name!', which is neither a DNS name nor an IP address."
    )


async def test_agent_injector_name_is_the_name_its_certificate_covers(
    kube: KubeClient, chart: Chart
) -> None:
    config = config_from_chart(chart, {"agentInjector": {"name": "my-injector"}})
    assert config.webhook_service == "my-injector"
    objects = render(chart, {"agentInjector": {"name": "my-injector"}})
    hook = next(o for o in objects if o["kind"] == "MutatingWebhookConfiguration")
    assert hook["webhooks"][0]["clientConfig"]["service"]["name"] == "my-injector"
    tls = await ensure_tls(kube, "default", "tls-secret", service=config.webhook_service)
    cert = x509.load_pem_x509_certificate(tls.pair.cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "my-injector.default.svc" in names.get_values_for_type(x509.DNSName)


async def test_webhook_service_path_is_where_the_webhook_answers(
    nursery: trio.Nursery, kube: KubeClient, chart: Chart
) -> None:
    values = {"agentInjector": {"webhook": {"servicePath": "/inject-agents"}}}
    assert config_from_chart(chart, values).webhook_path == "/inject-agents"
    hook = next(o for o in render(chart, values) if o["kind"] == "MutatingWebhookConfiguration")
    assert hook["webhooks"][0]["clientConfig"]["service"]["path"] == "/inject-agents"
    await kube.create(k8s.MUTATING_WEBHOOKS, webhook_config("https://127.0.0.1:1/x"))
    config = ManagerConfig(
        auth_mode="disabled",
        namespace="default",
        api_port=0,
        api_host="127.0.0.1",
        webhook_port=0,
        webhook_name=WEBHOOK,
        webhook_extra_names=("127.0.0.1",),
        webhook_path="/inject-agents",
    )
    manager = Manager(config, kube)
    await nursery.start(manager.serve)
    assert manager.webhook is not None
    url = f"https://127.0.0.1:{manager.webhook_port}/inject-agents"
    patch = [{"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": url}]
    await kube.patch(k8s.MUTATING_WEBHOOKS, WEBHOOK, patch, patch_type="json")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "tele-sandbox/echo"}]},
    }
    await kube.create(k8s.PODS, pod)  # failurePolicy Fail: a 404 would refuse the pod
    assert manager.webhook.reviews == 1
