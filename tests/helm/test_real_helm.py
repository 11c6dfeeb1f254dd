"""The chart installs with Helm itself (helm-python-sdk's install action, the Go SDK) on the
sandbox, and tele's conflict check sees a manager that `helm` installed (no tele record)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import pytest
import trio

from tele.helm import ops
from tele.helm.chart import Chart, chart_dir
from tele.helm.errors import NamespaceConflict
from tele.k8s import client as k8s
from tele.k8s.client import KubeClient


def helm_install(kubeconfig: Path, namespace: str, values: dict[str, Any]) -> dict[str, Any]:
    config = helm_python.Config(kubeconfig_path=str(kubeconfig), namespace=namespace)
    try:
        release = config.install(
            str(chart_dir()),
            "traffic-manager",
            values,
            namespace=namespace,
            create_namespace=True,
            timeout=30,
        )
        return dict(release)
    finally:
        config.close()


async def test_real_helm_installs_the_chart(
    kubeconfig: Path, kube: KubeClient, chart: Chart
) -> None:
    await kube.create(
        k8s.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "alpha"}}
    )
    with trio.fail_after(60):
        release = await trio.to_thread.run_sync(
            helm_install, kubeconfig, "helm-mgr", {"namespaces": ["alpha"]}
        )
    assert release["status"] == "deployed"
    for obj in await chart.render(
        {"namespaces": ["alpha"]}, release="traffic-manager", namespace="helm-mgr"
    ):
        meta = obj["metadata"]
        assert await kube.get(k8s.resource_for(obj), meta["name"], meta.get("namespace"))

    with pytest.raises(NamespaceConflict) as info:
        await ops.install(kube, chart, {}, release="traffic-manager", namespace="ambassador")
    assert str(info.value).startswith(
        "Release traffic-manager in namespace helm-mgr already manages namespaces alpha;"
    )


async def test_real_helm_refuses_overlapping_managers(kubeconfig: Path, kube: KubeClient) -> None:
    for name, labels in (("alpha", {}), ("beta", {}), ("delta", {"env": "dev"})):
        metadata = {"name": name, "labels": labels}
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}
        await kube.create(k8s.NAMESPACES, body)

    async def install(namespace: str, values: dict[str, Any]) -> None:
        with trio.fail_after(60):
            await trio.to_thread.run_sync(helm_install, kubeconfig, namespace, values)

    await install("mgr-a", {"namespaces": ["alpha"]})
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"namespaces": ["beta", "alpha"]}, "in namespace mgr-a already manages namespace alpha"),
        ({}, "in namespace mgr-a already manages some namespaces and a cluster-wide manager"),
        (
            {
                "namespaceSelector": {
                    "matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]
                }
            },
            "in namespace mgr-a already manages namespace alpha",
        ),
    ]
    for values, message in refusals:
        with pytest.raises(helm_python.HelmError) as info:
            await install("mgr-b", values)
        assert message in str(info.value)
    await install("mgr-b", {"namespaces": ["beta"]})
    await install("mgr-d", {"namespaceSelector": {"matchLabels": {"env": "dev"}}})
    with pytest.raises(helm_python.HelmError) as info:
        await install("mgr-e", {"namespaces": ["delta"]})
    assert "release traffic-manager in namespace mgr-d already manages namespace delta" in str(
        info.value
    )


async def test_real_helm_uninstalls(kubeconfig: Path, kube: KubeClient) -> None:
    def install_then_uninstall() -> None:
        helm_install(kubeconfig, "helm-mgr", {})
        config = helm_python.Config(kubeconfig_path=str(kubeconfig), namespace="helm-mgr")
        try:
            config.uninstall("traffic-manager")
        finally:
            config.close()

    with trio.fail_after(60):
        await trio.to_thread.run_sync(install_then_uninstall)
    assert await kube.get_or_none(k8s.DEPLOYMENTS, "traffic-manager", "helm-mgr") is None
