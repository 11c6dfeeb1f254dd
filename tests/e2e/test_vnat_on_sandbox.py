"""VNAT as a user lives it (issue 19): a sandbox laptop namespace whose own network has a route
covering the cluster's pod subnet. `tele connect --vif` there refuses to take that traffic
away; `tele connect --vif --vnat pods` reaches the pods by name through virtual IPs, and the
laptop's route stays."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from tele.sandbox.network import netns
from tele.sandbox.network.laptop import serve_laptop, shell_command
from tele.sandbox.network.relay import relaying_to
from tests.daemon.util import DaemonGuard, run_tele, single_error_line
from tests.e2e import install_manager, kubectl, wait_rolled
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


TELE = [str(Path(sys.executable).parent / "tele")]


@pytest.fixture(autouse=True)
def _no_manager_left(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
) -> Iterator[None]:
    """A test that fails in its set-up, before its own `finally`, must not leave the traffic
    manager installed for the next one (which would find the release there and fail too)."""
    yield
    run_tele(tele_env, "helm", "uninstall", "--kubeconfig", str(node_sandbox.kubeconfig))


Command = tuple[list[str], dict[str, str]]


async def start_laptop(
    nursery: trio.Nursery, sandbox: NodeSandbox, prefix: str, home: Path, *, own_pod_route: bool
) -> tuple[str, Callable[..., Command]]:
    """A sandbox laptop namespace (named from `prefix`) reaching the sandbox's API server, and
    `in_laptop(*argv)`: the command and environment that run argv there, with the VIF allowed.
    `own_pod_route`: the laptop's own network has the pod subnet (a VPN, a docker bridge)."""
    server = urllib.parse.urlsplit(
        json.loads(kubectl(sandbox, "config", "view", "--minify", "-o", "json"))["clusters"][0][
            "cluster"
        ]["server"]
    )
    cluster = f"{prefix}{sandbox.name[-4:]}"
    # The cluster runs in another thread's trio run: the laptop's listener relays to its API
    # server instead of being served by it.
    target = (server.hostname or "127.0.0.1", server.port or 443)
    laptop: str = await nursery.start(serve_laptop, cluster, *target, relaying_to(target))
    if own_pod_route:
        await netns.ip_batch(
            laptop,
            [
                "link add tele-lan0 type veth peer name tele-lan1",
                "link set tele-lan0 up",
                "route add 10.244.0.0/16 dev tele-lan0",
            ],
        )

    def in_laptop(*argv: str) -> Command:
        command, env = shell_command(cluster, home, str(sandbox.kubeconfig), list(argv))
        env.pop("TELE_VIF", None)
        return command, env

    return laptop, in_laptop


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
    wait_rolled(sandbox, "vnat-echo")
    # The laptop's own network has the pod subnet (a VPN, a docker bridge).
    laptop, in_laptop = await start_laptop(
        nursery, sandbox, "tele-vn", tmp_path / "laptop", own_pod_route=True
    )

    try:
        refused = await run(*in_laptop(*TELE, "connect", "--vif"))
        assert refused.returncode != 0
        assert "overlaps the route 10.244.0.0/16 on interface tele-lan0" in refused.stderr
        assert "--vnat 10.244.0.0/16" in refused.stderr
        await run(*in_laptop(*TELE, "quit"))

        connected = await run(*in_laptop(*TELE, "connect", "--vif", "--vnat", "pods"))
        assert connected.returncode == 0, connected.stderr
        called = await run(*in_laptop(sys.executable, "-c", CALL))
        assert called.returncode == 0, called.stderr
        seen = json.loads(called.stdout)
        assert seen["address"].startswith("246.246."), seen
        assert json.loads(seen["answer"])["pod"].startswith("vnat-echo-")
        routes = await run(["ip", "-n", laptop, "route", "show"], dict(tele_env))
        assert "10.244.0.0/16 dev tele-lan0" in routes.stdout  # the laptop's route stays
        status = await run(*in_laptop(*TELE, "status", "-o", "json"))
        vnat = json.loads(status.stdout)["session"]["network"]["vnat"]
        assert vnat["translated"] == ["10.244.0.0/16"] and vnat["mapped"] >= 1
    finally:
        await run(*in_laptop(*TELE, "quit"))
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
    wait_rolled(sandbox, "pv-echo")
    target = kubectl(
        sandbox, "get", "pod", "-l", "app=pv-echo", "-o", "jsonpath={.items[0].status.podIP}"
    ).strip()
    assert target, "pv-echo has no pod IP"
    _, in_laptop = await start_laptop(
        nursery, sandbox, "tele-pv", tmp_path / "laptop", own_pod_route=False
    )

    try:
        connect = [*TELE, "connect", "--vif", "--proxy-via", f"{target}/32=pv-via"]
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
        status = await run(*in_laptop(*TELE, "status", "-o", "json"))
        network = json.loads(status.stdout)["session"]["network"]
        assert network["proxy_via"] == [
            {
                "subnet": f"{target}/32",
                "workload": "pv-via",
                "pods": [f"default/{with_agent[0]['metadata']['name']}"],
            }
        ]
        assert network["vnat"]["translated"] == [f"{target}/32"]
        shown = await run(*in_laptop(*TELE, "status"))
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
        await run(*in_laptop(*TELE, "quit"))
        DaemonGuard(in_laptop("true")[1]).kill_all()
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", str(sandbox.kubeconfig))
        kubectl(sandbox, "delete", "-f", "-", "--wait=false", stdin=VIA_APPS)


