"""Fixtures for the sandbox API server: one cluster per test session on a background thread,
a kubeconfig for it, kubectl binaries (oldest and newest on the machine), unique namespaces."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tele.sandbox.cluster import ClusterInfo
from tele.sandbox.testing import ThreadedCluster, threaded_cluster

MANIFESTS = Path(__file__).parent / "manifests"


@dataclass
class Sandbox:
    cluster: ThreadedCluster
    kubeconfig: Path
    home: Path

    @property
    def info(self) -> ClusterInfo:
        assert self.cluster.info is not None
        return self.cluster.info


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    base = tmp_path_factory.mktemp("sandbox")
    home = base / "home"
    home.mkdir()
    with threaded_cluster(base / "kubeconfig", name="test") as cluster:
        yield Sandbox(cluster, base / "kubeconfig", home)


def _kubectl_versions() -> list[Path]:
    found = shutil.which("kubectl")
    if found is None:
        return []
    real = Path(os.path.realpath(found))
    versions = sorted(
        (p for p in real.parent.glob("kubectl.1.*") if re.fullmatch(r"kubectl\.1\.\d+", p.name)),
        key=lambda p: int(p.name.rsplit(".", 1)[1]),
    )
    if not versions:
        return [real]
    return [versions[0], versions[-1]] if len(versions) > 1 else versions


KUBECTLS = _kubectl_versions()


@dataclass
class Kubectl:
    binary: Path
    sandbox: Sandbox
    namespace: str

    def run(
        self, *args: str, input: str | None = None, check: bool = True, namespace: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            str(self.binary),
            "--kubeconfig",
            str(self.sandbox.kubeconfig),
            "--cache-dir",
            str(self.sandbox.home / f"cache-{self.binary.name}"),
        ]
        if namespace:
            cmd += ["-n", self.namespace]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.sandbox.home)}
        result = subprocess.run(
            [*cmd, *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}"
            )
        return result


def unique_namespace(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=KUBECTLS or [None], ids=lambda p: p.name if p else "no-kubectl")
def kubectl(request: pytest.FixtureRequest, sandbox: Sandbox) -> Iterator[Kubectl]:
    if request.param is None:
        pytest.skip("kubectl is not installed")
    ns = unique_namespace("kc")
    k = Kubectl(request.param, sandbox, ns)
    k.run("create", "namespace", ns, namespace=False)
    yield k
    k.run("delete", "namespace", ns, "--wait=false", namespace=False, check=False)
