"""The demo images through Services by DNS name: l4-echo over TCP and UDP, echo over h2c,
echo-tls with the certificate of a mounted Secret; cluster DNS over TCP too."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tele.certs import CertificateAuthority

from .conftest import Kubectl

pytestmark = pytest.mark.netns


def _workload(name: str, image: str, port: int, **extra: object) -> list[dict[str, object]]:
    container: dict[str, object] = {
        "name": "app",
        "image": image,
        "env": [{"name": "PORT", "value": str(port)}],
        "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
        **extra,
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [container], "terminationGracePeriodSeconds": 1},
                },
            },
        }
    ]


def test_demo_images_through_services(kubectl: Kubectl, tmp_path: Path) -> None:
    ca = CertificateAuthority.create("test-ca")
    pair = ca.issue("echo-tls", ["echo-tls", f"echo-tls.{kubectl.namespace}.svc"])
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    kubectl.run(
        "create",
        "secret",
        "tls",
        "echo-tls",
        f"--cert={tmp_path / 'tls.crt'}",
        f"--key={tmp_path / 'tls.key'}",
    )
    kubectl.run("create", "configmap", "test-ca", f"--from-file=ca.crt={tmp_path / 'ca.crt'}")
    objects = [
        *_workload("l4", "tele-sandbox/l4-echo", 9000),
        *_workload("echo", "tele-sandbox/echo", 8080),
        *_workload(
            "echo-tls",
            "tele-sandbox/echo-tls",
            8443,
            volumeMounts=[{"name": "tls", "mountPath": "/etc/echo-tls", "readOnly": True}],
        ),
    ]
    objects[2]["spec"]["template"]["spec"]["volumes"] = [  # type: ignore[index]
        {"name": "tls", "secret": {"secretName": "echo-tls"}}
    ]
    for name, ports in (
        (
            "l4",
            [
                {"name": "tcp", "port": 7, "targetPort": 9000},
                {"name": "udp", "port": 7, "targetPort": 9000, "protocol": "UDP"},
            ],
        ),
        ("echo", [{"name": "http", "port": 80, "targetPort": 8080}]),
        ("echo-tls", [{"name": "https", "port": 443, "targetPort": 8443}]),
    ):
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {"selector": {"app": name}, "ports": ports},
            }
        )
    kubectl.run(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    for name in ("l4", "echo", "echo-tls"):
        kubectl.run("rollout", "status", f"deployment/{name}", "--timeout=60s")

    # DNS over TCP with the image's python3 (standard library only): one A question, the
    # answer's address is the last four bytes of the reply.
    dns_tcp = (
        'python3 -c "import socket, struct; '
        f"n = b''.join(bytes([len(p)]) + p.encode() for p in 'echo.{kubectl.namespace}"
        ".svc.cluster.local'.split('.')) + b'\\\\0'; "
        "q = struct.pack('!HHHHHH', 7, 256, 1, 0, 0, 0) + n + struct.pack('!HH', 1, 1); "
        "s = socket.create_connection(('10.96.0.10', 53), timeout=3); "
        "s.sendall(struct.pack('!H', len(q)) + q); "
        "r = s.recv(4096); "
        "print('tcp-dns', socket.inet_ntoa(r[-4:]))\""
    )
    script = "; ".join(
        [
            "echo tcp-$(echo hello-tcp | socat -t 2 - TCP:l4:7)",
            "echo udp-$(echo hello-udp | socat -t 2 - UDP:l4:7)",
            "curl -s --http2-prior-knowledge http://echo/h2; echo",
            "curl -s --cacert /ca/ca.crt https://echo-tls/tls; echo",
            dns_tcp,
        ]
    )
    client = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "images-client"},
        "spec": {
            "restartPolicy": "Never",
            "volumes": [{"name": "ca", "configMap": {"name": "test-ca"}}],
            "containers": [
                {
                    "name": "c",
                    "image": "tele-sandbox/worker",
                    "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "ca", "mountPath": "/ca"}],
                }
            ],
        },
    }
    kubectl.run("apply", "-f", "-", input=json.dumps(client))
    kubectl.run(
        "wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/images-client", "--timeout=60s"
    )
    lines = kubectl.run("logs", "images-client").stdout.splitlines()
    assert lines[0] == "tcp-hello-tcp"
    assert lines[1] == "udp-hello-udp"
    h2, tls = json.loads(lines[2]), json.loads(lines[3])
    assert h2["protocol"] == "HTTP/2" and h2["path"] == "/h2" and h2["pod"].startswith("echo-")
    assert tls["path"] == "/tls" and tls["pod"].startswith("echo-tls-")
    service_ip = json.loads(kubectl.run("get", "svc", "echo", "-o", "json").stdout)["spec"][
        "clusterIP"
    ]
    assert lines[4] == f"tcp-dns {service_ip}"


def test_the_sandbox_images_by_version_tag_and_by_digest(kubectl: Kubectl) -> None:
    """A node without a registry has the sandbox's images preloaded under `latest`, tele's
    version and their digest, as a user who pins either expects; another digest is NotFound."""
    from tele.image.build import _tele_version, build_sandbox_images

    digest = build_sandbox_images()["tele-sandbox/worker"].image.digest
    images = {
        "by-version": f"tele-sandbox/worker:{_tele_version()}",
        "by-digest": f"tele-sandbox/worker@{digest}",
        "wrong-digest": "tele-sandbox/worker@sha256:" + "0" * 64,
    }
    for name, image in images.items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": image, "command": ["echo", "ran"]}],
            },
        }
        kubectl.run("apply", "-f", "-", input=json.dumps(pod))
    for name in ("by-version", "by-digest"):
        kubectl.run(
            "wait", "--for=jsonpath={.status.phase}=Succeeded", f"pod/{name}", "--timeout=60s"
        )
        assert kubectl.run("logs", name).stdout == "ran\n"
        pod = json.loads(kubectl.run("get", "pod", name, "-o", "json").stdout)
        assert pod["status"]["containerStatuses"][0]["imageID"] == (
            f"docker.io/tele-sandbox/worker@{digest}"
        )
    deadline = time.monotonic() + 30
    while True:
        events = json.loads(
            kubectl.run(
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=wrong-digest",
                "-o",
                "json",
            ).stdout
        )["items"]
        failed = [e["message"] for e in events if e["reason"] == "Failed"]
        if any("code = NotFound" in m for m in failed) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(
        m.startswith(f'Failed to pull image "{images["wrong-digest"]}": ') and "NotFound" in m
        for m in failed
    ), failed
