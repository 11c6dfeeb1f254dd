"""VNAT as a user lives it (issue 19): a sandbox laptop namespace whose own network has a route
covering the cluster's pod subnet. `tele connect --vif` there refuses to take that traffic
away; `tele connect --vif --vnat pods` reaches the pods by name through virtual IPs, and the
laptop's route stays."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import trio

from tele.sandbox.network import netns
from tele.sandbox.network.laptop import serve_laptop, shell_command
from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import install_manager, kubectl
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: vnat-echo, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: vnat-echo}}
  template:
    metadata: {labels: {app: vnat-echo}}
    spec:
      containers:
      - name: echo
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: vnat-echo, namespace: default}
spec:
  selector: {app: vnat-echo}
  clusterIP: None
  ports: [{name: http, port: 8080, targetPort: http}]
"""
# A headless Service: its name resolves to the pod's own address (in the pod subnet).
CALL = """
import json, socket, urllib.request
address = socket.gethostbyname("vnat-echo.default")
answer = urllib.request.urlopen("http://vnat-echo.default:8080/", timeout=10).read().decode()
print(json.dumps({"address": address, "answer": answer}))
"""


async def run(
    argv: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    with trio.fail_after(timeout):
        result = await trio.run_process(
            argv, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    return subprocess.CompletedProcess(
        argv, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def test_a_laptop_route_over_the_pod_subnet_with_vnat(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
    nursery: trio.Nursery,
) -> None:
    sandbox = node_sandbox
    install_manager(sandbox, tele_env)
    kubectl(sandbox, "apply", "-f", "-", stdin=APP)
    kubectl(sandbox, "wait", "--for=condition=Ready", "pod", "-l", "app=vnat-echo", "--timeout=90s")
    server = urllib.parse.urlsplit(
        json.loads(kubectl(sandbox, "config", "view", "--minify", "-o", "json"))["clusters"][0][
            "cluster"
        ]["server"]
    )
    cluster = f"tele-vn{sandbox.name[-4:]}"
    laptop = await nursery.start(serve_laptop, cluster, server.hostname, server.port)
    # The laptop's own network has the pod subnet (a VPN, a docker bridge).
    await netns.ip_batch(
        laptop,
        [
            "link add tele-lan0 type veth peer name tele-lan1",
            "link set tele-lan0 up",
            "route add 10.244.0.0/16 dev tele-lan0",
        ],
    )
    home = tmp_path / "laptop"
    tele = [str(Path(sys.executable).parent / "tele")]

    def in_laptop(*argv: str) -> tuple[list[str], dict[str, str]]:
        command, env = shell_command(cluster, home, str(sandbox.kubeconfig), list(argv))
        env.pop("TELE_VIF", None)
        return command, env

    try:
        refused = await run(*in_laptop(*tele, "connect", "--vif"))
        assert refused.returncode != 0
        assert "overlaps the route 10.244.0.0/16 on interface tele-lan0" in refused.stderr
        assert "--vnat 10.244.0.0/16" in refused.stderr
        await run(*in_laptop(*tele, "quit"))

        connected = await run(*in_laptop(*tele, "connect", "--vif", "--vnat", "pods"))
        assert connected.returncode == 0, connected.stderr
        called = await run(*in_laptop(sys.executable, "-c", CALL))
        assert called.returncode == 0, called.stderr
        seen = json.loads(called.stdout)
        assert seen["address"].startswith("246.246."), seen
        assert json.loads(seen["answer"])["pod"].startswith("vnat-echo-")
        routes = await run(["ip", "-n", laptop, "route", "show"], dict(tele_env))
        assert "10.244.0.0/16 dev tele-lan0" in routes.stdout  # the laptop's route stays
        status = await run(*in_laptop(*tele, "status", "-o", "json"))
        vnat = json.loads(status.stdout)["session"]["network"]["vnat"]
        assert vnat["translated"] == ["10.244.0.0/16"] and vnat["mapped"] >= 1
    finally:
        await run(*in_laptop(*tele, "quit"))
        DaemonGuard(in_laptop("true")[1]).kill_all()  # the laptop's daemon, if quit failed
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", str(sandbox.kubeconfig))
        kubectl(sandbox, "delete", "-f", "-", "--wait=false", stdin=APP)


VIA_APPS = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: pv-echo, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: pv-echo}}
  template:
    metadata: {labels: {app: pv-echo}}
    spec:
      containers:
      - name: echo
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: pv-echo, namespace: default}
spec:
  selector: {app: pv-echo}
  clusterIP: None
  ports: [{name: http, port: 8080, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: pv-via, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: pv-via}}
  template:
    metadata: {labels: {app: pv-via}}
    spec:
      containers:
      - name: echo
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}]
"""
VIA_CALL = """
import json, socket, urllib.request
address = socket.gethostbyname("pv-echo.default")
answer = urllib.request.urlopen("http://pv-echo.default:8080/", timeout=20).read().decode()
print(json.dumps({"address": address, "answer": answer}))
"""


async def test_proxy_via_dials_from_the_workloads_pod(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
    nursery: trio.Nursery,
) -> None:
    """`tele connect --proxy-via <pod IP>/32=pv-via`: pv-echo's name resolves to a virtual IP,
    and the connection reaches pv-echo from pv-via's pod (its agent dialled it): pv-echo sees
    pv-via's pod IP as the caller, not the traffic manager's."""
    sandbox = node_sandbox
    install_manager(sandbox, tele_env)
    kubectl(sandbox, "apply", "-f", "-", stdin=VIA_APPS)
    kubectl(sandbox, "wait", "--for=condition=Ready", "pod", "-l", "app=pv-echo", "--timeout=90s")
    target = kubectl(
        sandbox, "get", "pod", "-l", "app=pv-echo", "-o", "jsonpath={.items[0].status.podIP}"
    ).strip()
    assert target, "pv-echo has no pod IP"
    server = urllib.parse.urlsplit(
        json.loads(kubectl(sandbox, "config", "view", "--minify", "-o", "json"))["clusters"][0][
            "cluster"
        ]["server"]
    )
    cluster = f"tele-pv{sandbox.name[-4:]}"
    await nursery.start(serve_laptop, cluster, server.hostname, server.port)
    home = tmp_path / "laptop"
    tele = [str(Path(sys.executable).parent / "tele")]

    def in_laptop(*argv: str) -> tuple[list[str], dict[str, str]]:
        command, env = shell_command(cluster, home, str(sandbox.kubeconfig), list(argv))
        env.pop("TELE_VIF", None)
        return command, env

    try:
        connect = [*tele, "connect", "--vif", "--proxy-via", f"{target}/32=pv-via"]
        connected = await run(*in_laptop(*connect), timeout=180)
        assert connected.returncode == 0, connected.stderr
        pods = json.loads(kubectl(sandbox, "get", "pod", "-l", "app=pv-via", "-o", "json"))
        with_agent = [
            p
            for p in pods["items"]
            if not p["metadata"].get("deletionTimestamp")
            and any(c["name"] == "traffic-agent" for c in p["spec"]["containers"])
        ]
        assert len(with_agent) == 1, pods
        via_ip = with_agent[0]["status"]["podIP"]
        called = await run(*in_laptop(sys.executable, "-c", VIA_CALL))
        assert called.returncode == 0, called.stderr
        seen = json.loads(called.stdout)
        assert seen["address"].startswith("246.246."), seen
        answer = json.loads(seen["answer"])
        assert answer["pod"].startswith("pv-echo-")
        assert answer["peer"] == via_ip, (answer["peer"], via_ip)
        status = await run(*in_laptop(*tele, "status", "-o", "json"))
        network = json.loads(status.stdout)["session"]["network"]
        assert network["proxy_via"] == [
            {
                "subnet": f"{target}/32",
                "workload": "pv-via",
                "pods": [f"default/{with_agent[0]['metadata']['name']}"],
            }
        ]
        assert network["vnat"]["translated"] == [f"{target}/32"]
        shown = await run(*in_laptop(*tele, "status"))
        assert f"Proxy via:          {target}/32 from pv-via (pods default/pv-via-" in shown.stdout

        # A new manager pod forgets the session and its route: the daemon arrives again, asks
        # for the route again, and the next connection is again dialled from pv-via's pod.
        kubectl(sandbox, "delete", "pod", "-n", "ambassador", "-l", "app=traffic-manager")
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
        again: subprocess.CompletedProcess[str] | None = None
        with trio.move_on_after(120):
            while again is None or again.returncode != 0:
                again = await run(*in_laptop(sys.executable, "-c", VIA_CALL))
                if again.returncode != 0:
                    await trio.sleep(1)  # waiting for the daemon's re-arrival, not for time
        assert again is not None and again.returncode == 0, again and again.stderr
        answer = json.loads(json.loads(again.stdout)["answer"])
        assert answer["peer"] == via_ip, (answer["peer"], via_ip)
    finally:
        await run(*in_laptop(*tele, "quit"))
        DaemonGuard(in_laptop("true")[1]).kill_all()
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", str(sandbox.kubeconfig))
        kubectl(sandbox, "delete", "-f", "-", "--wait=false", stdin=VIA_APPS)
