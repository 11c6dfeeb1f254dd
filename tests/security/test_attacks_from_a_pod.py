"""Issue 15's attacks, made again as a hostile tenant would: from a plain pod in another
namespace of the sandbox, running tele's own image and tele's own client code (tele.rpc),
while a developer is connected and intercepts a workload. Each attack must fail:

- arrive at the manager (without a credential; with the pod's own ServiceAccount token);
- use the developer's session id (stolen: `tele status` shows it) to list, ingest, remain, or
  dial the Kubernetes API server and the agent's file server through the manager's tunnel;
- pose as the agent of the intercepted workload (its own ServiceAccount token; a projected
  token with the agents' audience, bound to the attacker's own pod);
- talk to the agent's file server directly over the pod network.

The developer's session keeps working throughout (the positive control)."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import install_manager, kubectl
from tests.e2e.test_intercept_on_sandbox import laptop_handler  # noqa: F401 - the fixture
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

IMAGE = "tele/traffic-manager:0.1.0"
"""tele's one image (manager and agent): the attacker brings tele's client code in it."""

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}]
        volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Namespace
metadata: {name: attack}
---
apiVersion: v1
kind: Pod
metadata: {name: mallory, namespace: attack}
spec:
  containers:
  - name: m
    image: IMAGE
    command: ["/usr/bin/python3.11", "-c", "import time; time.sleep(10**6)"]
    volumeMounts: [{name: agent-token, mountPath: /var/run/secrets/attack}]
  volumes:
  - name: agent-token
    projected:
      sources:
      - serviceAccountToken: {path: token, audience: tele-traffic-manager, expirationSeconds: 3600}
""".replace("IMAGE", IMAGE)

ATTACK = r"""
import ipaddress, json, sys
import trio
from tele.net.tunnel import Destination, Protocol
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.client import open_client
from tele.rpc.errors import RpcError
from tele.rpc.tunnel import TunnelError, dial

manager_ip, stolen, api_ip, agent_ip, sftp_port, agent_pod = sys.argv[1:7]
sftp_port = int(sftp_port)
SA = "/var/run/secrets/kubernetes.io/serviceaccount/token"
AUDIENCE = "/var/run/secrets/attack/token"
ME = api.ClientIdentity(user="mallory", host="attack", client_version="0.1.0")
results = {}

def tcp(ip, port):
    return Destination(Protocol.TCP, ipaddress.ip_address(ip), port)

async def outcome(name, awaitable):
    try:
        got = await awaitable
    except RpcError as exc:
        results[name] = f"refused {exc.code.value}: {exc.message}"
    except TunnelError as exc:
        results[name] = f"refused tunnel: {exc}"
    except (OSError, trio.BrokenResourceError) as exc:
        results[name] = f"refused {type(exc).__name__}: {exc}"
    else:
        if hasattr(got, "aclose"):
            await got.aclose()
        results[name] = f"served: {str(got)[:200]}"

def read(path):
    with open(path) as f:
        return f.read().strip()

async def attempts(client, prefix):
    await outcome(prefix + "arrive", client.call(api.ARRIVE, ME))
    session = api.SessionRequest(session_id=stolen)
    await outcome(prefix + "remain-stolen", client.call(api.REMAIN, session))
    await outcome(prefix + "list-stolen", client.call(
        api.LIST_WORKLOADS, api.WorkloadsRequest(session_id=stolen, namespace="default")))
    await outcome(prefix + "ingest-stolen", client.call(aapi.ENGAGE, aapi.EngageRequest(
        session_id=stolen, namespace="default", workload="echo", kind="ingest")))
    await outcome(prefix + "dial-api-stolen", dial(client.link, tcp(api_ip, 443), session=stolen))
    await outcome(prefix + "dial-sftp-stolen",
                  dial(client.link, tcp(agent_ip, sftp_port), session=stolen))

async def main():
    async with open_client(await trio.open_tcp_stream(manager_ip, 8081)) as client:
        await attempts(client, "anonymous/")
    async with open_client(await trio.open_tcp_stream(manager_ip, 8081)) as client:
        await outcome("sa/authenticate",
                      client.call(api.AUTHENTICATE, api.AuthenticateRequest(token=read(SA))))
        await attempts(client, "sa/")
    agent = aapi.AgentIdentity(pod_name=agent_pod, namespace="default", pod_ip=agent_ip,
                               workload_name="echo", workload_kind="Deployment", version="0.1.0")
    for name, path in (("agent-sa", SA), ("agent-audience", AUDIENCE)):
        async with open_client(await trio.open_tcp_stream(manager_ip, 8081)) as client:
            await outcome(name + "/authenticate", client.call(
                api.AUTHENTICATE, api.AuthenticateRequest(token=read(path), agent=True)))
            await outcome(name + "/arrive-as-agent", client.call(aapi.ARRIVE_AS_AGENT, agent))
    # The agent's file server, straight over the pod network: an SFTP INIT.
    try:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(agent_ip, sftp_port)
            async with stream:
                await stream.send_all(b"\0\0\0\x05\x01\0\0\0\x03")
                reply = await stream.receive_some(64)
        results["sftp-direct"] = f"served: {reply!r}" if reply else "refused: closed"
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        results["sftp-direct"] = f"refused {type(exc).__name__}: {exc}"

trio.run(main)
print(json.dumps(results))
"""


