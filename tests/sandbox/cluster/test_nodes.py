"""The node: its API object (`kubectl get nodes`, also `-o wide`, `kubectl describe node`, pods
bound to it by name, the heartbeat: the Lease in kube-node-lease renewed, the conditions'
lastHeartbeatTime moved while the kubelet runs), and Services reachable from its network
namespace as from a real node's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.context import RequestContext
from tele.sandbox.apiserver.rest import Api
from tele.sandbox.kubelet import nodestatus

from .conftest import Kubectl, NodeSandbox


@pytest.mark.netns
def test_get_and_describe_node(kubectl: Kubectl) -> None:
    nodes = json.loads(kubectl.run("get", "nodes", "-o", "json").stdout)["items"]
    assert len(nodes) == 1
    node = nodes[0]
    name = node["metadata"]["name"]
    labels = node["metadata"]["labels"]
    assert labels["kubernetes.io/hostname"] == name
    assert labels["kubernetes.io/os"] == "linux" and labels["kubernetes.io/arch"]
    assert "node-role.kubernetes.io/control-plane" in labels
    status = node["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "MemoryPressure": "False",
        "DiskPressure": "False",
        "PIDPressure": "False",
        "Ready": "True",
    }
    assert {a["type"] for a in status["addresses"]} == {"InternalIP", "Hostname"}
    assert int(status["capacity"]["cpu"]) >= 1 and status["allocatable"]["pods"] == "110"
    info = status["nodeInfo"]
    for key in ("kubeletVersion", "containerRuntimeVersion", "osImage", "kernelVersion"):
        assert info[key], key

    table = kubectl.run("get", "nodes").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert table[1].split()[:3] == [name, "Ready", "control-plane"]
    assert table[1].split()[4] == info["kubeletVersion"]
    wide = kubectl.run("get", "nodes", "-o", "wide").stdout.splitlines()
    assert "INTERNAL-IP" in wide[0] and "CONTAINER-RUNTIME" in wide[0]
    internal = next(a["address"] for a in status["addresses"] if a["type"] == "InternalIP")
    assert internal in wide[1] and info["containerRuntimeVersion"] in wide[1]

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {"name": "c", "image": "tele-sandbox/worker", "command": ["sleep", "600"]}
            ],
        },
    }
    kubectl.run("apply", "-f", "-", input=json.dumps(pod))
    kubectl.run("wait", "--for=condition=Ready", "pod/sleeper", "--timeout=30s")
    bound = json.loads(kubectl.run("get", "pod", "sleeper", "-o", "json").stdout)
    assert bound["spec"]["nodeName"] == name
    described = kubectl.run("describe", "node", name).stdout
    for text in (
        f"Name:               {name}",
        "Roles:              control-plane",
        "KubeletReady",
        f"InternalIP:  {internal}",
        f"HolderIdentity:  {name}",
        f"{kubectl.namespace}",  # the pod, under Non-terminated Pods
        "sleeper",
        "Starting kubelet.",  # events, as a kubelet records them
        f"Node {name} status is now: NodeReady",
    ):
        assert text in described, text


async def test_heartbeat_renews_the_lease_and_the_conditions(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    api = Api(clock=lambda: 1.8e9 + trio.current_time())  # wall time follows the mock clock
    api.bootstrap()
    ctx = RequestContext(User("system:node:n1", ("system:masters",)))
    changes: list[tuple[str, str]] = []
    unsubscribers = [
        api.store.subscribe(key, lambda event: changes.append((event.type, event.resource)))
        for key in ("/nodes", "coordination.k8s.io/leases")
    ]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                nodestatus.serve_node_status, api, ctx, "n1", "10.244.0.1", tmp_path
            )
            registered = list(changes)
            # 125 s in virtual time: a renewal every 10 s, a node status every 60 s.
            await trio.sleep(125)
            nursery.cancel_scope.cancel()
    finally:
        for unsubscribe in unsubscribers:
            unsubscribe()
    assert registered == [("ADDED", "/nodes"), ("ADDED", "coordination.k8s.io/leases")]
    later = changes[len(registered) :]
    assert later.count(("MODIFIED", "coordination.k8s.io/leases")) == 12
    assert later.count(("MODIFIED", "/nodes")) == 2


_ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(b"from the node\\n")
    print(s.recv(100).decode(), end="")
"""


