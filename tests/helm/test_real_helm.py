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
        "release traffic-manager in namespace helm-mgr already manages namespaces alpha;"
    )
