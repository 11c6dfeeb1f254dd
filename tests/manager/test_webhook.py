"""The manager's agent injector endpoint: TLS kept in a Secret, caBundle patched, and the
sandbox API server calling it for pod creation exactly as Kubernetes does."""

from __future__ import annotations

import base64

import pytest
import trio

from tele.k8s import client as k8s
from tele.k8s.client import KubeClient
from tele.manager.server import Manager, ManagerConfig
from tele.testing.waits import wait_for

WEBHOOK = "agent-injector-webhook-default"


async def start(nursery: trio.Nursery, kube: KubeClient) -> Manager:
    config = ManagerConfig(
        auth_mode="disabled",
        namespace="default",
        api_port=0,
        api_host="127.0.0.1",
        webhook_port=0,
        webhook_name=WEBHOOK,
        # Reached by URL here (the sandbox's service network is not part of this test).
        webhook_extra_names=("127.0.0.1",),
    )
    manager = Manager(config, kube)
    await nursery.start(manager.serve)
    return manager


def webhook_config(url: str) -> dict[str, object]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK},
        "webhooks": [
            {
                "name": "agent-injector.tele.io",
                "clientConfig": {"url": url},
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                    }
                ],
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
            }
        ],
    }


async def test_webhook_tls_ca_bundle_and_reviews(nursery: trio.Nursery, kube: KubeClient) -> None:
    # The configuration exists before the manager (as the chart installs it), without a caBundle;
    # its URL is filled in once the manager's port is known.
    await kube.create(k8s.MUTATING_WEBHOOKS, webhook_config("https://127.0.0.1:1/traffic-agent"))
    manager = await start(nursery, kube)
    assert manager.webhook is not None and manager.webhook_port
    url = f"https://127.0.0.1:{manager.webhook_port}/traffic-agent"
    patch = [{"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": url}]
    await kube.patch(k8s.MUTATING_WEBHOOKS, WEBHOOK, patch, patch_type="json")

    secret = await kube.get(k8s.SECRETS, "mutator-webhook-tls", "default")
    config = await kube.get(k8s.MUTATING_WEBHOOKS, WEBHOOK)
    assert config["webhooks"][0]["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    assert b"BEGIN CERTIFICATE" in base64.b64decode(secret["data"]["tls.crt"])

    # The API server verifies the webhook's certificate with the caBundle and calls it.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "tele-sandbox/echo"}]},
    }
    created = await kube.create(k8s.PODS, pod)
    assert created["metadata"]["name"] == "p"
    assert manager.webhook.reviews == 1

    # A caBundle that does not match makes the API server refuse the call (failurePolicy Fail).
    other = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nnope\n").decode()
    patch = [{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": other}]
    await kube.patch(k8s.MUTATING_WEBHOOKS, WEBHOOK, patch, patch_type="json")
    pod["metadata"]["name"] = "q"  # type: ignore[index]
    with pytest.raises(k8s.ApiError) as info:
        await kube.create(k8s.PODS, pod)
    assert 'failed calling webhook "agent-injector.tele.io"' in info.value.message
    assert manager.webhook.reviews == 1


async def test_the_secret_is_reused_by_the_next_manager(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    await kube.create(k8s.MUTATING_WEBHOOKS, webhook_config("https://127.0.0.1:1/traffic-agent"))
    async with trio.open_nursery() as first:
        await start(first, kube)
        first.cancel_scope.cancel()
    before = await kube.get(k8s.SECRETS, "mutator-webhook-tls", "default")
    await start(nursery, kube)
    after = await kube.get(k8s.SECRETS, "mutator-webhook-tls", "default")
    assert after["data"] == before["data"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


async def test_pods_of_an_enabled_workload_get_the_agent(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    await kube.create(k8s.MUTATING_WEBHOOKS, webhook_config("https://127.0.0.1:1/traffic-agent"))
    manager = await start(nursery, kube)
    url = f"https://127.0.0.1:{manager.webhook_port}/traffic-agent"
    patch = [{"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": url}]
    await kube.patch(k8s.MUTATING_WEBHOOKS, WEBHOOK, patch, patch_type="json")
    template = {
        "metadata": {
            "labels": {"app": "api"},
            "annotations": {"telepresence.io/inject-traffic-agent": "enabled"},
        },
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "tele-sandbox/echo",
                    "ports": [{"name": "http", "containerPort": 8080}],
                }
            ]
        },
    }
    deployment = await kube.create(
        k8s.DEPLOYMENTS,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "template": template},
        },
    )
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "controller": True}
    replicaset = await kube.create(
        k8s.REPLICASETS,
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": "api-1",
                "namespace": "default",
                "ownerReferences": [{**owner, "name": "api", "uid": deployment["metadata"]["uid"]}],
            },
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "template": template},
        },
    )
    await kube.create(
        k8s.SERVICES,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": "http"}]},
        },
    )
    await wait_for(lambda: ("ReplicaSet", "default", "api-1") in manager.view.workloads)
    await wait_for(lambda: ("default", "api") in manager.view.services)
    rs_owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "controller": True}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "api-1-x",
            "namespace": "default",
            "labels": {"app": "api"},
            "ownerReferences": [
                {**rs_owner, "name": "api-1", "uid": replicaset["metadata"]["uid"]}
            ],
        },
        "spec": template["spec"],
    }
    created = await kube.create(k8s.PODS, pod)
    names = [c["name"] for c in created["spec"]["containers"]]
    assert names == ["app", "traffic-agent"]
    assert created["spec"]["containers"][0]["ports"][0]["name"] == "tm-http"
    assert created["spec"]["containers"][1]["ports"][0]["name"] == "http"
    assert "telepresence.io/agent-config" in created["metadata"]["annotations"]
    # A pod of no workload passes unchanged.
    lone = await kube.create(
        k8s.PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "lone", "namespace": "default"},
            "spec": template["spec"],
        },
    )
    assert [c["name"] for c in lone["spec"]["containers"]] == ["app"]
