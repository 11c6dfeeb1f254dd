"""Admission webhooks against a small HTTPS webhook server run by the test."""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import Sandbox, unique_namespace

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402


class Webhook:
    """An HTTPS server that records AdmissionReviews and answers per path."""

    def __init__(self, sandbox: Sandbox) -> None:
        pair = sandbox.info.ca.issue("webhook", ["127.0.0.1"])
        self.ca_bundle = base64.b64encode(sandbox.info.ca.cert_pem).decode()
        self.reviews: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.reviews.append({"path": self.path, **body})
                uid = body["request"]["uid"]
                if self.path.startswith("/garbage"):
                    reply = b"this is not json"
                else:
                    response: dict[str, Any] = {"uid": uid, "allowed": True}
                    if self.path.startswith("/mutate"):
                        patch = [
                            {"op": "add", "path": "/metadata/labels", "value": {"injected": "yes"}},
                            {
                                "op": "add",
                                "path": "/spec/containers/-",
                                "value": {"name": "agent", "image": "tele/agent:1"},
                            },
                        ]
                        response["patchType"] = "JSONPatch"
                        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
                        response["warnings"] = ["agent injected"]
                    if self.path.startswith("/validate") and body["request"]["name"].startswith(
                        "deny-"
                    ):
                        response = {
                            "uid": uid,
                            "allowed": False,
                            "status": {
                                "code": 403,
                                "message": "names starting with deny- are refused",
                            },
                        }
                    reply = json.dumps(
                        {
                            "apiVersion": "admission.k8s.io/v1",
                            "kind": "AdmissionReview",
                            "response": response,
                        }
                    ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "c").write_bytes(pair.cert_pem)
            (Path(tmp) / "k").write_bytes(pair.key_pem)
            ctx.load_cert_chain(Path(tmp) / "c", Path(tmp) / "k")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def webhook(sandbox: Sandbox) -> Iterator[Webhook]:
    hook = Webhook(sandbox)
    yield hook
    hook.close()


@pytest.fixture
def clients(sandbox: Sandbox) -> Iterator[tuple[Any, Any, str]]:
    api_client = config.new_client_from_config(config_file=str(sandbox.kubeconfig))
    v1 = client.CoreV1Api(api_client)
    adm = client.AdmissionregistrationV1Api(api_client)
    ns = unique_namespace("adm")
    v1.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=ns, labels={"webhooks": "on"}))
    )
    try:
        yield v1, adm, ns
    finally:
        for cfg in adm.list_mutating_webhook_configuration().items:
            if cfg.metadata.name.startswith("test-"):
                adm.delete_mutating_webhook_configuration(cfg.metadata.name)
        for cfg in adm.list_validating_webhook_configuration().items:
            if cfg.metadata.name.startswith("test-"):
                adm.delete_validating_webhook_configuration(cfg.metadata.name)
        v1.delete_namespace(ns)
        api_client.close()


def _hook(
    name: str, url: str, ca_bundle: str, policy: str = "Fail", **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "clientConfig": {"url": url, "caBundle": ca_bundle},
        "rules": [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
            }
        ],
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "failurePolicy": policy,
        "timeoutSeconds": 5,
        "namespaceSelector": {"matchLabels": {"webhooks": "on"}},
        **extra,
    }


def _pod(name: str = "", generate: str = "") -> dict[str, Any]:
    meta = {"name": name} if name else {"generateName": generate}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "app", "image": "tele-sandbox/echo"}]},
    }


def _message(exc: ApiException) -> str:
    return str(json.loads(exc.body)["message"])


