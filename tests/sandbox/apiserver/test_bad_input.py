"""Bad requests get Kubernetes' answers (400/401/404/405/413/415/422) and never hurt the server."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import Sandbox


@pytest.fixture
def http(sandbox: Sandbox) -> Iterator[httpx.Client]:
    info = sandbox.info
    ctx = ssl.create_default_context(cadata=info.ca.cert_pem.decode())
    with httpx.Client(
        base_url=info.server,
        verify=ctx,
        http2=True,
        headers={"Authorization": f"Bearer {info.admin_token}"},
    ) as client:
        yield client


def _status(resp: httpx.Response, code: int, reason: str) -> dict[str, Any]:
    assert resp.status_code == code, resp.text
    body = resp.json()
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["code"] == code and body["reason"] == reason
    return body


CM_URL = "/api/v1/namespaces/default/configmaps"


def test_malformed_json_is_400(http: httpx.Client) -> None:
    resp = http.post(
        CM_URL, content=b'{"kind": "ConfigMap", ', headers={"Content-Type": "application/json"}
    )
    assert "json parse error" in _status(resp, 400, "BadRequest")["message"]
    resp = http.post(
        CM_URL, content=b"kind: [unclosed", headers={"Content-Type": "application/yaml"}
    )
    _status(resp, 400, "BadRequest")
    resp = http.patch(
        f"{CM_URL}/kube-root-ca.crt",
        content=b"{nope",
        headers={"Content-Type": "application/merge-patch+json"},
    )
    _status(resp, 400, "BadRequest")


def test_unknown_resources_are_404(http: httpx.Client) -> None:
    body = _status(http.get("/api/v1/namespaces/default/widgets"), 404, "NotFound")
    assert body["message"] == "the server could not find the requested resource (get widgets)"
    _status(http.get("/apis/example.com/v1/things"), 404, "NotFound")
    body = _status(http.get(f"{CM_URL}/absent"), 404, "NotFound")
    assert body["message"] == 'configmaps "absent" not found'
    assert body["details"] == {"kind": "configmaps", "name": "absent"}
    body = _status(
        http.post("/api/v1/namespaces/nowhere/configmaps", json={"metadata": {"name": "x"}}),
        404,
        "NotFound",
    )
    assert body["message"] == 'namespaces "nowhere" not found'


def test_body_over_3_mib_is_413(http: httpx.Client) -> None:
    big = {"metadata": {"name": "big"}, "data": {"blob": "x" * (3 * 1024 * 1024 + 10)}}
    _status(http.post(CM_URL, json=big), 413, "RequestEntityTooLarge")
    # The connection and the server are fine afterwards.
    assert http.get(f"{CM_URL}/kube-root-ca.crt").status_code == 200


def test_invalid_names_are_422_naming_the_field(http: httpx.Client) -> None:
    body = _status(http.post(CM_URL, json={"metadata": {"name": "UPPER"}}), 422, "Invalid")
    assert body["message"].startswith(
        'ConfigMap "UPPER" is invalid: metadata.name: Invalid value: "UPPER"'
    )
    assert body["details"]["causes"][0]["field"] == "metadata.name"
    assert body["details"]["causes"][0]["reason"] == "FieldValueInvalid"
    body = _status(
        http.post(
            "/api/v1/namespaces/default/pods",
            json={
                "metadata": {"name": "p", "labels": {"bad key!": "v"}},
                "spec": {"containers": [{"name": "c"}]},
            },
        ),
        422,
        "Invalid",
    )
    fields = [c["field"] for c in body["details"]["causes"]]
    assert fields == ["metadata.labels", "spec.containers[0].image"]
    body = _status(
        http.post(
            "/apis/apps/v1/namespaces/default/deployments",
            json={
                "metadata": {"name": "d"},
                "spec": {
                    "selector": {"matchLabels": {"a": "b"}},
                    "template": {
                        "metadata": {"labels": {"a": "c"}},
                        "spec": {"containers": [{"name": "c", "image": "i"}]},
                    },
                },
            },
        ),
        422,
        "Invalid",
    )
    assert "`selector` does not match template `labels`" in body["message"]


def test_wrong_or_missing_token_is_401(sandbox: Sandbox) -> None:
    info = sandbox.info
    ctx = ssl.create_default_context(cadata=info.ca.cert_pem.decode())
    with httpx.Client(base_url=info.server, verify=ctx) as anon:
        _status(anon.get("/api/v1/namespaces"), 401, "Unauthorized")
        resp = anon.get("/api/v1/namespaces", headers={"Authorization": "Bearer not-a-token"})
        _status(resp, 401, "Unauthorized")
        forged = "tele-sa.eyJucyI6ImRlZmF1bHQiLCJuYW1lIjoiZGVmYXVsdCJ9.AAAA"
        _status(
            anon.get("/api/v1/pods", headers={"Authorization": f"Bearer {forged}"}),
            401,
            "Unauthorized",
        )
        assert anon.get("/readyz").text == "ok"


def test_wrong_kind_method_and_media_type(http: httpx.Client) -> None:
    resp = http.post(CM_URL, json={"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}})
    assert "cannot be handled as a ConfigMap" in _status(resp, 400, "BadRequest")["message"]
    _status(http.put(CM_URL, json={}), 405, "MethodNotAllowed")
    resp = http.patch(
        f"{CM_URL}/kube-root-ca.crt", content=b"{}", headers={"Content-Type": "text/plain"}
    )
    _status(resp, 415, "UnsupportedMediaType")
    resp = http.put(f"{CM_URL}/kube-root-ca.crt", json={"metadata": {"name": "other"}})
    assert "does not match the name on the URL" in _status(resp, 400, "BadRequest")["message"]
    resp = http.get(CM_URL, params={"labelSelector": "a in (b"})
    _status(resp, 400, "BadRequest")


def test_one_bad_request_does_not_affect_another(http: httpx.Client) -> None:
    for _ in range(3):
        http.post(CM_URL, content=b"\xff\xfe garbage", headers={"Content-Type": "application/json"})
        http.post(
            "/api/v1/namespaces/default/pods",
            content=b"k8s\x00\x0a\xff",
            headers={"Content-Type": "application/vnd.kubernetes.protobuf"},
        )
    assert http.get("/api/v1/namespaces/default").json()["metadata"]["name"] == "default"


def test_garbage_on_a_connection_ends_only_that_connection(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    import socket

    info = sandbox.info
    for alpn in (["h2"], ["http/1.1"]):
        ctx = ssl.create_default_context(cadata=info.ca.cert_pem.decode())
        ctx.set_alpn_protocols(alpn)
        with (
            socket.create_connection((info.host, info.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"\x00\x01garbage that is not HTTP at all\r\n\r\n" * 20)
            try:
                while tls.recv(65536):
                    pass
            except (ssl.SSLError, OSError):
                pass
    assert http.get("/api/v1/namespaces/default").status_code == 200


def test_delete_with_a_protobuf_body(http: httpx.Client) -> None:
    """client-go (Helm's uninstall) sends DeleteOptions as protobuf."""
    from .test_units import _field

    assert http.post(CM_URL, json={"metadata": {"name": "pb-delete"}}).status_code == 201
    envelope = _field(1, _field(1, "v1") + _field(2, "DeleteOptions")) + _field(2, _field(5, "All"))
    headers = {"Content-Type": "application/vnd.kubernetes.protobuf"}
    resp = http.request(
        "DELETE", f"{CM_URL}/pb-delete", content=b"k8s\x00" + envelope, headers=headers
    )
    assert resp.status_code == 200
    assert http.get(f"{CM_URL}/pb-delete").status_code == 200  # dryRun=All: still there
    envelope = _field(1, _field(1, "v1") + _field(2, "DeleteOptions")) + _field(
        2, _field(4, "Background")
    )
    resp = http.request(
        "DELETE", f"{CM_URL}/pb-delete", content=b"k8s\x00" + envelope, headers=headers
    )
    assert resp.status_code == 200
    assert http.get(f"{CM_URL}/pb-delete").status_code == 404


def test_a_non_string_api_version_or_kind_is_400(http: httpx.Client) -> None:
    for field, value, go_type in (("apiVersion", 1, "number"), ("kind", ["x"], "array")):
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "typed"}}
        body[field] = value
        message = _status(http.post(CM_URL, json=body), 400, "BadRequest")["message"]
        assert message == (
            "couldn't get version/kind; json parse error: json: cannot unmarshal "
            f"{go_type} into Go struct field .{field} of type string"
        )
    # Through a patch too: the patched object is decoded like a body.
    resp = http.patch(
        f"{CM_URL}/kube-root-ca.crt",
        json={"apiVersion": 7},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    _status(resp, 400, "BadRequest")


def test_deep_nesting_is_400_and_the_server_keeps_serving(http: httpx.Client) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    body = _status(
        http.post(CM_URL, content=deep, headers={"Content-Type": "application/json"}),
        400,
        "BadRequest",
    )
    assert (
        body["message"] == "couldn't get version/kind; json parse error: exceeded max depth of 100"
    )
    nested_data = b'{"metadata":{"name":"deep"},"data":' + b'{"a":' * 5000 + b"1" + b"}" * 5001
    _status(
        http.post(CM_URL, content=nested_data, headers={"Content-Type": "application/json"}),
        400,
        "BadRequest",
    )
    for content_type in ("application/merge-patch+json", "application/json-patch+json"):
        resp = http.patch(
            f"{CM_URL}/kube-root-ca.crt", content=deep, headers={"Content-Type": content_type}
        )
        assert (
            "error decoding patch: exceeded max depth"
            in _status(resp, 400, "BadRequest")["message"]
        )
    resp = http.request(
        "DELETE", f"{CM_URL}/absent", content=deep, headers={"Content-Type": "application/json"}
    )
    _status(resp, 400, "BadRequest")
    deep_yaml = b"a:\n" + b"".join(b"  " * i + b"- \n" for i in range(1, 300))
    _status(
        http.post(CM_URL, content=b"[" * 50_000, headers={"Content-Type": "application/yaml"}),
        400,
        "BadRequest",
    )
    _status(
        http.post(CM_URL, content=deep_yaml, headers={"Content-Type": "application/yaml"}),
        400,
        "BadRequest",
    )
    deep_token = base64.urlsafe_b64encode(b"[" * 10_000 + b"]" * 10_000).decode()
    _status(http.get(CM_URL, params={"limit": "1", "continue": deep_token}), 400, "BadRequest")
    assert http.get(f"{CM_URL}/kube-root-ca.crt").status_code == 200


def test_a_yaml_alias_bomb_is_refused_before_it_expands(http: httpx.Client) -> None:
    lines = ["apiVersion: v1", "kind: ConfigMap", "metadata: {name: bomb}", "a0: &a0 [x, x, x, x]"]
    for i in range(1, 12):  # 4 * 10^11 nodes once expanded, 1 KiB of text
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    resp = http.post(
        CM_URL, content="\n".join(lines).encode(), headers={"Content-Type": "application/yaml"}
    )
    assert "nodes (aliases expanded)" in _status(resp, 400, "BadRequest")["message"]
    assert http.get(f"{CM_URL}/kube-root-ca.crt").status_code == 200


def test_a_bug_in_one_request_is_a_500_status_and_nothing_more(
    sandbox: Sandbox, http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """The request boundary catches everything: the traceback is logged, the client gets an
    InternalError Status, and the server (this connection too) serves the next request."""
    handlers = sandbox.info.app.subresource_handlers

    async def broken(*_: Any) -> None:
        raise TypeError("a bug in a handler")

    handlers[("pods", "log")] = broken
    try:
        resp = http.get("/api/v1/namespaces/default/pods/any/log")
    finally:
        del handlers[("pods", "log")]
    body = _status(resp, 500, "InternalError")
    assert body["message"] == "an error on the server has prevented the request from succeeding"
    assert any(r.exc_info and isinstance(r.exc_info[1], TypeError) for r in caplog.records), (
        "the traceback is logged"
    )
    assert http.get(f"{CM_URL}/kube-root-ca.crt").status_code == 200
