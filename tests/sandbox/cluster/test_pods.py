"""What a pod sees: init containers, env (fieldRef, configMapKeyRef, secretKeyRef, envFrom,
$(VAR)), volumes at their mountPath, hostname, resolv.conf, the projected service account
token that authenticates against the API; StatefulSet names in DNS; an unknown image."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
from collections.abc import Iterator

import pytest

from .conftest import MANIFESTS, Kubectl

pytestmark = pytest.mark.netns


def test_pod_environment_volumes_and_token(kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(MANIFESTS / "features.yaml"))
    kubectl.run("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/features", "--timeout=60s")
    pod = json.loads(kubectl.run("get", "pod", "features", "-o", "json").stdout)
    ip = pod["status"]["podIP"]
    logs = kubectl.run("logs", "features").stdout
    out = dict(line.split("=", 1) for line in logs.splitlines() if "=" in line)
    assert "api" in out, logs
    ns = kubectl.namespace
    assert out["init"] == "from-init pwd=/work"
    assert out["env"] == f"hello/s3cret/features/{ip}/hello/hello"
    assert out["files"] == "hello/s3cret"
    assert out["labels"].split() == ['app="features"', 'tier="test"']
    assert out["hostname"] == "features"
    assert out["resolv"] == f"search {ns}.svc.cluster.local svc.cluster.local cluster.local"
    assert out["sa"] == ns
    # The projected token authenticates as the pod's service account (which RBAC then refuses).
    assert out["api"] == f"system:serviceaccount:{ns}:default"
    init = pod["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["exitCode"] == 0


def test_statefulset_dns_and_unknown_image(kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(MANIFESTS / "statefulset.yaml"))
    kubectl.run("rollout", "status", "statefulset/web", "--timeout=60s")
    pods = {
        p["metadata"]["name"]: p["status"]["podIP"]
        for p in json.loads(kubectl.run("get", "pods", "-l", "app=web", "-o", "json").stdout)[
            "items"
        ]
    }
    assert set(pods) == {"web-0", "web-1"}
    uids = {
        p["metadata"]["uid"]
        for p in json.loads(kubectl.run("get", "pods", "-l", "app=web", "-o", "json").stdout)[
            "items"
        ]
    }
    script = (
        "getent hosts web-0.web | cut -d' ' -f1; getent ahostsv4 web | cut -d' ' -f1 | sort -u; "
        "curl -s http://web-1.web:8080/x"
    )
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "dns-client"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "c", "image": "tele-sandbox/worker", "command": ["sh", "-c", script]}
            ],
        },
    }
    kubectl.run("apply", "-f", "-", input=json.dumps(manifest))
    kubectl.run(
        "wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/dns-client", "--timeout=60s"
    )
    lines = kubectl.run("logs", "dns-client").stdout.splitlines()
    assert lines[0] == pods["web-0"]
    assert sorted(lines[1:3]) == sorted(pods.values())
    assert json.loads(lines[3])["pod"] == "web-1"

    # A new template rolls out from the highest ordinal down; names and DNS stay.
    kubectl.run("rollout", "restart", "statefulset/web")
    kubectl.run("rollout", "status", "statefulset/web", "--timeout=60s")
    after = json.loads(kubectl.run("get", "pods", "-l", "app=web", "-o", "json").stdout)["items"]
    assert sorted(p["metadata"]["name"] for p in after) == ["web-0", "web-1"]
    assert not {p["metadata"]["uid"] for p in after} & uids
    assert len({p["metadata"]["labels"]["controller-revision-hash"] for p in after}) == 1

    reason = kubectl.run(
        "get",
        "pod",
        "missing-image",
        "-o",
        "jsonpath={.status.containerStatuses[0].state.waiting.reason}",
    ).stdout
    assert reason in ("ErrImagePull", "ImagePullBackOff")
    kubectl.run(
        "wait",
        "--for=jsonpath={.status.containerStatuses[0].state.waiting.reason}=ImagePullBackOff",
        "pod/missing-image",
        "--timeout=30s",
    )
    events = kubectl.run(
        "get", "events", "--field-selector", "involvedObject.name=missing-image", "-o", "json"
    ).stdout
    messages = [e["message"] for e in json.loads(events)["items"]]
    assert any("registry.example.com/nowhere/app:1.0" in m for m in messages)


def test_downward_api_labels_refresh(kubectl: Kubectl) -> None:
    script = "while true; do echo labels: $(tr '\\n' ' ' < /etc/podinfo/labels); sleep 0.2; done"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "podinfo", "labels": {"app": "podinfo"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "volumes": [
                {
                    "name": "info",
                    "downwardAPI": {
                        "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
                    },
                }
            ],
            "containers": [
                {
                    "name": "c",
                    "image": "tele-sandbox/worker",
                    "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "info", "mountPath": "/etc/podinfo"}],
                }
            ],
        },
    }
    kubectl.run("apply", "-f", "-", input=json.dumps(pod))
    kubectl.run("wait", "--for=condition=Ready", "pod/podinfo", "--timeout=30s")
    kubectl.run("label", "pod", "podinfo", "stage=two")
    follow = subprocess.Popen(
        [*kubectl.command(), "logs", "-f", "podinfo"], stdout=subprocess.PIPE, text=True
    )
    try:
        with _deadline(follow, 20):
            assert follow.stdout is not None
            for line in follow.stdout:
                if 'stage="two"' in line:
                    break
            else:
                raise AssertionError("the label never reached the downward API file")
    finally:
        follow.kill()
        follow.wait()
        if follow.stdout is not None:
            follow.stdout.close()


@contextlib.contextmanager
def _deadline(proc: subprocess.Popen[str], seconds: float) -> Iterator[None]:
    """Kill `proc` (ending the read loop) if the block takes longer than `seconds`."""
    timer = threading.Timer(seconds, proc.kill)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