@pytest.mark.netns
def test_cluster_ip_is_reachable_from_the_node_namespace(
    kubectl: Kubectl, node_sandbox: NodeSandbox
) -> None:
    manifest = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "l4", "labels": {"app": "l4"}},
            "spec": {"containers": [{"name": "c", "image": "tele-sandbox/l4-echo"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "l4"},
            "spec": {"selector": {"app": "l4"}, "ports": [{"port": 7000, "targetPort": 9000}]},
        },
    ]
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifest}),
    )
    kubectl.run("wait", "--for=condition=Ready", "pod/l4", "--timeout=30s")
    ip = kubectl.run("get", "svc", "l4", "-o", "jsonpath={.spec.clusterIP}").stdout
    # The proxy's table follows the Endpoints a moment later: retry until a deadline.
    in_node = ["ip", "netns", "exec", f"{node_sandbox.name}-node"]
    deadline = time.monotonic() + 20
    while True:
        done = subprocess.run(
            [*in_node, sys.executable, "-c", _ECHO_CLIENT, ip, "7000"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode == 0 or time.monotonic() > deadline:
            break
    assert done.stdout == "from the node\n", done.stderr


async def test_a_deleted_node_is_registered_again_by_the_heartbeat(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    api = Api(clock=lambda: 1.8e9 + trio.current_time())
    api.bootstrap()
    ctx = RequestContext(User("system:node:n1", ("system:masters",)))
    async with trio.open_nursery() as nursery:
        await nursery.start(nodestatus.serve_node_status, api, ctx, "n1", "10.244.0.1", tmp_path)
        first = api.store.get("/nodes", "", "n1")
        assert first is not None
        api.store.remove("/nodes", "", "n1")
        await trio.sleep(nodestatus.LEASE_RENEW_INTERVAL + 1)
        again = api.store.get("/nodes", "", "n1")
        assert again is not None and again["metadata"]["uid"] != first["metadata"]["uid"]
        lease = api.store.get("coordination.k8s.io/leases", "kube-node-lease", "n1")
        assert lease is not None
        assert lease["metadata"]["ownerReferences"][0]["uid"] == again["metadata"]["uid"]
        nursery.cancel_scope.cancel()


def _sleeper(name: str, **spec: object) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {"name": "c", "image": "tele-sandbox/worker", "command": ["sleep", "600"]}
                ],
                **spec,
            },
        }
    )


@pytest.mark.netns
def test_a_cordoned_node_takes_no_new_pods_until_uncordoned(kubectl: Kubectl) -> None:
    node = json.loads(kubectl.run("get", "nodes", "-o", "json").stdout)["items"][0]
    name = node["metadata"]["name"]
    assert kubectl.run("cordon", name).stdout.strip() == f"node/{name} cordoned"
    try:
        assert "Ready,SchedulingDisabled" in kubectl.run("get", "node", name).stdout
        kubectl.run("apply", "-f", "-", input=_sleeper("waits"))
        # A pod that tolerates the cordon's taint (as a DaemonSet's do) is still placed.
        tolerant = {"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}
        kubectl.run("apply", "-f", "-", input=_sleeper("tolerant", tolerations=[tolerant]))
        kubectl.run("wait", "--for=condition=Ready", "pod/tolerant", "--timeout=30s")
        kubectl.run(
            "wait",
            "--for=jsonpath={.status.conditions[0].reason}=Unschedulable",
            "pod/waits",
            "--timeout=30s",
        )
        pod = json.loads(kubectl.run("get", "pod", "waits", "-o", "json").stdout)
        assert "nodeName" not in pod["spec"] and pod["status"]["phase"] == "Pending"
        message = (
            "0/1 nodes are available: 1 node(s) were unschedulable. preemption: 0/1 nodes are "
            "available: 1 Preemption is not helpful for scheduling."
        )
        assert pod["status"]["conditions"] == [
            {
                "type": "PodScheduled",
                "status": "False",
                "lastTransitionTime": pod["status"]["conditions"][0]["lastTransitionTime"],
                "reason": "Unschedulable",
                "message": message,
            }
        ]
        described = kubectl.run("describe", "pod", "waits").stdout
        assert "Warning  FailedScheduling" in described and message in described
        assert "default-scheduler" in described
    finally:
        assert kubectl.run("uncordon", name).stdout.strip() == f"node/{name} uncordoned"
    kubectl.run("wait", "--for=condition=Ready", "pod/waits", "--timeout=30s")
    assert (
        json.loads(kubectl.run("get", "pod", "waits", "-o", "json").stdout)["spec"]["nodeName"]
        == name
    )


@pytest.mark.netns
def test_a_host_network_pod_has_the_nodes_address_and_reaches_services(kubectl: Kubectl) -> None:
    node = json.loads(kubectl.run("get", "nodes", "-o", "json").stdout)["items"][0]
    internal = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
    host = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "on-host"},
        "spec": {
            "hostNetwork": True,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "c",
                    "image": "tele-sandbox/worker",
                    "command": ["python3", "-m", "http.server", "18089"],
                    "workingDir": "/etc",
                    "readinessProbe": {"tcpSocket": {"port": 18089}, "periodSeconds": 1},
                }
            ],
        },
    }
    kubectl.run("apply", "-f", "-", input=json.dumps(host))
    kubectl.run("wait", "--for=condition=Ready", "pod/on-host", "--timeout=30s")
    pod = json.loads(kubectl.run("get", "pod", "on-host", "-o", "json").stdout)
    assert pod["status"]["podIP"] == internal == pod["status"]["hostIP"]
    # Its hostname is the node's; the cluster's DNS and Services answer it (the node has routes
    # to the service range); a pod reaches it at the node's address.
    name = node["metadata"]["name"]
    script = "hostname; getent hosts kubernetes.default.svc.cluster.local"
    out = kubectl.run("exec", "on-host", "--", "sh", "-c", script).stdout.split()
    assert out == [name, "10.96.0.1", "kubernetes.default.svc.cluster.local"]
    # The answer is read from the pod's log once it has succeeded: with `run --attach` a curl
    # that ends before kubectl attaches leaves nothing to print (as on a real cluster).
    kubectl.run(
        "run",
        "fetch",
        "--image=tele-sandbox/worker",
        "--restart=Never",
        "--command",
        "--",
        "curl",
        "-s",
        f"http://{internal}:18089/hostname",
    )
    kubectl.run("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/fetch", "--timeout=60s")
    assert kubectl.run("logs", "fetch").stdout.strip() == name
    kubectl.run("delete", "pod", "fetch", "--wait=false")