def test_mutating_webhook_patches_and_sees_a_real_review(
    webhook: Webhook, clients: tuple[Any, Any, str]
) -> None:
    v1, adm, ns = clients
    adm.create_mutating_webhook_configuration(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "test-inject"},
            "webhooks": [_hook("inject.tele.test", webhook.url("/mutate"), webhook.ca_bundle)],
        }
    )
    pod = v1.create_namespaced_pod(ns, _pod(generate="web-"))
    assert pod.metadata.labels == {"injected": "yes"}
    assert [c.name for c in pod.spec.containers] == ["app", "agent"]
    # Defaults apply to what the webhook added.
    assert pod.spec.containers[1].termination_message_path == "/dev/termination-log"
    assert pod.metadata.name.startswith("web-") and len(pod.metadata.name) == 9

    review = webhook.reviews[-1]
    assert review["apiVersion"] == "admission.k8s.io/v1" and review["kind"] == "AdmissionReview"
    request = review["request"]
    assert request["operation"] == "CREATE" and request["namespace"] == ns
    assert request["kind"] == {"group": "", "version": "v1", "kind": "Pod"}
    assert request["resource"] == {"group": "", "version": "v1", "resource": "pods"}
    assert request["name"] == "" and request["object"]["metadata"]["generateName"] == "web-"
    assert request["userInfo"]["username"] == "kubernetes-admin"
    assert review["path"] == "/mutate?timeout=5s"

    # Namespaces without the label are not sent to the webhook.
    other = unique_namespace("plain")
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        count = len(webhook.reviews)
        plain = v1.create_namespaced_pod(other, _pod("plain"))
        assert plain.metadata.labels is None and len(webhook.reviews) == count
    finally:
        v1.delete_namespace(other)


def test_validating_webhook_denies_with_kubernetes_wording(
    webhook: Webhook, clients: tuple[Any, Any, str]
) -> None:
    v1, adm, ns = clients
    adm.create_validating_webhook_configuration(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "test-validate"},
            "webhooks": [_hook("validate.tele.test", webhook.url("/validate"), webhook.ca_bundle)],
        }
    )
    v1.create_namespaced_pod(ns, _pod("fine"))
    with pytest.raises(ApiException) as denied:
        v1.create_namespaced_pod(ns, _pod("deny-me"))
    assert denied.value.status == 403
    assert _message(denied.value) == (
        'admission webhook "validate.tele.test" denied the request: '
        "names starting with deny- are refused"
    )


def test_broken_webhooks_follow_the_failure_policy(
    webhook: Webhook, clients: tuple[Any, Any, str]
) -> None:
    v1, adm, ns = clients
    adm.create_mutating_webhook_configuration(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "test-broken"},
            "webhooks": [_hook("garbage.tele.test", webhook.url("/garbage"), webhook.ca_bundle)],
        }
    )
    with pytest.raises(ApiException) as garbage:
        v1.create_namespaced_pod(ns, _pod("p1"))
    assert garbage.value.status == 500
    assert _message(garbage.value).startswith(
        'Internal error occurred: failed calling webhook "garbage.tele.test": '
        "received invalid webhook response"
    )
    adm.delete_mutating_webhook_configuration("test-broken")

    down_url = "https://127.0.0.1:1/down"
    adm.create_mutating_webhook_configuration(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "test-down"},
            "webhooks": [_hook("down.tele.test", down_url, webhook.ca_bundle)],
        }
    )
    with pytest.raises(ApiException) as down:
        v1.create_namespaced_pod(ns, _pod("p2"))
    assert down.value.status == 500
    assert _message(down.value).startswith(
        'Internal error occurred: failed calling webhook "down.tele.test": '
        f'failed to call webhook: Post "{down_url}'
    )
    adm.patch_mutating_webhook_configuration(
        "test-down", [{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]
    )
    assert v1.create_namespaced_pod(ns, _pod("p3")).metadata.name == "p3"

    # A webhook whose certificate the caBundle does not vouch for fails too.
    other_ca = base64.b64encode(_other_ca_pem()).decode()
    adm.create_validating_webhook_configuration(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "test-untrusted"},
            "webhooks": [_hook("untrusted.tele.test", webhook.url("/validate"), other_ca)],
        }
    )
    with pytest.raises(ApiException) as untrusted:
        v1.create_namespaced_pod(ns, _pod("p4"))
    assert 'failed calling webhook "untrusted.tele.test"' in _message(untrusted.value)


def _other_ca_pem() -> bytes:
    from tele.sandbox.apiserver.certs import CertificateAuthority

    return CertificateAuthority.create("someone-else").cert_pem