UDP_APPS = """
apiVersion: v1
kind: Namespace
metadata: {name: pv-other}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: pv-udp, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: pv-udp}}
  template:
    metadata: {labels: {app: pv-udp}}
    spec:
      containers:
      - name: echo
        image: tele-sandbox/l4-echo
        env: [{name: UDP_SAY_PEER, value: "1"}]
        ports: [{name: echo, containerPort: 9000}]
        readinessProbe: {tcpSocket: {port: echo}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: pv-udp, namespace: default}
spec:
  selector: {app: pv-udp}
  clusterIP: None
  ports: [{name: echo, port: 9000, targetPort: echo, protocol: UDP}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: pv-other-via, namespace: pv-other}
spec:
  replicas: 1
  selector: {matchLabels: {app: pv-other-via}}
  template:
    metadata: {labels: {app: pv-other-via}}
    spec:
      containers:
      - name: echo
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: pv-hostnet, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: pv-hostnet}}
  template:
    metadata: {labels: {app: pv-hostnet}}
    spec:
      hostNetwork: true
      containers:
      - name: app
        image: tele-sandbox/l4-echo
        env: [{name: PORT, value: "19797"}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: pv-none, namespace: default}
spec:
  replicas: 0
  selector: {matchLabels: {app: pv-none}}
  template:
    metadata: {labels: {app: pv-none}}
    spec:
      containers:
      - name: echo
        image: tele-sandbox/echo
"""
# UDP to pv-udp (it answers with the sender's address), then a DNS query over UDP to the
# cluster's DNS server: both addresses are behind --proxy-via, so both go out of the pod.
UDP_CALL = """
import json, socket, struct

def ask(address, port, payload):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(20)
        s.sendto(payload, (address, port))
        return s.recv(4096)

echo = socket.gethostbyname("pv-udp.default")
said = ask(echo, 9000, b"over udp").decode()
dns = socket.gethostbyname("kube-dns.kube-system")
name = b"".join(bytes([len(p)]) + p for p in b"pv-udp.default.svc.cluster.local".split(b"."))
query = struct.pack(">6H", 0x7E1E, 0x0100, 1, 0, 0, 0) + name + b"\\0" + struct.pack(">HH", 1, 1)
answer = ask(dns, 53, query)
ident, flags, _, count = struct.unpack(">4H", answer[:8])
print(json.dumps({
    "echo": echo, "said": said, "dns": dns, "id": ident, "rcode": flags & 15,
    "answers": count, "last": socket.inet_ntoa(answer[-4:]),
}))
"""


