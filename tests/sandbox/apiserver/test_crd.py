"""CustomResourceDefinitions on the sandbox API server, driven by real kubectl (oldest and newest)
and the official Python client: a CRD serves its kind (discovery, storage, Table columns,
status and scale subresources, OpenAPI for apply and explain); deleting it takes the kind and
its objects away; a malformed CRD is refused the way Kubernetes refuses it."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from typing import Any

import pytest

from .conftest import Kubectl, Sandbox, unique_namespace

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402


def _crd(group: str, *, scope: str = "Namespaced", kind: str = "Widget") -> dict[str, Any]:
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "shortNames": [kind.lower()[:2] + "x"]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.size",
                            "statusReplicasPath": ".status.size",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "description": "What the widget should be.",
                                    "properties": {
                                        "size": {"type": "integer", "description": "How big."}
                                    },
                                },
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture
def group() -> str:
    return f"t{uuid.uuid4().hex[:8]}.example.com"


def test_kubectl_serves_and_removes_a_custom_kind(kubectl: Kubectl, group: str) -> None:
    kubectl.run("apply", "-f", "-", input=json.dumps(_crd(group)), namespace=False)
    established = kubectl.run(
        "wait",
        "--for=condition=Established",
        f"crd/widgets.{group}",
        "--timeout=10s",
        namespace=False,
    )
    assert "condition met" in established.stdout
    resources = kubectl.run("api-resources", f"--api-group={group}", namespace=False).stdout
    assert "widgets" in resources and "Widget" in resources and "true" in resources

    widget = {
        "apiVersion": f"{group}/v1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 3, "colour": "blue"},  # an undeclared field is kept: no pruning
        "status": {"phase": "Ignored"},  # status comes only through the subresource
    }
    assert "created" in kubectl.run("apply", "-f", "-", input=json.dumps(widget)).stdout
    stored = json.loads(kubectl.run("get", f"widgets.{group}", "w1", "-o", "json").stdout)
    assert stored["spec"] == {"size": 3, "colour": "blue"}
    assert "status" not in stored and stored["metadata"]["generation"] == 1

    kubectl.run(
        "patch",
        f"widgets.{group}",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Ready"}}',
    )
    table = kubectl.run("get", f"widgets.{group}").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "PHASE"]
    assert table[1].split() == ["w1", "3", "Ready"]

    # A strategic merge patch is refused for custom objects, as on Kubernetes.
    refused = kubectl.run(
        "patch", f"widgets.{group}", "w1", "-p", '{"spec":{"size":4}}', check=False
    )
    assert refused.returncode != 0 and "application/merge-patch+json" in refused.stderr
    widget["spec"]["size"] = 5
    assert "configured" in kubectl.run("apply", "-f", "-", input=json.dumps(widget)).stdout
    kubectl.run("scale", f"widgets.{group}", "w1", "--replicas=7")
    stored = json.loads(kubectl.run("get", f"widgets.{group}", "w1", "-o", "json").stdout)
    assert stored["spec"]["size"] == 7 and stored["metadata"]["generation"] == 3
    assert stored["status"] == {"phase": "Ready"}  # spec writes keep the status

    explained = kubectl.run("explain", f"widgets.{group}.spec").stdout
    assert "size" in explained and "How big." in explained

    kubectl.run("delete", "crd", f"widgets.{group}", namespace=False)
    gone = kubectl.run("get", f"widgets.{group}", check=False)
    assert gone.returncode != 0
    assert widget["kind"] not in kubectl.run("api-resources", namespace=False).stdout.split()


def test_python_client_custom_objects(sandbox: Sandbox, group: str) -> None:
    api_client = config.new_client_from_config(config_file=str(sandbox.kubeconfig))
    ext = client.ApiextensionsV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    ns = unique_namespace("crd")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    try:
        ext.create_custom_resource_definition(_crd(group))
        ext.create_custom_resource_definition(_crd(group, scope="Cluster", kind="Gadget"))
        crd = ext.read_custom_resource_definition(f"widgets.{group}")
        assert {c.type: c.status for c in crd.status.conditions}["Established"] == "True"

        body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "a"}}
        custom.create_namespaced_custom_object(group, "v1", ns, "widgets", body)
        custom.create_cluster_custom_object(
            group, "v1", "gadgets", {**body, "kind": "Gadget", "metadata": {"name": "g"}}
        )
        listed = custom.list_namespaced_custom_object(group, "v1", ns, "widgets")
        assert [i["metadata"]["name"] for i in listed["items"]] == ["a"]
        assert custom.get_cluster_custom_object(group, "v1", "gadgets", "g")["kind"] == "Gadget"
        with pytest.raises(ApiException) as exists:
            custom.create_namespaced_custom_object(group, "v1", ns, "widgets", body)
        assert exists.value.status == 409

        # A watch open when the CRD goes sees its objects go.
        events: list[tuple[str, str]] = []
        opened = threading.Event()
        watcher = watch.Watch()

        def follow() -> None:
            for e in watcher.stream(
                custom.list_namespaced_custom_object,
                group,
                "v1",
                ns,
                "widgets",
                resource_version=listed["metadata"]["resourceVersion"],
                timeout_seconds=10,
            ):
                events.append((e["type"], e["object"]["metadata"]["name"]))
                opened.set()
                if len(events) == 3:
                    watcher.stop()

        thread = threading.Thread(target=follow)
        thread.start()
        try:
            custom.create_namespaced_custom_object(
                group, "v1", ns, "widgets", {**body, "metadata": {"name": "b"}}
            )
            assert opened.wait(10), "the watch saw nothing"
            ext.delete_custom_resource_definition(f"widgets.{group}")
        finally:
            thread.join(15)
        assert events == [("ADDED", "b"), ("DELETED", "a"), ("DELETED", "b")]
        with pytest.raises(ApiException) as gone:
            custom.list_namespaced_custom_object(group, "v1", ns, "widgets")
        assert gone.value.status == 404
        # The other CRD's kind is still served.
        assert custom.get_cluster_custom_object(group, "v1", "gadgets", "g")
        ext.delete_custom_resource_definition(f"gadgets.{group}")
    finally:
        core.delete_namespace(ns)
        api_client.close()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: c["metadata"].update(name="wrong.example.com"), "metadata.name"),
        (lambda c: c["spec"].update(group="apps"), "spec.group"),
        (lambda c: c["spec"].update(scope="Global"), "spec.scope"),
        (lambda c: c["spec"]["versions"][0].update(storage=False), "spec.versions"),
    ],
)
def test_a_malformed_crd_is_refused(sandbox: Sandbox, group: str, change: Any, field: str) -> None:
    api_client = config.new_client_from_config(config_file=str(sandbox.kubeconfig))
    try:
        body = _crd(group)
        change(body)
        with pytest.raises(ApiException) as refused:
            client.ApiextensionsV1Api(api_client).create_custom_resource_definition(body)
        assert refused.value.status == 422
        status = json.loads(refused.value.body)
        assert field in [c["field"] for c in status["details"]["causes"]]
    finally:
        api_client.close()


def test_sandbox_up_with_argo_rollouts(tele_env: dict[str, str]) -> None:
    def tele(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tele", *args], env=tele_env, capture_output=True, text=True, timeout=90, check=False
        )

    try:
        for _ in range(2):  # a second `up` finds the sandbox and the CRD there: both kept
            started = tele("sandbox", "up", "--name", "argo", "--with", "argo-rollouts")
            assert started.returncode == 0, started.stderr
        path = tele("sandbox", "kubeconfig", "--name", "argo", "--path").stdout.strip()
        crds = subprocess.run(
            ["kubectl", "--kubeconfig", path, "get", "crd", "-o", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOME": tele_env["HOME"]},
            check=False,
        )
        if crds.returncode != 127:
            assert crds.stdout.split() == [
                "customresourcedefinition.apiextensions.k8s.io/rollouts.argoproj.io"
            ]
        unknown = tele("sandbox", "up", "--name", "argo", "--with", "istio")
        assert unknown.returncode == 2 and "istio" in unknown.stderr
    finally:
        tele("sandbox", "down", "--name", "argo")
