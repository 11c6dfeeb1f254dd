"""Volume mount policies (seed 004): Helm defaults, the workload's annotation (and the legacy
ones), what the agent container mounts, and what the agent tells clients."""

from __future__ import annotations

import json
from typing import Any

import jsonpatch
import pytest

from tele.agent.config import AgentSettings
from tele.agent.manager_link import identity
from tele.contracts.agentconfig import (
    AGENT_CONTAINER,
    TOKEN_DIR,
    NotInterceptable,
    generate,
    mount_policy,
    pod_patch,
)
from tele.manager.server import ManagerConfig

MOUNTS = [
    ("creds", "/etc/creds"),
    ("settings", "/etc/settings"),
    ("cache", "/var/cache/app"),
    ("tmp", "/tmp"),
    ("junk", "/junk"),
]


def workload(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {
            "template": {
                "metadata": {"labels": {"app": "api"}, "annotations": annotations},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "volumeMounts": [{"name": n, "mountPath": p} for n, p in MOUNTS],
                        }
                    ]
                },
            }
        },
    }


SERVICE = {
    "metadata": {"name": "api", "uid": "u"},
    "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": "http"}]},
}


def configure(annotations: dict[str, str], defaults: dict[str, str] | None = None) -> Any:
    return generate(
        workload=workload(annotations),
        services=[SERVICE],
        manager_namespace="ambassador",
        agent_image="tele/traffic-agent",
        default_mount_policies=defaults,
    )


def test_helm_defaults_then_the_annotation_decide_each_volume() -> None:
    config = configure(
        {
            "telepresence.io/mount-policies": json.dumps(
                {"cache": "RemoteReadOnly", "/tmp": "Local", "/etc/settings": "Remote"}
            ),
            "telepresence.getambassador.io/inject-ignore-volume-mounts": "junk",
        },
        defaults={"/etc": "RemoteReadOnly", "cache": "Ignore"},
    )
    [container] = config.containers
    assert container.mount_policies == {
        "/etc/creds": "RemoteReadOnly",  # Helm, by parent directory
        "/etc/settings": "Remote",  # the annotation's exact path beats Helm's parent
        "/var/cache/app": "RemoteReadOnly",  # the annotation beats Helm, by volume name
        "/tmp": "Local",
    }  # junk: Ignore, left out
    assert container.mounts == ["/etc/creds", "/etc/settings", "/var/cache/app"]


def test_without_policies_every_volume_is_remote() -> None:
    [container] = configure({}).containers
    assert set(container.mount_policies.values()) == {"Remote"}
    assert container.mounts == sorted(p for _, p in MOUNTS)


def test_the_agent_mounts_only_shared_volumes_read_only_ones_read_only() -> None:
    config = configure(
        {
            "telepresence.getambassador.io/mount-policies": json.dumps(
                {"creds": "RemoteReadOnly", "tmp": "Local", "junk": "Ignore"}
            )
        }
    )
    template = workload({})["spec"]["template"]
    pod = {"metadata": {"name": "api-1"}, "spec": template["spec"]}
    patched = jsonpatch.apply_patch(pod, pod_patch(pod, config))
    [agent] = [c for c in patched["spec"]["containers"] if c["name"] == AGENT_CONTAINER]
    assert sorted(agent["volumeMounts"], key=lambda m: m["name"]) == [
        {"name": "cache", "mountPath": "/tel_app_mounts/app/var/cache/app"},
        {"name": "creds", "mountPath": "/tel_app_mounts/app/etc/creds", "readOnly": True},
        {"name": "settings", "mountPath": "/tel_app_mounts/app/etc/settings"},
        # the pod's token for the manager (audience-bound), not an app volume
        {"name": "traffic-agent-token", "mountPath": TOKEN_DIR, "readOnly": True},
    ]
    settings = AgentSettings(name="api", pod_ip="10.0.0.1", config=config)
    told = identity(settings, {}, sftp_port=40022)
    assert told.sftp_port == 40022
    assert told.mount_policies["app"]["/tmp"] == "Local"
    assert "/junk" not in told.mount_policies["app"]


@pytest.mark.parametrize("value", ["not json", '["Remote"]', '{"creds": "Shared"}', '{"creds": 1}'])
def test_a_bad_annotation_makes_the_workload_not_interceptable(value: str) -> None:
    with pytest.raises(NotInterceptable, match="mount-policies annotation must be a JSON object"):
        configure({"telepresence.io/mount-policies": value})


def test_policy_lookup_prefers_volume_name_then_longest_path() -> None:
    policies = {"/": "Local", "/var": "Ignore", "/var/lib": "Remote", "data": "RemoteReadOnly"}
    assert mount_policy(policies, "data", "/var/lib/x") == "RemoteReadOnly"
    assert mount_policy(policies, "other", "/var/lib/x") == "Remote"
    assert mount_policy(policies, "other", "/var/library") == "Ignore"
    assert mount_policy(policies, "other", "/opt") == "Local"
    assert mount_policy({}, "other", "/opt") == "Remote"


def test_the_manager_reads_the_helm_value() -> None:
    config = ManagerConfig.from_env({"TELE_MOUNT_POLICIES": '{"/tmp": "Local"}'})
    assert config.mount_policies == {"/tmp": "Local"}
    assert ManagerConfig.from_env({}).mount_policies == {}


def test_only_the_manager_may_reach_an_agents_files() -> None:
    from tele.agent.manager_link import ManagerEngagements, tcp_connector

    config = configure({})
    settings = AgentSettings(name="api", pod_ip="10.0.0.1", config=config)
    source = ManagerEngagements(identity(settings, {}), tcp_connector("127.0.0.1", 1))
    assert not source.may_reach_files("10.244.0.5")  # before arrival: nobody
    source.session_id = "s"
    source.manager_ips = frozenset({"10.244.0.5"})
    assert source.may_reach_files("10.244.0.5")
    assert not source.may_reach_files("10.244.0.9")
    source.manager_ips = None  # a manager that does not know its address
    assert source.may_reach_files("10.244.0.9")
    assert ManagerConfig.from_env({"TELE_POD_IP": "10.244.0.5"}).pod_ip == "10.244.0.5"
