"""Issue 18 on the sandbox, as a user types it: `tele intercept` again with another filter or
port is refused naming the engagement (not answered with the old one and rc 0); the filter is
shown by intercept (text and JSON) and by `tele status`; two engagements into one local port are
refused; a filter the agent could not match is refused before anything changes."""

from __future__ import annotations

import json
import socket

import pytest

from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import install_manager, kubectl
from tests.e2e.test_intercept_on_sandbox import APP
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_intercept_says_what_it_engaged_and_refuses_what_it_would_not_do(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
) -> None:
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, tele_env)
    kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
    kubectl(node_sandbox, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")
    connected = run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", kubeconfig, timeout=120)
    assert connected.returncode == 0, connected.stderr
    port, other = _free_port(), _free_port()

    # Item 2: a regex that does not compile is refused before the cluster changes.
    bad = run_tele(tele_env, "intercept", "echo", "--http-path-regex", "([")
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "tele: --http-path-regex '([' does not compile: unterminated character set at position 1"
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
        f"tele: you already have intercept echo (http: header x-dev=me, path prefix /api -> "
        f"127.0.0.1:{port}); to change it, leave it first (`tele leave echo`)"
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
        f"tele: local port {port} already receives the traffic of echo; "
        "choose another with --port, or leave echo first"
    )
    assert "echo-you" not in run_tele(tele_env, "status").stdout

    assert run_tele(tele_env, "leave", "echo").returncode == 0
    assert run_tele(tele_env, "quit").returncode == 0
    uninstalled = run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
    assert uninstalled.returncode == 0, uninstalled.stderr
