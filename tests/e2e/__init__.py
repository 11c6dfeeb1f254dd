"""End-to-end tests on the sandbox with a node; shared steps below."""

from __future__ import annotations

import subprocess

from tests.daemon.util import run_tele
from tests.sandbox.cluster.conftest import NodeSandbox


def kubectl(sandbox: NodeSandbox, *args: str, stdin: str | None = None) -> str:
    """kubectl against the sandbox; its stdout, asserting success."""
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(sandbox.kubeconfig), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def install_manager(sandbox: NodeSandbox, env: dict[str, str], *values: str) -> None:
    """`tele helm install` (with `--set` for each of `values`), then wait until the manager
    pod is ready."""
    sets = [arg for value in values for arg in ("--set", value)]
    installed = run_tele(
        env, "helm", "install", "--kubeconfig", str(sandbox.kubeconfig), *sets, timeout=120
    )
    assert installed.returncode == 0, installed.stderr
    kubectl(
        sandbox,
        "wait",
        "-n",
        "ambassador",
        "--for=condition=Ready",
        "pod",
        "-l",
        "app=traffic-manager",
        "--timeout=90s",
    )
