"""A TLS app intercepted with termination (issue 9): the workload names its certificate's Secret
in `telepresence.io/inject-terminating-tls-secret`; the agent decrypts callers' requests with
it, sends those with the header to this machine and re-encrypts the others towards the app.
The local handler gets TLS by default (it is the same app) and plaintext with --http-plaintext."""

from __future__ import annotations

import base64
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tele.certs import CertificateAuthority, KeyPair
from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import (
    apply_ready,
    caller_pod,
    deployment,
    echo_container,
    in_caller,
    install_manager,
    kubectl,
    manifest,
    service,
)
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

APP = manifest(
    deployment(
        "secure",
        echo_container(
            8443,
            name="secure",
            image="tele-sandbox/echo-tls",
            port_name="https",
            volumeMounts=[{"name": "tls", "mountPath": "/etc/echo-tls", "readOnly": True}],
        ),
        annotations={"telepresence.io/inject-terminating-tls-secret": "secure-tls"},
        volumes=[{"name": "tls", "secret": {"secretName": "secure-tls"}}],
    ),
    service("secure", {"name": "https", "port": 443, "targetPort": "https"}),
    caller_pod(
        containers=[
            {
                "name": "c",
                "image": "tele-sandbox/worker",
                "volumeMounts": [{"name": "ca", "mountPath": "/etc/secure-ca"}],
            }
        ],
        volumes=[{"name": "ca", "configMap": {"name": "secure-ca"}}],
    ),
)

# The caller trusts nothing but the workload's CA, and checks the Service's name.
CALL = """
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile="/etc/secure-ca/ca.crt")
request = urllib.request.Request("https://secure.default/", headers=dict([sys.argv[1:3]]))
print(urllib.request.urlopen(request, timeout=10, context=context).read().decode())
"""


def tls_objects(pair: KeyPair, ca_pem: bytes) -> str:
    """The workload's TLS Secret, and its CA for the caller in a ConfigMap."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "secure-tls", "namespace": "default"},
        "data": {
            "tls.crt": base64.b64encode(pair.cert_pem).decode(),
            "tls.key": base64.b64encode(pair.key_pem).decode(),
        },
    }
    ca = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "secure-ca", "namespace": "default"},
        "data": {"ca.crt": ca_pem.decode()},
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [secret, ca]})


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        secure = isinstance(self.connection, ssl.SSLSocket)
        body = f"hello from the laptop ({'tls' if secure else 'plaintext'})\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("secure-ca")


@pytest.fixture
def pair(ca: CertificateAuthority) -> KeyPair:
    return ca.issue("secure", ["secure.default", "secure.default.svc.cluster.local"])


@pytest.fixture
def handlers(pair: KeyPair, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A TLS local handler (with the workload's certificate) and a plaintext one."""
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    servers[0].socket = context.wrap_socket(servers[0].socket, server_side=True)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield servers[0].server_address[1], servers[1].server_address[1]
    finally:
        for server, thread in zip(servers, threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join(5)


def test_tls_app_intercepted_with_termination(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    ca: CertificateAuthority,
    pair: KeyPair,
    handlers: tuple[int, int],
) -> None:
    tls_port, plain_port = handlers
    install_manager(node_sandbox, tele_env)
    kubectl(node_sandbox, "apply", "-f", "-", stdin=tls_objects(pair, ca.cert_pem))
    apply_ready(node_sandbox, APP)

    def call(header: str = "x-who: nobody") -> str:
        name, value = header.split(": ")
        return in_caller(node_sandbox, CALL, name, value)

    assert '"pod": "secure-' in call()
    kubeconfig = str(node_sandbox.kubeconfig)
    assert run_tele(tele_env, "connect", "--kubeconfig", kubeconfig, timeout=120).returncode == 0

    def intercept(port: int, *flags: str) -> None:
        engaged = run_tele(
            tele_env,
            "intercept",
            "secure",
            "--port",
            str(port),
            "--http-header",
            "x-who=me",
            "--mount",
            "false",
            *flags,
            timeout=120,
        )
        assert engaged.returncode == 0, engaged.stderr

    # Default: the handler on this machine is the same app, so it gets TLS as the app does.
    intercept(tls_port)
    assert call("x-who: me") == "hello from the laptop (tls)\n\n"
    # The others are re-encrypted towards the app, whose certificate the caller checked.
    assert '"pod": "secure-' in call()
    assert run_tele(tele_env, "leave", "secure").returncode == 0

    intercept(plain_port, "--http-plaintext")
    assert call("x-who: me") == "hello from the laptop (plaintext)\n\n"
    assert '"pod": "secure-' in call()
    assert run_tele(tele_env, "leave", "secure").returncode == 0
    assert call("x-who: me").startswith('{"pod": "secure-')
    assert run_tele(tele_env, "quit").returncode == 0
