"""Issue 19, point 7 on the sandbox: the pod that serves an engagement is replaced while the
engagement lasts (`kubectl delete pod`): its `--to-pod` forward and its volume mount follow the
new pod, `tele status` / `tele list` name it, and a foreground `-- COMMAND` says so in a line.
When the agent then restarts in the same pod (killed), the volumes are mounted again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tele.contracts.agentconfig import AGENT_CONTAINER
from tele.daemon.mounts import mount_problem
from tests.daemon.util import TELE, DaemonGuard, run_tele
from tests.e2e import (
    apply_ready,
    connect,
    deployment,
    echo_container,
    free_port,
    install_manager,
    kubectl,
    manifest,
    service,
)
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(mount_problem() is not None, reason=f"no FUSE mounts: {mount_problem()}"),
]


def _app(port: int) -> str:
    """The movable app, listening on `port` in its pod (the first test's --to-pod port too)."""
    return manifest(
        deployment(
            "movable",
            echo_container(
                port,
                name="app",
                volumeMounts=[{"name": "podinfo", "mountPath": "/etc/podinfo"}],
            ),
            volumes=[
                {
                    "name": "podinfo",
                    "downwardAPI": {
                        "items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]
                    },
                }
            ],
        ),
        service("movable"),
    )


# The handler runs until its stdin ends (the test closes it).
HANDLER = "import sys; sys.stdin.read()"


def _engagement(env: dict[str, str]) -> dict[str, Any] | None:
    status = json.loads(run_tele(env, "status", "-o", "json").stdout)
    engagements = (status.get("session") or {}).get("engagements") or []
    return next((e for e in engagements if e["name"] == "movable"), None)


def _to_pod_answer(port: int) -> str:
    """The pod that answers on this machine's --to-pod `port` (the echo app says its name)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
        return str(json.loads(answer.read())["pod"])


def _agent_pid(sandbox: NodeSandbox, pod: str) -> int:
    """The traffic agent's process of `pod` (the container's init, as this machine sees it)."""
    state = sandbox.kubeconfig.parent / "state"
    for pid_file in state.rglob(f"containers/*.{AGENT_CONTAINER}.*/pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"HOSTNAME={pod}".encode() in environ:
                return pid
    raise AssertionError(f"no traffic agent process of pod {pod}")


def _restarts(sandbox: NodeSandbox, pod: str) -> int:
    status = json.loads(kubectl(sandbox, "get", "pod", pod, "-o", "json"))["status"]
    [agent] = [c for c in status["containerStatuses"] if c["name"] == AGENT_CONTAINER]
    return int(agent["restartCount"])


def test_to_pod_and_mounts_follow_a_replaced_serving_pod(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    mount_dir: Path,
    tmp_path: Path,
) -> None:
    sandbox = node_sandbox
    kubeconfig = str(sandbox.kubeconfig)
    # The app's port is also the --to-pod port on this machine: a free one, so that two runs at
    # once do not collide.
    app_port = free_port()
    install_manager(sandbox, tele_env)
    handler: subprocess.Popen[str] | None = None
    try:
        apply_ready(sandbox, _app(app_port), app="movable")
        connect(tele_env, sandbox)
        stderr_file = tmp_path / "intercept.stderr"
        with stderr_file.open("w") as stderr:
            handler = subprocess.Popen(
                [TELE, "intercept", "movable", "--port", "8093", "--to-pod", str(app_port),
                 "--mount", str(mount_dir), "--", "python3", "-c", HANDLER],
                env=tele_env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                text=True,
            )  # fmt: skip
        deadline = time.monotonic() + 180
        while (engaged := _engagement(tele_env)) is None:
            assert handler.poll() is None, stderr_file.read_text()
            assert time.monotonic() < deadline, "the intercept did not engage"
            time.sleep(0.2)
        old = engaged["pod_name"]
        assert old.startswith("movable-") and engaged["local_mount"] == str(mount_dir)
        assert _to_pod_answer(app_port) == old
        assert (mount_dir / "etc" / "podinfo" / "name").read_text() == old

        kubectl(sandbox, "delete", "pod", old, "--wait=false")
        # The new pod's agent arrives; the daemon moves the forward and mounts again.
        deadline = time.monotonic() + 180
        while not (engaged := _engagement(tele_env) or {}).get("pod_change"):
            assert handler.poll() is None, stderr_file.read_text()
            assert time.monotonic() < deadline, f"no new serving pod: {engaged}"
            time.sleep(0.5)
        new = engaged["pod_name"]
        assert new != old and new.startswith("movable-")
        [new_ip] = engaged["pod_ips"]
        assert engaged["pod_change"] == (
            f"movable is served by pod {new} ({new_ip}) now: pod {old} was replaced; "
            f"its volumes are mounted again at {mount_dir}"
        )
        # Bytes through the --to-pod port reach the new pod; the mount shows its files.
        assert _to_pod_answer(app_port) == new
        assert (mount_dir / "etc" / "podinfo" / "name").read_text() == new
        assert engaged["local_mount"] == str(mount_dir)
        moved = engaged["pod_change"]
        status = run_tele(tele_env, "status").stdout
        assert f"    {moved}" in status.splitlines()
        assert "movable: intercepted Deployment default/movable" in status
        assert f", pod {new}" in status
        listed = run_tele(tele_env, "list").stdout
        assert f"    movable: intercept, tcp -> 127.0.0.1:8093, pod {new}" in listed

        # The agent restarts in the same pod (killed, as an OOM kill would): the mount ended
        # with its connection; once the agent arrives again the volumes are mounted again.
        os.kill(_agent_pid(sandbox, new), signal.SIGKILL)
        restarted = (
            f"the traffic agent of movable in pod {new} arrived again; its volumes are "
            f"mounted again at {mount_dir}"
        )
        deadline = time.monotonic() + 180
        while (engaged := _engagement(tele_env) or {}).get("pod_change") != restarted:
            assert handler.poll() is None, stderr_file.read_text()
            assert time.monotonic() < deadline, f"not mounted again: {engaged}"
            time.sleep(0.5)
        assert _restarts(sandbox, new) >= 1
        assert engaged["pod_name"] == new and engaged["local_mount"] == str(mount_dir)
        assert (mount_dir / "etc" / "podinfo" / "name").read_text() == new
        assert _to_pod_answer(app_port) == new

        # The foreground command's own output said it, in one line.
        assert handler.stdin is not None
        handler.stdin.close()
        assert handler.wait(timeout=60) == 0
        said = [line for line in stderr_file.read_text().splitlines() if " pod " in line]
        assert said == [f"tele: {moved}", f"tele: {restarted}"]
        # Leaving (the command ended) unmounts, also the mount made again.
        assert str(mount_dir) not in Path("/proc/self/mountinfo").read_text()
        with pytest.raises(OSError):
            _to_pod_answer(app_port)
    finally:
        if handler is not None and handler.poll() is None:
            handler.kill()
            handler.wait()
        run_tele(tele_env, "quit")
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)


def test_the_volumes_are_mounted_again_after_a_new_manager_pod(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    mount_dir: Path,
) -> None:
    """The traffic manager's pod is replaced: the mount, whose connection went through the old
    manager, ends; the agents arrive at the new manager, and the volumes are mounted again."""
    sandbox = node_sandbox
    kubeconfig = str(sandbox.kubeconfig)
    install_manager(sandbox, tele_env)
    try:
        apply_ready(sandbox, _app(8080), app="movable")  # no --to-pod here
        connect(tele_env, sandbox)
        engaged = run_tele(
            tele_env, "intercept", "movable", "--port", "8093", "--mount", str(mount_dir),
            timeout=180,
        )  # fmt: skip
        assert engaged.returncode == 0, engaged.stderr
        pod = (_engagement(tele_env) or {})["pod_name"]
        assert (mount_dir / "etc" / "podinfo" / "name").read_text() == pod

        kubectl(sandbox, "delete", "pod", "-n", "ambassador", "-l", "app=traffic-manager")
        again = (
            f"the traffic agent of movable in pod {pod} arrived again; its volumes are mounted "
            f"again at {mount_dir}"
        )
        deadline = time.monotonic() + 180
        while (engaged_now := _engagement(tele_env) or {}).get("pod_change") != again:
            assert time.monotonic() < deadline, f"not mounted again: {engaged_now}"
            time.sleep(0.5)
        assert (mount_dir / "etc" / "podinfo" / "name").read_text() == pod
        assert run_tele(tele_env, "leave", "movable", timeout=60).returncode == 0
        assert str(mount_dir) not in Path("/proc/self/mountinfo").read_text()
    finally:
        run_tele(tele_env, "quit")
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