def _scheduled_message(kubectl: Kubectl, pod: str) -> str:
    kubectl.run(
        "wait",
        "--for=jsonpath={.status.conditions[0].reason}=Unschedulable",
        f"pod/{pod}",
        "--timeout=30s",
    )
    status = json.loads(kubectl.run("get", "pod", pod, "-o", "json").stdout)["status"]
    return str(status["conditions"][0]["message"])


@pytest.mark.netns
def test_taints_node_selectors_and_affinity_keep_pods_pending_until_the_node_fits(
    kubectl: Kubectl,
) -> None:
    node = json.loads(kubectl.run("get", "nodes", "-o", "json").stdout)["items"][0]
    name = node["metadata"]["name"]
    tail = ". preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
    kubectl.run("taint", "node", name, "tele-test=gpu:NoSchedule")
    try:
        kubectl.run("apply", "-f", "-", input=_sleeper("untolerated"))
        toleration = {"key": "tele-test", "value": "gpu", "effect": "NoSchedule"}
        kubectl.run("apply", "-f", "-", input=_sleeper("tolerated", tolerations=[toleration]))
        kubectl.run("wait", "--for=condition=Ready", "pod/tolerated", "--timeout=30s")
        assert _scheduled_message(kubectl, "untolerated") == (
            "0/1 nodes are available: 1 node(s) had untolerated taint {tele-test: gpu}" + tail
        )
    finally:
        kubectl.run("taint", "node", name, "tele-test-")
    kubectl.run("wait", "--for=condition=Ready", "pod/untolerated", "--timeout=30s")

    selector = {"tele-test/disk": "ssd"}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "tele-test/zone", "operator": "Exists"}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [name]}]},
                ]
            }
        }
    }
    kubectl.run("apply", "-f", "-", input=_sleeper("on-ssd", nodeSelector=selector))
    kubectl.run("apply", "-f", "-", input=_sleeper("here-by-name", affinity=affinity))
    kubectl.run("wait", "--for=condition=Ready", "pod/here-by-name", "--timeout=30s")
    assert _scheduled_message(kubectl, "on-ssd") == (
        "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector" + tail
    )
    kubectl.run("label", "node", name, "tele-test/disk=ssd")
    try:
        kubectl.run("wait", "--for=condition=Ready", "pod/on-ssd", "--timeout=30s")
    finally:
        kubectl.run("label", "node", name, "tele-test/disk-")
