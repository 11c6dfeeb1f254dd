"""`tele genyaml` with an agent port other than the traffic manager's Helm agent.port: the
hand-injected agent listens where its configuration says, and the manager engages it by that
configuration (it used its own agent.port, and the intercepted calls silently reached the app).
`tele genyaml config --manager-port` is the connected manager's Helm apiPort."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.util import DaemonGuard, run_tele, single_error_line
from tests.e2e import (
    HAND_APP,
    connect,
    genyaml,
    hand_injected,
    install_manager,
    kubectl,
    laptop_http,
)
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

AGENT_PORT = 9950  # the chart's agent.port is 9900
API_PORT = 8091  # the chart's apiPort is 8081

CALLER = """
apiVersion: v1
kind: Pod
metadata: {name: caller, namespace: default}
spec:
  containers: [{name: c, image: tele-sandbox/worker}]
"""


def call(sandbox: NodeSandbox, url: str) -> str:
    """What the caller pod gets from `url` (a cluster-side client)."""
    script = (
        f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    )
    return kubectl(sandbox, "exec", "caller", "--", "python3", "-c", script).strip()


def test_a_hand_injected_agent_on_another_agent_port_is_intercepted(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
) -> None:
    import yaml

    sandbox = node_sandbox
    kubeconfig = str(sandbox.kubeconfig)
    install_manager(sandbox, tele_env)
    try:
        app, config = tmp_path / "hand.yaml", tmp_path / "config.yaml"
        app.write_text(HAND_APP)
        genyaml(
            tele_env, "config", "-i", str(app), "--agent-port", str(AGENT_PORT), "-o", str(config)
        )
        documents = hand_injected(tele_env, app, config)
        kubectl(sandbox, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents) + "---" + CALLER)
        kubectl(sandbox, "rollout", "status", "deployment/hand", "--timeout=90s")
        kubectl(sandbox, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")

        connected = run_tele(
            tele_env, "connect", "--no-vif", "--kubeconfig", kubeconfig, timeout=120
        )
        assert connected.returncode == 0, connected.stderr
        with laptop_http("handled here") as port:
            engaged = run_tele(tele_env, "intercept", "hand", "-p", str(port), timeout=120)
            assert engaged.returncode == 0, engaged.stderr
            assert call(sandbox, "http://hand.default/") == "handled here"
            assert run_tele(tele_env, "leave", "hand", timeout=60).returncode == 0
        assert call(sandbox, "http://hand.default/").startswith('{"pod": "hand-')

        # Uninstalling leaves the agent its owner put in (no restart could take it out).
        assert run_tele(tele_env, "quit").returncode == 0
        uninstalled = run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig,
                               timeout=120)  # fmt: skip
        assert uninstalled.returncode == 0, uninstalled.stderr
        assert (
            "tele: Deployment default/hand keeps its traffic agent: it was injected by hand "
            "(manually-injected; remove the agent from its pod template)"
        ) in uninstalled.stderr.splitlines()
        assert call(sandbox, "http://hand.default/").startswith('{"pod": "hand-')
    finally:
        run_tele(tele_env, "quit")
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)


def test_genyaml_takes_the_connected_managers_api_port(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
) -> None:
    """`--manager-port` must be the Helm apiPort: connected, genyaml takes the installed
    manager's and refuses another; not connected, it says the default was not checked, and an
    agent configured so (for the wrong port) makes the intercept say why it did not arrive."""
    import yaml

    sandbox = node_sandbox
    kubeconfig = str(sandbox.kubeconfig)
    install_manager(sandbox, tele_env, f"apiPort={API_PORT}", "timeouts.agentArrival=15s")
    try:
        app, offline = tmp_path / "hand.yaml", tmp_path / "offline.yaml"
        app.write_text(HAND_APP)
        made = run_tele(tele_env, "genyaml", "config", "-i", str(app), "-o", str(offline))
        assert made.returncode == 0, made.stderr
        assert made.stderr.splitlines() == [
            "tele: --manager-port 8081 was not checked (not connected to a cluster): it must "
            "be the traffic manager's Helm apiPort."
        ]
        assert yaml.safe_load(offline.read_text())["manager_port"] == 8081

        connect(tele_env, sandbox)
        made = run_tele(tele_env, "genyaml", "config", "-i", str(app))
        assert (made.returncode, made.stderr) == (0, "")
        assert yaml.safe_load(made.stdout)["manager_port"] == API_PORT
        other = run_tele(tele_env, "genyaml", "config", "-i", str(app), "--manager-port", "8081")
        assert other.returncode == 1
        assert single_error_line(other) == (
            f"tele: The traffic manager in namespace ambassador listens on port {API_PORT} (its "
            f"Helm apiPort), not 8081: leave out --manager-port or give {API_PORT}."
        )
        elsewhere = run_tele(
            tele_env, "genyaml", "config", "-i", str(app), "--manager-namespace", "tm"
        )
        assert single_error_line(elsewhere) == (
            "tele: The connected traffic manager is in namespace ambassador, not tm: leave out "
            "--manager-namespace or give ambassador."
        )

        # The configuration made offline, for 8081, applied: its agent never arrives.
        documents = hand_injected(tele_env, app, offline)
        kubectl(sandbox, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
        kubectl(sandbox, "rollout", "status", "deployment/hand", "--timeout=90s")
        engaged = run_tele(tele_env, "intercept", "hand", "-p", "9", timeout=120)
        assert engaged.returncode != 0
        assert (
            "arrived within 15s: its hand-injected traffic agent is configured to reach the "
            "traffic manager at traffic-manager.ambassador:8081, but it listens at "
            f"traffic-manager.ambassador:{API_PORT} (Helm apiPort)"
        ) in single_error_line(engaged)
    finally:
        run_tele(tele_env, "quit")
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
        kubectl(sandbox, "delete", "deployment", "hand", "--ignore-not-found", "--wait=false")