async def test_proxy_via_udp_and_a_workload_of_another_namespace(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
    nursery: trio.Nursery,
) -> None:
    """`--proxy-via pods=WORKLOAD.NAMESPACE` on a laptop whose own route covers the pod subnet
    routes it through a workload of another namespace; UDP (an echo that names its sender, and
    a DNS query to the cluster's DNS server) is sent from that workload's pod. Before that,
    what cannot work is one sentence and no session: no VIF, an unknown workload or namespace,
    a workload with no pod to dial from or whose pods cannot run an agent, a --vnat subnet
    overlapping the pod subnet."""
    sandbox = node_sandbox
    install_manager(sandbox, tele_env)
    kubectl(sandbox, "apply", "-f", "-", stdin=UDP_APPS)
    wait_rolled(sandbox, "pv-udp")
    wait_rolled(sandbox, "pv-other-via", "pv-other")
    target = kubectl(
        sandbox, "get", "pod", "-l", "app=pv-udp", "-o", "jsonpath={.items[0].status.podIP}"
    ).strip()
    assert target, "pv-udp has no pod IP"
    # The laptop's own network has the pod subnet (a VPN): --proxy-via pods takes it anyway.
    laptop, in_laptop = await start_laptop(
        nursery, sandbox, "tele-pu", tmp_path / "laptop", own_pod_route=True
    )

    refusals = {
        ("--no-vif", "10.1.0.0/24=pv-other-via.pv-other"): (
            "tele: --proxy-via needs the virtual network interface (its subnets' virtual IPs "
            "are routed there), which --no-vif turns off; drop one of the two."
        ),
        ("--vif", "10.1.0.0/24=nosuch.pv-other"): (
            "tele: --proxy-via 10.1.0.0/24=nosuch.pv-other: No workload named nosuch in "
            "namespace pv-other"
        ),
        ("--vif", "10.1.0.0/24=nosuch.default"): (
            "tele: --proxy-via 10.1.0.0/24=nosuch.default: No workload named nosuch in "
            "namespace default"
        ),
        ("--vif", "10.1.0.0/24=pv-other-via.nosuch"): (
            "tele: --proxy-via 10.1.0.0/24=pv-other-via.nosuch: No workload named "
            "pv-other-via.nosuch in namespace default (for a workload in another namespace, "
            "WORKLOAD.NAMESPACE: nosuch is no namespace this traffic manager manages)."
        ),
        ("--vif", "10.1.0.0/24=pv-hostnet"): (
            "tele: --proxy-via 10.1.0.0/24=pv-hostnet: Deployment default/pv-hostnet cannot "
            "run a traffic agent for --proxy-via: its pods use the node's network (hostNetwork)"
        ),
        ("--vif", "10.1.0.0/24=pv-none"): (
            "tele: --proxy-via 10.1.0.0/24=pv-none: Deployment default/pv-none has 0 "
            "replicas: no pod can dial for --proxy-via"
        ),
        # Known once arrived (pods is the cluster's pod subnet): the session departs before
        # the workload is asked for, so no agent is injected.
        ("--vif", "pods=pv-other-via.pv-other", "--vnat", "10.244.0.0/24"): (
            "tele: --proxy-via 10.244.0.0/16=pv-other-via.pv-other overlaps --vnat "
            "10.244.0.0/24: an address goes out through the workload or through the traffic "
            "manager, not both; give subnets that do not overlap"
        ),
    }
    try:
        for (vif, flag, *more), sentence in refusals.items():
            refused = await run(*in_laptop(*TELE, "connect", vif, "--proxy-via", flag, *more))
            assert refused.returncode == 1, refused
            assert single_error_line(refused).startswith(sentence), refused.stderr
            assert ("is no namespace" in sentence) == ("is no namespace" in refused.stderr)
            status = await run(*in_laptop(*TELE, "status", "-o", "json"))
            assert json.loads(status.stdout).get("session") is None, status.stdout
        for namespace, app in (("pv-other", "pv-other-via"), ("default", "pv-hostnet")):
            pods = kubectl(sandbox, "get", "pod", "-n", namespace, "-o", "json")
            assert f'"{app}-' in pods and "traffic-agent" not in pods  # no agent injected

        connect = [
            *TELE,
            "connect",
            "--vif",
            "--proxy-via",
            "pods=pv-other-via.pv-other",
            "--proxy-via",
            "10.96.0.10/32=pv-other-via.pv-other",
        ]
        connected = await run(*in_laptop(*connect), timeout=180)
        assert connected.returncode == 0, connected.stderr
        pods = json.loads(
            kubectl(sandbox, "get", "pod", "-n", "pv-other", "-l", "app=pv-other-via", "-o", "json")
        )
        with_agent = [
            p
            for p in pods["items"]
            if not p["metadata"].get("deletionTimestamp")
            and any(c["name"] == "traffic-agent" for c in p["spec"]["containers"])
        ]
        assert len(with_agent) == 1, pods
        via_ip = with_agent[0]["status"]["podIP"]
        called = await run(*in_laptop(sys.executable, "-c", UDP_CALL))
        assert called.returncode == 0, called.stderr
        seen = json.loads(called.stdout)
        assert seen["echo"].startswith("246.246.") and seen["dns"].startswith("246.246."), seen
        assert seen["said"] == f"{via_ip} over udp", (seen, via_ip)  # sent from the pod
        assert (seen["id"], seen["rcode"], seen["last"]) == (0x7E1E, 0, target), seen
        status = await run(*in_laptop(*TELE, "status", "-o", "json"))
        network = json.loads(status.stdout)["session"]["network"]
        pod = f"pv-other/{with_agent[0]['metadata']['name']}"
        assert network["proxy_via"] == [
            {"subnet": "10.244.0.0/16", "workload": "pv-other-via.pv-other", "pods": [pod]},
            {"subnet": "10.96.0.10/32", "workload": "pv-other-via.pv-other", "pods": [pod]},
        ]
        assert network["udp_flows"] >= 2
        routes = await run(["ip", "-n", laptop, "route", "show"], dict(tele_env))
        assert "10.244.0.0/16 dev tele-lan0" in routes.stdout  # the laptop's route stays
    finally:
        await run(*in_laptop(*TELE, "quit"))
        DaemonGuard(in_laptop("true")[1]).kill_all()
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", str(sandbox.kubeconfig))
        kubectl(sandbox, "delete", "-f", "-", "--wait=false", "--ignore-not-found", stdin=UDP_APPS)
