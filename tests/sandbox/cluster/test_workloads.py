"""Workloads on the running sandbox, driven by kubectl and the official Python client: rollout,
Service by DNS name reaching every replica, logs, restart, scale, disruption budgets and the
port-forward websocket."""

from __future__ import annotations

import json
import threading

import pytest

from .conftest import MANIFESTS, Kubectl, NodeSandbox

pytestmark = pytest.mark.netns


def _pods(kubectl: Kubectl, selector: str = "app=echo") -> list[dict]:  # type: ignore[type-arg]
    out = kubectl.run("get", "pods", "-l", selector, "-o", "json").stdout
    return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]


def _close_portforward(pf: object, port: int) -> None:
    """Close the client's sockets and wait for its proxy thread, which closes the websocket."""
    pf.close()  # type: ignore[attr-defined]
    for thread in threading.enumerate():
        if thread.name == f"Kubernetes port forward proxy: {port}":
            thread.join(10)
    pf.websocket.close()  # type: ignore[attr-defined]
    pf.websocket.shutdown()  # type: ignore[attr-defined]  # after a server-side close too


def _rollout(kubectl: Kubectl) -> None:
    kubectl.run("rollout", "status", "deployment/echo", "--timeout=60s")


def _client_answers(kubectl: Kubectl, name: str) -> list[dict]:  # type: ignore[type-arg]
    manifest = (MANIFESTS / "client.yaml").read_text().replace("name: client", f"name: {name}")
    kubectl.run("apply", "-f", "-", input=manifest)
    kubectl.run("wait", "--for=jsonpath={.status.phase}=Succeeded", f"pod/{name}", "--timeout=60s")
    logs = kubectl.run("logs", name).stdout
    return [json.loads(line) for line in logs.splitlines() if line.startswith("{")]


def test_deployment_service_dns_logs_restart_scale(kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(MANIFESTS / "echo.yaml"))
    _rollout(kubectl)
    pods = _pods(kubectl)
    assert len(pods) == 3
    names = {p["metadata"]["name"] for p in pods}
    assert all(p["status"]["phase"] == "Running" for p in pods)
    assert len({p["status"]["podIP"] for p in pods}) == 3
    slices = json.loads(
        kubectl.run(
            "get", "endpointslices", "-l", "kubernetes.io/service-name=echo", "-o", "json"
        ).stdout
    )["items"]
    assert len(slices) == 1 and slices[0]["ports"] == [
        {"name": "http", "port": 8080, "protocol": "TCP"}
    ]
    assert sorted(e["addresses"][0] for e in slices[0]["endpoints"]) == sorted(
        p["status"]["podIP"] for p in pods
    )

    # A pod reaches the Service by its short DNS name and hears from all three replicas.
    answers = _client_answers(kubectl, "client")
    assert len(answers) >= 30
    assert {a["pod"] for a in answers} == names
    assert {a["namespace"] for a in answers} == {kubectl.namespace}
    assert all(dict(a["headers"])["host"] == "echo" for a in answers)

    # Logs of the echo server show it listening and the requests it served.
    logs = kubectl.run("logs", "deployment/echo").stdout
    assert "listening on port 8080" in logs
    assert "HTTP/1.1 GET /" in logs

    # rollout restart replaces every pod.
    kubectl.run("rollout", "restart", "deployment/echo")
    _rollout(kubectl)
    after = {p["metadata"]["name"] for p in _pods(kubectl)}
    assert len(after) == 3 and not after & names
    rs = json.loads(kubectl.run("get", "rs", "-l", "app=echo", "-o", "json").stdout)["items"]
    revisions = sorted(
        int(r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]) for r in rs
    )
    assert revisions == [1, 2]

    # Scale to zero and back.
    kubectl.run("scale", "deployment/echo", "--replicas=0")
    kubectl.run("wait", "--for=delete", "pod", "-l", "app=echo", "--timeout=60s")
    assert _pods(kubectl) == []
    kubectl.run("scale", "deployment/echo", "--replicas=3")
    _rollout(kubectl)
    assert len(_pods(kubectl)) == 3


def test_pdb_blocks_eviction_and_portforward(kubectl: Kubectl, node_sandbox: NodeSandbox) -> None:
    kubernetes = pytest.importorskip("kubernetes")
    from kubernetes.stream import portforward

    kubectl.run("apply", "-f", str(MANIFESTS / "echo.yaml"))
    _rollout(kubectl)
    kubectl.run("create", "poddisruptionbudget", "echo", "--selector=app=echo", "--min-available=3")
    kubectl.run("wait", "--for=jsonpath={.status.currentHealthy}=3", "pdb/echo", "--timeout=30s")
    client = kubernetes.config.new_client_from_config(str(node_sandbox.kubeconfig))
    core = kubernetes.client.CoreV1Api(client)
    pod = _pods(kubectl)[0]["metadata"]["name"]
    eviction = kubernetes.client.V1Eviction(
        metadata=kubernetes.client.V1ObjectMeta(name=pod, namespace=kubectl.namespace)
    )
    with pytest.raises(kubernetes.client.ApiException) as info:
        core.create_namespaced_pod_eviction(pod, kubectl.namespace, eviction)
    assert info.value.status == 429
    assert "disruption budget" in json.loads(info.value.body)["message"]

    # With room in the budget the eviction goes through (and the Deployment replaces the pod).
    kubectl.run("patch", "pdb", "echo", "--type=merge", "-p", '{"spec":{"minAvailable":2}}')
    kubectl.run(
        "wait", "--for=jsonpath={.status.disruptionsAllowed}=1", "pdb/echo", "--timeout=30s"
    )
    core.create_namespaced_pod_eviction(pod, kubectl.namespace, eviction)
    _rollout(kubectl)
    kubectl.run("wait", "--for=delete", f"pod/{pod}", "--timeout=30s")
    pod = _pods(kubectl)[0]["metadata"]["name"]

    # The port-forward websocket reaches the pod's port 8080.
    pf = portforward(
        core.connect_get_namespaced_pod_portforward, pod, kubectl.namespace, ports="8080"
    )
    try:
        sock = pf.socket(8080)
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(b"GET /pf HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body["pod"] == pod and body["path"] == "/pf"
    finally:
        _close_portforward(pf, 8080)

    # A port nobody listens on: Kubernetes' error text on the error channel.
    pf = portforward(
        core.connect_get_namespaced_pod_portforward, pod, kubectl.namespace, ports="9999"
    )
    try:
        sock = pf.socket(9999)
        sock.settimeout(10)
        assert sock.recv(1) == b""
        assert "connection refused" in (pf.error(9999) or "")
    finally:
        _close_portforward(pf, 9999)
        client.close()
