"""`tele genyaml`: the YAML for a hand-injected agent, as a user runs it (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.daemon.util import run_tele, single_error_line

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: hand, namespace: shop}
spec:
  template:
    metadata:
      labels: {app: hand}
      annotations: {telepresence.io/manually-injected: "true"}
    spec:
      containers:
      - name: hand
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}]
        env: [{name: GREETING, value: hi}]
---
apiVersion: v1
kind: Service
metadata: {name: hand, namespace: shop}
spec:
  selector: {app: hand}
  ports: [{name: http, port: 80, targetPort: http}]
"""


def test_genyaml_writes_config_container_init_container_and_volumes(
    tele_env: dict[str, str], tmp_path: Path
) -> None:
    app = tmp_path / "app.yaml"
    app.write_text(APP)
    config = tmp_path / "config.yaml"
    made = run_tele(tele_env, "genyaml", "config", "-i", str(app), "-o", str(config))
    assert made.returncode == 0, made.stderr
    written = yaml.safe_load(config.read_text())
    assert (written["namespace"], written["workload_name"]) == ("shop", "hand")
    [intercept] = written["containers"][0]["intercepts"]
    assert (intercept["service_name"], intercept["agent_port"]) == ("hand", 9900)
    assert intercept["target_port_numeric"]  # hand-injected: redirected, nothing renamed

    agent = yaml.safe_load(
        run_tele(tele_env, "genyaml", "container", "-c", str(config), "-i", str(app)).stdout
    )
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert agent["name"] == "traffic-agent" and env["_TEL_APP_A_GREETING"] == "hi"
    assert json.loads(env["_TEL_AGENT_CONFIG"])["workload_name"] == "hand"
    assert agent["ports"] == [{"containerPort": 9900, "protocol": "TCP"}]
    init = yaml.safe_load(run_tele(tele_env, "genyaml", "initcontainer", "-c", str(config)).stdout)
    assert init["name"] == "tele-agent-init"
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    volumes = yaml.safe_load(run_tele(tele_env, "genyaml", "volume", "-c", str(config)).stdout)
    assert [v["name"] for v in volumes] == ["traffic-agent-token"]


def test_genyaml_not_connected_says_the_manager_port_was_not_checked(
    tele_env: dict[str, str], tmp_path: Path
) -> None:
    """Without a connected traffic manager, --manager-port (default 8081, as Telepresence's)
    cannot be checked against its Helm apiPort: one line on stderr says so."""
    app = tmp_path / "app.yaml"
    app.write_text(APP)
    for given, port in (((), 8081), (("--manager-port", "8091"), 8091)):
        made = run_tele(tele_env, "genyaml", "config", "-i", str(app), *given)
        assert made.returncode == 0, made.stderr
        written = yaml.safe_load(made.stdout)
        assert (written["manager_host"], written["manager_port"]) == (
            "traffic-manager.ambassador",
            port,
        )
        assert made.stderr.splitlines() == [
            f"tele: --manager-port {port} was not checked (not connected to a cluster): it must "
            "be the traffic manager's Helm apiPort."
        ]


def test_genyaml_bad_input_is_one_sentence(tele_env: dict[str, str], tmp_path: Path) -> None:
    missing = run_tele(tele_env, "genyaml", "config", "-i", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1
    assert single_error_line(missing).startswith("tele: Cannot read the input ")
    service_only = tmp_path / "svc.yaml"
    service_only.write_text(APP.split("---")[1])
    no_workload = run_tele(tele_env, "genyaml", "config", "-i", str(service_only))
    assert single_error_line(no_workload).startswith(f"tele: {service_only} has no workload")
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("a: [unclosed")
    bad = run_tele(tele_env, "genyaml", "container", "-c", str(garbage), "-i", str(garbage))
    assert single_error_line(bad).startswith(f"tele: The configuration {garbage} is not valid")
