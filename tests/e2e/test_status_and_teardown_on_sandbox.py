"""Issue 18, items 4-7 on the sandbox, as a user types them: what an engaged caller gets when
nothing listens locally, `tele status` across a manager restart and a session's end, `tele helm
uninstall` with engagements active, and mounted volumes seen from another `tele sandbox shell`
(and said to be invisible outside)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tele.daemon.mounts import mount_problem
from tele.sandbox.network import netns
from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import apply_ready, connect, free_port, in_caller, install_manager, kubectl
from tests.e2e.test_intercept_on_sandbox import APP
from tests.e2e.test_mounts_on_sandbox import APP as MOUNTED_APP
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

# From the caller pod: one HTTP request (status and body, errors included), one raw TCP exchange
# in a protocol that is not HTTP (what the caller reads, or that it was reset).
CALL_HTTP = """
import urllib.error, urllib.request
try:
    response = urllib.request.urlopen("http://echo.default/", timeout=10)
    print(response.status, response.read().decode(), end="")
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode(), end="")
"""
CALL_RAW = """
import socket
with socket.create_connection(("echo.default", 80), timeout=10) as s:
    s.sendall(b"HELO cluster\\r\\n")
    try:
        print("read", s.recv(100))
    except ConnectionResetError:
        print("reset")