def _sftp_port(sandbox: NodeSandbox, pod: str) -> int:
    """The agent's file-server port, from its log line."""
    deadline = time.monotonic() + 30
    while True:
        log = kubectl(sandbox, "logs", pod, "-c", "traffic-agent")
        found = re.search(r"serving /tel_app_mounts/echo over SFTP on port (\d+)", log)
        if found:
            return int(found.group(1))
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.5)  # a log line to wait for: no event to wait on from here


def test_a_pod_of_another_namespace_gets_nothing_with_teles_own_client(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    laptop_handler: int,  # noqa: F811
) -> None:
    install_manager(node_sandbox, tele_env)
    kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
    kubectl(
        node_sandbox,
        "wait",
        "-n",
        "attack",
        "--for=condition=Ready",
        "pod/mallory",
        "--timeout=90s",
    )
    kubeconfig = str(node_sandbox.kubeconfig)
    assert run_tele(tele_env, "connect", "--kubeconfig", kubeconfig, timeout=120).returncode == 0
    engaged = run_tele(
        tele_env, "intercept", "echo", "--port", str(laptop_handler), "--mount", "false"
    )
    assert engaged.returncode == 0, engaged.stderr
    status = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
    stolen = status["session"]["session_id"]
    assert stolen
    pod = kubectl(
        node_sandbox,
        "get",
        "pods",
        "-l",
        "app=echo",
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    )
    agent_ip = kubectl(node_sandbox, "get", "pod", pod, "-o", "jsonpath={.status.podIP}")
    sftp_port = _sftp_port(node_sandbox, pod)
    manager_ip = kubectl(
        node_sandbox,
        "get",
        "svc",
        "-n",
        "ambassador",
        "traffic-manager",
        "-o",
        "jsonpath={.spec.clusterIP}",
    )
    api_ip = kubectl(node_sandbox, "get", "svc", "kubernetes", "-o", "jsonpath={.spec.clusterIP}")

    out = kubectl(
        node_sandbox,
        "exec",
        "-n",
        "attack",
        "mallory",
        "--",
        "/usr/bin/python3.11",
        "-c",
        ATTACK,
        manager_ip,
        stolen,
        api_ip,
        agent_ip,
        str(sftp_port),
        pod,
    )
    results = json.loads(out.strip().splitlines()[-1])
    served = {k: v for k, v in results.items() if not v.startswith("refused")}
    # Its own ServiceAccount tokens are valid credentials (they say who the pod is: its own
    # account); nothing is served to that identity.
    assert set(served) == {"sa/authenticate", "agent-audience/authenticate"}, results
    assert all("system:serviceaccount:attack:default" in v for v in served.values())
    assert results["anonymous/arrive"].startswith("refused unauthenticated"), results
    assert results["sa/arrive"] == (
        "refused permission_denied: system:serviceaccount:attack:default may not create "
        "pods/portforward in namespace ambassador to reach the traffic manager"
    ), results
    for what in ("remain", "list", "ingest"):
        assert results[f"sa/{what}-stolen"].startswith("refused not_found"), results
    for who in ("anonymous", "sa"):
        for where in ("api", "sftp"):
            refused = results[f"{who}/dial-{where}-stolen"]
            assert refused.startswith("refused tunnel:"), results
            assert refused.endswith("is not allowed by the traffic manager's policy"), results
    assert results["sftp-direct"].startswith("refused"), results
    assert results["agent-sa/authenticate"].startswith("refused unauthenticated"), results
    assert results["agent-audience/arrive-as-agent"] == (
        "refused permission_denied: refused as an agent: pod attack/mallory has no traffic "
        "agent injected"
    ), results
    # The developer's session is still there, and still theirs.
    status = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
    assert status["session"]["session_id"] == stolen
    listed = run_tele(tele_env, "list", "-o", "json")
    assert listed.returncode == 0 and "echo" in listed.stdout
