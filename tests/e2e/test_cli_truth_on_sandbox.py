"""Issue 18 on the sandbox, as a user types it: `tele intercept` again with another filter or
port is refused naming the engagement (not answered with the old one and rc 0); the filter is
shown by intercept (text and JSON) and by `tele status`; two engagements into one local port are
refused; a filter the agent could not match is refused before anything changes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon.util import TELE, DaemonGuard, run_tele, single_error_line
from tests.e2e import apply_ready, connect, free_port, install_manager, kubectl
from tests.e2e.test_intercept_on_sandbox import APP
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns


def test_intercept_says_what_it_engaged_and_refuses_what_it_would_not_do(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
) -> None:
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, tele_env)
    apply_ready(node_sandbox, APP)
    connect(tele_env, node_sandbox)
    port, other = free_port(), free_port()

    # Item 2: a regex that does not compile is refused before the cluster changes.
    bad = run_tele(tele_env, "intercept", "echo", "--http-path-regex", "([")
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "tele: --http-path-regex '([' does not compile: unterminated character set at position 1."
    )
    assert "No Workloads" not in (listed := run_tele(tele_env, "list").stdout)
    assert "engaged by" not in listed

    # Item 3: the filter is shown, in text and in JSON.
    engaged = run_tele(
        tele_env,
        "intercept",
        "echo",
        "--port",
        str(port),
        "--http-header",
        "x-dev=me",
        "--http-path-prefix",
        "/api",
        "-o",
        "json",
        timeout=120,
    )
    assert engaged.returncode == 0, engaged.stderr
    data = json.loads(engaged.stdout)
    assert (data["mechanism"], data["headers"], data["path_prefix"]) == (
        "http",
        [["x-dev", "me"]],
        ["/api"],
    )
    status = run_tele(tele_env, "status")
    assert (
        f"echo: intercepted Deployment default/echo -> 127.0.0.1:{port} "
        "(http: header x-dev=me, path prefix /api)"
    ) in status.stdout
    listed_text = run_tele(tele_env, "list").stdout
    assert (
        f"    echo: intercept, http: header x-dev=me, path prefix /api -> 127.0.0.1:{port}, "
        f"pod {data['pod_name']}\n"
    ) in listed_text + "\n"
    [echo_row] = [
        w
        for w in json.loads(run_tele(tele_env, "list", "-o", "json").stdout)
        if w["name"] == "echo"
    ]
    [engagement] = echo_row["engagements"]
    assert (engagement["mechanism"], engagement["headers"], engagement["path_prefix"]) == (
        "http",
        [["x-dev", "me"]],
        ["/api"],
    )
    status_json = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
    [shown] = status_json["session"]["engagements"]
    assert {k: shown[k] for k in ("name", "mechanism", "headers", "path_prefix", "local")} == {
        "name": "echo",
        "mechanism": "http",
        "headers": [["x-dev", "me"]],
        "path_prefix": ["/api"],
        "local": [f"127.0.0.1:{port}"],
    }

    # The same request again is the same engagement (rc 0); its text shows the filter.
    again = run_tele(
        tele_env,
        "intercept",
        "echo",
        "--port",
        str(port),
        "--http-header",
        "x-dev=me",
        "--http-path-prefix",
        "/api",
    )
    assert again.returncode == 0, again.stderr
    assert "Intercepting           : HTTP requests with header x-dev=me, path prefix /api" in (
        again.stdout
    )

    # Item 1: another filter or another port under the same name is refused, naming it.
    refusal = (
        f"tele: You already have intercept echo (http: header x-dev=me, path prefix /api -> "
        f"127.0.0.1:{port}); to change it, leave it first (`tele leave echo`)."
    )
    for args in (
        ["--port", str(port)],
        ["--port", str(other), "--http-header", "x-dev=me", "--http-path-prefix", "/api"],
    ):
        changed = run_tele(tele_env, "intercept", "echo", *args)
        assert changed.returncode == 1
        assert changed.stderr.strip() == refusal

    # Item 8: a second engagement into the same local port is refused.
    twice = run_tele(
        tele_env,
        "intercept",
        "echo-you",
        "--workload",
        "echo",
        "--port",
        str(port),
        "--http-header",
        "x-dev=you",
    )
    assert twice.returncode == 1
    assert twice.stderr.strip() == (
        f"tele: Local port {port} already receives the traffic of echo; "
        "choose another with --port, or leave echo first."
    )
    assert "echo-you" not in run_tele(tele_env, "status").stdout
    assert run_tele(tele_env, "leave", "echo").returncode == 0

    # Messages that say what exists.
    mismatch = run_tele(tele_env, "intercept", "echo", "--port", f"{port}:81")
    assert mismatch.returncode == 1
    assert single_error_line(mismatch) == (
        "tele: echo has no service port matching port 81 "
        "(its service ports: echo:http 80\u21928080)."
    )
    typo = run_tele(tele_env, "intercept", "echoo", "--port", str(port))
    assert typo.returncode == 1
    assert single_error_line(typo) == (
        "tele: No workload named echoo in namespace default; did you mean echo?"
    )
    nowhere = run_tele(tele_env, "intercept", "echo", "-n", "nowhere", "--port", str(port))
    assert nowhere.returncode == 1
    assert single_error_line(nowhere) == "tele: There is no namespace nowhere."

    # A handler killed by a signal: 128+signal, as a shell says (and the engagement is left).
    killed = run_tele(
        tele_env, "intercept", "echo", "--port", str(port), "--", "sh", "-c", "kill -TERM $$"
    )
    assert killed.returncode == 143, killed.stderr
    # Ctrl-C while the handler runs: the engagement is left, and the user is told so.
    started = tmp_path / "started"
    handler = subprocess.Popen(
        [
            TELE,
            "intercept",
            "echo",
            "--port",
            str(port),
            "--",
            "sh",
            "-c",
            f"touch {started}; exec sleep 60",
        ],
        env=tele_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():  # the handler's own signal that it runs
            assert handler.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        handler.send_signal(signal.SIGINT)
        _, stderr = handler.communicate(timeout=60)
    finally:
        if handler.poll() is None:
            handler.kill()
            handler.wait()
    assert handler.returncode == 130
    assert stderr.splitlines()[-1] == "Interrupted; left echo."
    assert "echo:" not in run_tele(tele_env, "status").stdout

    # `tele quit` names the engagements it ended.
    again = run_tele(tele_env, "intercept", "echo", "--port", str(port), timeout=120)
    assert again.returncode == 0, again.stderr
    quit_ = run_tele(tele_env, "quit", "-s")
    assert quit_.returncode == 0, quit_.stderr
    assert quit_.stdout.splitlines()[0] == "Left echo."

    # A workload scaled to 0: `tele list` says so, and intercept refuses at once.
    kubectl(node_sandbox, "scale", "deployment/echo", "--replicas=0")
    connect(tele_env, node_sandbox)
    deadline = time.monotonic() + 30
    while "no replicas: scale it up" not in (listed := run_tele(tele_env, "list").stdout):
        assert time.monotonic() < deadline, listed  # the manager's informer catches up
        time.sleep(0.2)
    scaled = run_tele(tele_env, "intercept", "echo", "--port", str(port), timeout=20)
    assert scaled.returncode == 1
    assert single_error_line(scaled) == (
        "tele: Deployment default/echo has 0 replicas: scale it up first "
        "(kubectl scale -n default deployment/echo --replicas=1)."
    )
    assert run_tele(tele_env, "quit").returncode == 0
    uninstalled = run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
    assert uninstalled.returncode == 0, uninstalled.stderr


def test_telepresence_habits(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
) -> None:
    """`intercept -n NS NAME` names it NAME-NS (leave takes either); the handler's environment
    has TELEPRESENCE_INTERCEPT_ID and TELEPRESENCE_CONTAINER; `list -i`, `-a`,
    `--only-interceptable`; `uninstall NAME`; list and intercept connect when not connected."""
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, tele_env)
    kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
    kubectl(node_sandbox, "scale", "deployment/echo", "--replicas=1")
    kubectl(node_sandbox, "rollout", "status", "deployment/echo", "--timeout=90s")
    # Not connected: `tele list` connects first, as `tele connect` would, and says so.
    first = run_tele({**tele_env, "KUBECONFIG": kubeconfig}, "list", timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stderr.startswith("tele: not connected: connected to context "), first.stderr
    assert "echo" in first.stdout
    port = free_port()

    def listed(*flags: str) -> list[str]:
        result = run_tele(tele_env, "list", *flags, "-o", "json")
        assert result.returncode == 0, result.stderr
        return [w["name"] for w in json.loads(result.stdout)]

    assert listed("-i") == []
    assert "echo" in listed("--only-interceptable")
    env_file = tmp_path / "echo.env"
    engaged = run_tele(
        tele_env,
        "intercept",
        "-n",
        "default",
        "echo",
        "--port",
        str(port),
        "-e",
        str(env_file),
        "-o",
        "json",
        timeout=120,
    )
    assert engaged.returncode == 0, engaged.stderr
    data = json.loads(engaged.stdout)
    assert (data["name"], data["workload"]) == ("echo-default", "echo")
    env = env_file.read_text()
    assert f"TELEPRESENCE_INTERCEPT_ID={data['id']}\n" in env
    assert "TELEPRESENCE_CONTAINER=echo\n" in env
    assert listed("-i") == ["echo"]
    assert listed("--intercepts") == ["echo"]
    assert listed("-a") == ["echo"]

    left = run_tele(tele_env, "leave", "echo")
    assert (left.returncode, left.stdout) == (0, "Left echo.\n"), left.stderr
    assert listed("-i") == []
    again = run_tele(tele_env, "intercept", "-n", "default", "echo", "--port", str(port))
    assert again.returncode == 0, again.stderr
    assert run_tele(tele_env, "leave", "echo-default").returncode == 0
    assert listed("-i") == []
    removed = run_tele(tele_env, "uninstall", "echo", timeout=90)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == "Removed the traffic agent from echo.\n"
    assert listed("--agents") == []
    assert run_tele(tele_env, "quit").returncode == 0
    uninstalled = run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
    assert uninstalled.returncode == 0, uninstalled.stderr