"""


def _app_up(sandbox: NodeSandbox, env: dict[str, str]) -> None:
    install_manager(sandbox, env)
    apply_ready(sandbox, APP)
    connect(env, sandbox)


def _uninstall(sandbox: NodeSandbox, env: dict[str, str]) -> None:
    run_tele(env, "quit")
    removed = run_tele(env, "helm", "uninstall", "--kubeconfig", str(sandbox.kubeconfig))
    assert removed.returncode == 0, removed.stderr


def test_nothing_listening_locally_is_a_502_for_http_and_a_reset_for_the_rest(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
) -> None:
    _app_up(node_sandbox, tele_env)
    closed = free_port()
    engaged = run_tele(tele_env, "intercept", "echo", "--port", str(closed), timeout=120)
    assert engaged.returncode == 0, engaged.stderr
    assert engaged.stderr.strip() == (
        f"tele: nothing listens on 127.0.0.1:{closed} yet: until something does, engaged "
        "HTTP requests get a 502 and other connections are reset"
    )
    answered = in_caller(node_sandbox, CALL_HTTP)
    assert answered == (
        f"502 tele: nothing listens on 127.0.0.1:{closed}, the local handler of echo\n"
    )
    raw = in_caller(node_sandbox, CALL_RAW)
    assert raw.strip() == "reset", raw
    assert run_tele(tele_env, "leave", "echo").returncode == 0
    _uninstall(node_sandbox, tele_env)


def _status(env: dict[str, str]) -> dict[str, Any]:
    shown = run_tele(env, "status", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    data: dict[str, Any] = json.loads(shown.stdout)
    return data


def test_status_follows_a_manager_restart_and_says_why_a_session_ended(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
) -> None:
    install_manager(node_sandbox, tele_env)
    kubeconfig = str(node_sandbox.kubeconfig)
    connect(tele_env, node_sandbox)
    old = _status(tele_env)["session"]["session_id"]

    # The manager restarts: the first status that shows the new session says connected (it
    # said "reconnecting ... the session has expired" for another lease/3).
    kubectl(node_sandbox, "delete", "pod", "-n", "ambassador", "-l", "app=traffic-manager")
    deadline = time.monotonic() + 90
    while (status := _status(tele_env))["session"]["session_id"] == old:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    session = status["session"]
    new = session["session_id"]
    assert (status["connection"], session["status"], session["last_error"]) == (
        "connected",
        "connected",
        "",
    ), status
    assert session["reconnects"] == 1, status
    assert session["last_reconnect"].endswith(
        f" UTC the traffic manager no longer knew session {old} (a new manager pod, or the lease "
        f"ran out while the link was down): arrived again as session {new}"
    )
    text = run_tele(tele_env, "status").stdout
    assert "Connection: connected\n" in text
    assert "  Reconnects:         1\n" in text
    assert f"  Last reconnect:     {session['last_reconnect']}\n" in text
    assert "Last error" not in text, text

    # The manager goes for good: the session ends, and status says when and why.
    removed = run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig)
    assert removed.returncode == 0, removed.stderr
    deadline = time.monotonic() + 60
    while (status := _status(tele_env))["connection"] != "not connected":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    session = status["session"]
    why = (
        f"No traffic manager is installed in namespace ambassador of {session['kube_context']}; "
        "install one with `tele helm install`."
    )
    assert (session["status"], session["last_error"]) == ("failed", why), status
    ended_at = time.strftime("%H:%M:%S", time.gmtime(session["ended_at"]))
    text = run_tele(tele_env, "status").stdout
    assert f"Connection: not connected: the session ended at {ended_at} UTC: {why}\n" in text
    run_tele(tele_env, "quit")


CALL = (
    "import urllib.request; "
    "print(urllib.request.urlopen('http://echo.default/', timeout=10).read().decode())"
)


def _agent_pods(sandbox: NodeSandbox) -> list[str]:
    pods = json.loads(kubectl(sandbox, "get", "pods", "-A", "-o", "json"))["items"]
    return [
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in pods
        if any(c["name"] == "traffic-agent" for c in p["spec"]["containers"])
    ]


def test_helm_uninstall_ends_engagements_and_removes_the_agents(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
) -> None:
    _app_up(node_sandbox, tele_env)
    kubeconfig = str(node_sandbox.kubeconfig)
    engaged = run_tele(tele_env, "intercept", "echo", "--port", str(free_port()), timeout=120)
    assert engaged.returncode == 0, engaged.stderr
    assert _agent_pods(node_sandbox), "the intercept injected no agent"
    listed = run_tele(tele_env, "list", "-o", "json")
    [echo] = [w for w in json.loads(listed.stdout) if w["name"] == "echo"]
    assert (echo["agent_installed"], echo["agent_pods"], echo["agents_connected"]) == (True, 1, 1)

    removed = run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=240)
    assert removed.returncode == 0, removed.stderr
    assert removed.stderr.splitlines() == [
        "tele: uninstalling the traffic manager ends your engagements: echo",
        "tele: uninstalling the traffic manager removes the traffic agent from Deployment "
        "default/echo (their pods restart; engagements on them end)",
    ]
    assert removed.stdout.startswith(
        "Uninstalled release traffic-manager from namespace ambassador: "
    )
    assert removed.stdout.endswith(
        " objects deleted; removed the traffic agent from Deployment default/echo.\n"
    )
    # No pod carries an agent any more, and the cluster's callers reach the app again.
    assert _agent_pods(node_sandbox) == []
    kubectl(node_sandbox, "wait", "--for=condition=Ready", "pod", "-l", "app=echo", "--timeout=90s")
    assert '"pod": "echo-' in in_caller(node_sandbox, CALL)
    assert "echo:" not in run_tele(tele_env, "status").stdout

    # Installed again: `tele list` tells that the pods carry no agent (they do not).
    run_tele(tele_env, "quit")
    _app_up(node_sandbox, tele_env)
    listed = run_tele(tele_env, "list")
    [line] = [line for line in listed.stdout.splitlines() if line.startswith("echo ")]
    assert line.endswith(" 1/1  ready to engage (traffic-agent not yet installed)"), line

    # --no-hooks leaves the agents (and says so); installed again, `tele list` does not call
    # pods that carry an agent "not yet installed", connected or not.
    engaged = run_tele(tele_env, "intercept", "echo", "--port", str(free_port()), timeout=120)
    assert engaged.returncode == 0, engaged.stderr
    assert run_tele(tele_env, "leave", "echo").returncode == 0
    kept = run_tele(tele_env, "helm", "uninstall", "--no-hooks", "--kubeconfig", kubeconfig)
    assert kept.returncode == 0, kept.stderr
    assert kept.stderr.splitlines() == [
        "tele: the traffic agent stays in the pods of Deployment default/echo (--no-hooks); it "
        "cannot reach a manager until one is installed again"
    ]
    assert len(_agent_pods(node_sandbox)) == 1
    run_tele(tele_env, "quit")
    _app_up(node_sandbox, tele_env)
    listed = run_tele(tele_env, "list")
    [line] = [line for line in listed.stdout.splitlines() if line.startswith("echo ")]
    assert line.endswith(
        (
            " 1/1  ready to engage (traffic-agent installed, not connected to the traffic "
            "manager yet)",
            " 1/1  ready to engage (traffic-agent already installed)",
        )
    ), line
    listed = run_tele(tele_env, "list", "-o", "json")
    [echo] = [w for w in json.loads(listed.stdout) if w["name"] == "echo"]
    assert (echo["agent_installed"], echo["agent_pods"]) == (True, 1)
    _uninstall(node_sandbox, tele_env)
    assert _agent_pods(node_sandbox) == []


def _tele(
    env: dict[str, str], *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tele", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.skipif(mount_problem() is not None, reason=f"no FUSE mounts: {mount_problem()}")
def test_volumes_mounted_from_one_sandbox_shell_are_seen_from_another(
    tele_env: dict[str, str], guard: DaemonGuard, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root and network namespaces")
    name = f"tele-v{uuid.uuid4().hex[:6]}"
    app, mount, other = tmp_path / "app.yaml", tmp_path / "mnt", tmp_path / "other"
    app.write_text(MOUNTED_APP)
    laptop_home = Path(tele_env["XDG_STATE_HOME"]) / "tele" / "sandbox" / name / "laptop"
    try:
        up = _tele(tele_env, "sandbox", "up", "--name", name)
        assert up.returncode == 0, up.stderr
        assert os.path.ismount(netns.mount_ns_path(f"{name}-laptop"))
        first = _tele(
            tele_env,
            "sandbox",
            "shell",
            "--name",
            name,
            "--",
            "sh",
            "-c",
            "set -e; tele helm install >/dev/null; kubectl -n ambassador wait "
            "--for=condition=Ready pod -l app=traffic-manager --timeout=90s >/dev/null; "
            f"kubectl apply -f {app} >/dev/null; kubectl wait --for=condition=Ready pod "
            "-l app=files --timeout=90s >/dev/null; tele connect --no-vif >/dev/null; "
            f"tele intercept files --port 8089 --mount {mount}",
        )
        assert first.returncode == 0, first.stderr
        assert "mount namespace" not in first.stderr and "not mounted" not in first.stderr, (
            first.stderr
        )
        assert f"Volume Mount Point     : {mount}" in first.stdout, first.stdout
        # Another shell of the same laptop sees the volumes (it saw an empty directory).
        second = _tele(
            tele_env,
            "sandbox",
            "shell",
            "--name",
            name,
            "--",
            "cat",
            f"{mount}/etc/settings/app.conf",
        )
        assert (second.returncode, second.stdout) == (0, "color=blue\n"), second.stderr
        # Outside the laptop (the host's mount namespace) the CLI says it cannot see them.
        laptop = {
            **tele_env,
            "HOME": str(laptop_home),
            **{f"XDG_{d.upper()}_HOME": str(laptop_home / d) for d in ("config", "cache", "state")},
            "XDG_RUNTIME_DIR": str(laptop_home / "runtime"),
            "KUBECONFIG": str(
                Path(tele_env["XDG_STATE_HOME"]) / "tele" / "sandbox" / name / "kubeconfig"
            ),
        }
        assert _tele(laptop, "leave", "files").returncode == 0
        outside = _tele(laptop, "intercept", "files", "--port", "8089", "--mount", str(other))
        assert outside.returncode == 0, outside.stderr
        assert outside.stderr.splitlines()[0] == (
            f"tele: The volumes are mounted at {other} in the tele daemon's mount namespace, "
            "which this shell does not share, so the directory is empty here; run the handler "
            "where the daemon was started."
        )
        assert (
            f"  Not seen here:      the volumes of files at {other} (mounted in the daemon's "
            "mount namespace, which this shell does not share)\n"
        ) in _tele(laptop, "status").stdout
        seen = _tele(tele_env, "sandbox", "shell", "--name", name, "--", "tele", "status")
        assert "Not seen here" not in seen.stdout and f"volumes at {other}" in seen.stdout
        assert _tele(laptop, "quit").returncode == 0
    finally:
        _tele(tele_env, "sandbox", "down", "--name", name)
    assert not netns.mount_ns_path(f"{name}-laptop").parent.exists()
    assert not [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if name in line
    ]
