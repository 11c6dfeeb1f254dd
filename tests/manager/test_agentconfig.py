"""Agent configuration and injection, as plain data: which Service ports lead to which
containers, and the JSON patch that takes the ports over."""

from __future__ import annotations

import json
import logging
from typing import Any

import jsonpatch
import pytest

from tele.contracts import agentconfig
from tele.contracts.agentconfig import (
    AGENT_CONTAINER,
    CONFIG_ANNOTATION,
    INIT_CONTAINER,
    NotInterceptable,
    generate,
    pod_patch,
)


def deployment(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {
            "template": {
                "metadata": {"labels": {"app": "api"}, "annotations": annotations or {}},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": "tele-sandbox/echo",
                            "ports": [
                                {"name": "http", "containerPort": 8080},
                                {"containerPort": 9090},
                            ],
                            "env": [{"name": "DB", "value": "pg"}],
                            "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
                        },
                        {"name": "sidecar", "image": "tele-sandbox/worker"},
                    ]
                },
            }
        },
    }


def service(name: str, target: int | str, port: int = 80, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": {
            "selector": {"app": "api"},
            "ports": [{"name": "web", "port": port, "targetPort": target}],
            **spec,
        },
    }


def test_every_service_port_leading_to_a_container_is_in_the_config() -> None:
    services = [service("api", "http"), service("metrics", 9090, 9090), service("other", 1, 1)]
    services[2]["spec"]["selector"] = {"app": "someone-else"}
    config = generate(
        workload=deployment(),
        services=services,
        manager_namespace="ambassador",
        agent_image="tele/traffic-agent",
    )
    assert config.manager_host == "traffic-manager.ambassador"
    [(container, named), (_, numeric)] = config.intercepts()
    assert container == "app"
    assert (named.service_name, named.container_port_name, named.target_port_numeric) == (
        "api",
        "http",
        False,
    )
    assert (named.container_port, named.agent_port) == (8080, 9900)
    assert (numeric.service_name, numeric.container_port, numeric.target_port_numeric) == (
        "metrics",
        9090,
        True,
    )
    assert numeric.agent_port == 9901
    assert [c.env_prefix for c in config.containers] == ["A_", "B_"]


