"""The demo images through Services by DNS name: l4-echo over TCP and UDP, echo over h2c,
echo-tls with the certificate of a mounted Secret; cluster DNS over TCP too."""

from __future__ import annotations

import json
import sys
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

    dns_tcp = (
        f'{sys.executable} -c "from dnslib import DNSRecord; '
        "r = DNSRecord.parse(DNSRecord.question('echo.svc.cluster.local'.replace('echo', "
        f"'echo.{kubectl.namespace}')).send('10.96.0.10', 53, tcp=True, timeout=3)); "
        "print('tcp-dns', r.rr[0].rdata)\""
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
