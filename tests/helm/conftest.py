"""An in-process sandbox API server and a kubeconfig for it, per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import yaml

from tele.helm.chart import Chart
from tele.k8s.client import KubeClient, open_kube_client
from tele.sandbox.cluster import ClusterInfo, serve_cluster


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> ClusterInfo:
    info: ClusterInfo = await nursery.start(lambda **kw: serve_cluster("helmtest", **kw))
    return info


@pytest.fixture
def kubeconfig(cluster: ClusterInfo, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cluster.kubeconfig()))
    return path


@pytest.fixture
async def kube(kubeconfig: Path) -> AsyncIterator[KubeClient]:
    async with open_kube_client(str(kubeconfig)) as client:
        yield client


@pytest.fixture(scope="session")
def chart() -> Chart:
    return Chart()