def test_no_service_or_disabled_is_not_interceptable(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(NotInterceptable, match="no Service"):
        generate(workload=deployment(), services=[], manager_namespace="a", agent_image="i")
    disabled = deployment({"telepresence.io/inject-traffic-agent": "disabled"})
    with pytest.raises(NotInterceptable, match="disables"):
        generate(
            workload=disabled,
            services=[service("api", "http")],
            manager_namespace="a",
            agent_image="i",
        )
    legacy = deployment({"telepresence.getambassador.io/inject-traffic-agent": "enabled"})
    agentconfig._legacy_warned.clear()  # said once per process: forget earlier tests
    with caplog.at_level(logging.WARNING, logger="tele.contracts.agentconfig"):
        for _ in range(3):
            config = generate(workload=legacy, services=[], manager_namespace="a", agent_image="i")
            assert config.containers
    # Read, and said once in the log (the webhook asks on every pod).
    [warning] = [r.getMessage() for r in caplog.records]
    assert "uses the old annotation telepresence.getambassador.io/inject-traffic-agent" in warning
    assert "rename it to telepresence.io/inject-traffic-agent" in warning


def test_pod_patch_takes_named_ports_over_and_redirects_numeric_ones() -> None:
    services = [service("api", "http"), service("metrics", 9090, 9090)]
    workload = deployment()
    config = generate(
        workload=workload,
        services=services,
        manager_namespace="ambassador",
        agent_image="tele/traffic-agent",
    )
    pod = {
        "metadata": {"name": "api-1", "namespace": "shop"},
        "spec": workload["spec"]["template"]["spec"],
    }
    patched = jsonpatch.apply_patch(pod, pod_patch(pod, config))
    app, _sidecar, agent = patched["spec"]["containers"]
    assert app["ports"][0]["name"] == "tm-http"
    assert app["readinessProbe"]["httpGet"]["port"] == 8080  # the name moved to the agent
    assert agent["name"] == AGENT_CONTAINER
    assert {"name": "http", "containerPort": 9900, "protocol": "TCP"} in agent["ports"]
    assert {"containerPort": 9901, "protocol": "TCP"} in agent["ports"]
    assert {"name": "_TEL_APP_A_DB", "value": "pg"} in agent["env"]
    assert {"name": "cfg", "mountPath": "/tel_app_mounts/app/etc/cfg"} in agent["volumeMounts"]
    [init] = patched["spec"]["initContainers"]
    assert init["name"] == INIT_CONTAINER
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert "_TEL_AGENT_CONFIG" in [e["name"] for e in init["env"]]
    stored = json.loads(patched["metadata"]["annotations"][CONFIG_ANNOTATION])
    assert stored["workload_name"] == "api" and len(stored["containers"][0]["intercepts"]) == 2
    # Injecting twice changes nothing.
    assert pod_patch(patched, config) == []


def test_only_named_ports_need_no_privileges() -> None:
    workload = deployment()
    config = generate(
        workload=workload, services=[service("api", "http")], manager_namespace="a", agent_image="i"
    )
    pod = {
        "metadata": {"name": "p", "annotations": {}},
        "spec": workload["spec"]["template"]["spec"],
    }
    patched = jsonpatch.apply_patch(pod, pod_patch(pod, config))
    assert "initContainers" not in patched["spec"]


def test_a_replaced_container_leaves_the_pod_and_the_agent_owns_its_ports() -> None:
    # Two Service ports lead to the same container port 8080, one to 9090 (numeric target).
    services = [service("api", "http"), service("alias", "http", 81), service("metrics", 9090)]
    workload = deployment()
    plain = generate(workload=workload, services=services, manager_namespace="a", agent_image="i")
    config = generate(
        workload=workload,
        services=services,
        manager_namespace="a",
        agent_image="i",
        replaced=["app"],
    )
    assert config.replaced() == ["app"]
    [app, sidecar] = config.containers
    # Each container port once, owned directly (agent port = container port), names kept.
    assert sorted((i.container_port, i.agent_port) for i in app.intercepts) == [
        (8080, 8080),
        (9090, 9090),
    ]
    assert sidecar.intercepts == plain.containers[1].intercepts  # other containers unchanged
    pod = {"metadata": {"name": "p"}, "spec": workload["spec"]["template"]["spec"]}
    patched = jsonpatch.apply_patch(pod, pod_patch(pod, config))
    assert [c["name"] for c in patched["spec"]["containers"]] == ["sidecar", AGENT_CONTAINER]
    agent = patched["spec"]["containers"][1]
    assert agent["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"containerPort": 9090, "protocol": "TCP"},
    ]
    # The app's env and volumes still reach the agent; no redirect (no NET_ADMIN) is needed.
    assert {"name": "_TEL_APP_A_DB", "value": "pg"} in agent["env"]
    assert {"name": "cfg", "mountPath": "/tel_app_mounts/app/etc/cfg"} in agent["volumeMounts"]
    assert "initContainers" not in patched["spec"]


def test_a_worker_without_ports_can_be_configured_for_replace_and_ingest() -> None:
    workload = deployment()
    workload["spec"]["template"]["spec"]["containers"] = [{"name": "w", "image": "worker"}]
    with pytest.raises(NotInterceptable):
        generate(workload=workload, services=[], manager_namespace="a", agent_image="i")
    config = generate(
        workload=workload,
        services=[],
        manager_namespace="a",
        agent_image="i",
        replaced=["w"],
        require_service=False,
    )
    pod = {"metadata": {"name": "p"}, "spec": workload["spec"]["template"]["spec"]}
    patched = jsonpatch.apply_patch(pod, pod_patch(pod, config))
    assert [c["name"] for c in patched["spec"]["containers"]] == [AGENT_CONTAINER]
    assert patched["spec"]["containers"][0]["ports"] == []


def test_a_headless_services_named_port_is_redirected_not_renamed() -> None:
    # Its callers dial pod IPs and the container port number: a renamed port would not catch
    # them, the init container's redirect does.
    workload = deployment()
    config = generate(
        workload=workload,
        services=[service("api", "http", clusterIP="None")],
        manager_namespace="a",
        agent_image="i",
    )
    [intercept] = config.containers[0].intercepts
    assert intercept.headless and not intercept.target_port_numeric
    pod = {"metadata": {"name": "p"}, "spec": workload["spec"]["template"]["spec"]}
    patched = jsonpatch.apply_patch(pod, pod_patch(pod, config))
    app, _sidecar, agent = patched["spec"]["containers"]
    assert app["ports"][0]["name"] == "http"  # not renamed
    assert {"containerPort": 9900, "protocol": "TCP"} in agent["ports"]
    [init] = patched["spec"]["initContainers"]
    assert init["name"] == INIT_CONTAINER


def test_udp_ports_named_and_numeric_are_taken_over() -> None:
    workload = deployment()
    containers = workload["spec"]["template"]["spec"]["containers"]
    containers[0]["ports"] += [
        {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
        {"containerPort": 5354, "protocol": "UDP"},
    ]
    udp = {
        "metadata": {"name": "dns", "uid": "uid-dns"},
        "spec": {
            "selector": {"app": "api"},
            "ports": [
                {"name": "named", "port": 53, "targetPort": "dns", "protocol": "UDP"},
                {"name": "numeric", "port": 54, "targetPort": 5354, "protocol": "UDP"},
            ],
        },
    }
    config = generate(workload=workload, services=[udp], manager_namespace="a", agent_image="i")
    assert [
        (i.protocol, i.container_port, i.agent_port) for i in config.containers[0].intercepts
    ] == [
        ("UDP", 5353, 9900),
        ("UDP", 5354, 9901),
    ]
    pod = {"metadata": {"name": "p"}, "spec": workload["spec"]["template"]["spec"]}
    patched = jsonpatch.apply_patch(pod, pod_patch(pod, config))
    app, _sidecar, agent = patched["spec"]["containers"]
    assert {"name": "tm-dns", "containerPort": 5353, "protocol": "UDP"} in app["ports"]
    assert {"name": "dns", "containerPort": 9900, "protocol": "UDP"} in agent["ports"]
    assert {"containerPort": 9901, "protocol": "UDP"} in agent["ports"]


def test_inject_service_name_and_ports_choose_what_leads_to_the_agent() -> None:
    services = [service("api", "http"), service("metrics", 9090, 9090)]
    chosen = generate(
        workload=deployment({"telepresence.io/inject-service-name": "metrics"}),
        services=services,
        manager_namespace="a",
        agent_image="i",
    )
    assert [i.service_name for _, i in chosen.intercepts()] == ["metrics"]
    by_port = generate(
        workload=deployment({"telepresence.io/inject-service-ports": "web"}),
        services=[
            {
                "metadata": {"name": "api", "uid": "u"},
                "spec": {
                    "selector": {"app": "api"},
                    "ports": [
                        {"name": "web", "port": 80, "targetPort": "http"},
                        {"name": "admin", "port": 9090, "targetPort": 9090},
                    ],
                },
            }
        ],
        manager_namespace="a",
        agent_image="i",
    )
    assert [i.service_port_name for _, i in by_port.intercepts()] == ["web"]
    with pytest.raises(NotInterceptable, match="names Service nope, which does not select"):
        generate(
            workload=deployment({"telepresence.io/inject-service-name": "nope"}),
            services=services,
            manager_namespace="a",
            agent_image="i",
        )


def test_inject_container_ports_are_taken_without_a_service_and_redirected() -> None:
    workload = deployment({"telepresence.io/inject-container-ports": "9090"})
    config = generate(workload=workload, services=[], manager_namespace="a", agent_image="i")
    [(container, intercept)] = config.intercepts()
    assert (container, intercept.service_name, intercept.container_port) == ("app", "", 9090)
    assert intercept.target_port_numeric  # callers dial the pod IP: redirected
    with pytest.raises(NotInterceptable, match="names nope, which no container declares"):
        generate(
            workload=deployment({"telepresence.io/inject-container-ports": "nope"}),
            services=[],
            manager_namespace="a",
            agent_image="i",
        )


def test_a_manually_injected_pod_is_left_alone_and_its_config_redirects_every_port() -> None:
    workload = deployment({"telepresence.io/manually-injected": "true"})
    assert agentconfig.manually_injected(workload["spec"]["template"])
    config = agentconfig.for_manual_injection(
        generate(
            workload=workload,
            services=[service("api", "http")],
            manager_namespace="a",
            agent_image="i",
        )
    )
    assert all(i.target_port_numeric for _, i in config.intercepts())
    init = agentconfig.init_container(config, config_env=agentconfig.literal_config_env(config))
    [env] = [e for e in init["env"] if e["name"] == "_TEL_AGENT_CONFIG"]
    assert json.loads(env["value"])["workload_name"] == "api"


def test_a_workload_on_the_nodes_network_gets_no_agent() -> None:
    workload = deployment()
    workload["spec"]["template"]["spec"]["hostNetwork"] = True
    with pytest.raises(NotInterceptable, match="use the node's network"):
        generate(
            workload=workload,
            services=[service("api", "http")],
            manager_namespace="a",
            agent_image="i",
            require_service=False,
        )
