"""Fixtures for the running sandbox: one cluster with its node (controllers, kubelet, service
network, DNS) per test module, a kubeconfig, kubectl in a fresh namespace, and a check that no
network namespace of the cluster is left once it stops."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tele.sandbox.network import netns
from tele.sandbox.testing import ThreadedCluster, threaded_cluster

MANIFESTS = Path(__file__).parent / "manifests"


def _need_root() -> None:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
        pytest.skip("needs root, iproute2 and nftables (network namespaces)")


@dataclass
class NodeSandbox:
    cluster: ThreadedCluster
    name: str
    kubeconfig: Path
    home: Path


@pytest.fixture(scope="module")
def node_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSandbox]:
    _need_root()
    name = f"t2{uuid.uuid4().hex[:6]}"
    base = tmp_path_factory.mktemp("node-sandbox")
    (base / "home").mkdir()
    try:
        with threaded_cluster(
            base / "kubeconfig",
            name=name,
            nodes=True,
            state_dir=base / "state",
            node_options={"backoff_base": 0.2},
        ) as cluster:
            yield NodeSandbox(cluster, name, base / "kubeconfig", base / "home")
    finally:
        left = [n for n in netns.list_netns() if n.startswith(f"{name}-")]
        for n in left:
            netns.delete_sync(n)
        assert not left, f"network namespaces left behind: {left}"


@dataclass
class Kubectl:
    sandbox: NodeSandbox
    namespace: str

    def command(self) -> list[str]:
        kubectl = shutil.which("kubectl")
        assert kubectl is not None
        return [kubectl, "--kubeconfig", str(self.sandbox.kubeconfig), "-n", self.namespace]

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        kubectl = shutil.which("kubectl")
        assert kubectl is not None
        cmd = [kubectl, "--kubeconfig", str(self.sandbox.kubeconfig), "-n", self.namespace]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.sandbox.home)}
        result = subprocess.run(
            [*cmd, *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}"
            )
        return result


@pytest.fixture
def kubectl(node_sandbox: NodeSandbox) -> Iterator[Kubectl]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    ns = f"w-{uuid.uuid4().hex[:8]}"
    k = Kubectl(node_sandbox, ns)
    k.run("create", "namespace", ns)
    yield k
    k.run("delete", "namespace", ns, "--wait=false", check=False)
