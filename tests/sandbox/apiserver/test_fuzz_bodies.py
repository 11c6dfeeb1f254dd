"""Property-based fuzzing of what a client feeds the API server: request bodies in JSON, YAML
and protobuf, patches and DeleteOptions, to every kind of write. The server answers each with
a success or a 4xx Status, never a 500 (an exception past a decoder or a handler), and never
raises past the ASGI call. Driven in process: the ASGI application over a fresh `Api`."""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any

import msgspec
import trio
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tele.sandbox.apiserver.app import ApiApp
from tele.sandbox.apiserver.rest import Api

TOKEN = "fuzz-admin-token"

_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
)
_keys = st.sampled_from(
    [
        "apiVersion",
        "kind",
        "metadata",
        "name",
        "namespace",
        "labels",
        "spec",
        "data",
        "status",
        "containers",
        "image",
        "ports",
        "replicas",
        "selector",
        "target",
        "deleteOptions",
        "resourceAttributes",
        "verb",
        "resource",
        "expirationSeconds",
        "audiences",
        "token",
        "boundObjectRef",
        "user",
        "groups",
        "extra",
        "nonResourceAttributes",
        "uid",
        "op",
        "path",
        "value",
    ]
) | st.text(max_size=8)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=25,
)


@st.composite
def _objects(draw: st.DrawFn) -> Any:
    """Mostly object-shaped bodies (so the fuzzer gets past the first checks), sometimes not."""
    body = draw(st.dictionaries(_keys, _values, max_size=6))
    if draw(st.booleans()):
        body["apiVersion"] = draw(st.sampled_from(["v1", "apps/v1", 1, None, [], "x/y/z"]))
    if draw(st.booleans()):
        body["kind"] = draw(st.sampled_from(["ConfigMap", "Pod", "Status", 1, {}, ""]))
    if draw(st.booleans()):
        body["metadata"] = draw(
            st.dictionaries(
                st.sampled_from(["name", "namespace", "labels", "generateName", "uid"]),
                _values | st.sampled_from(["fuzz", "Fuzz!", ""]),
                max_size=4,
            )
        )
    return body


_TARGETS = [
    ("POST", "/api/v1/namespaces/default/configmaps"),
    ("POST", "/api/v1/namespaces/default/pods"),
    ("POST", "/api/v1/namespaces/default/services"),
    ("POST", "/apis/apps/v1/namespaces/default/deployments"),
    ("POST", "/api/v1/namespaces"),
    ("PUT", "/api/v1/namespaces/default/configmaps/kube-root-ca.crt"),
    ("PUT", "/api/v1/namespaces/default/serviceaccounts/default"),
    ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"),
    ("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews"),
    ("POST", "/apis/authentication.k8s.io/v1/tokenreviews"),
    ("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews"),
    ("POST", "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews"),
    ("POST", "/api/v1/namespaces/default/serviceaccounts/default/token"),
    ("DELETE", "/api/v1/namespaces/default/configmaps/absent"),
    ("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"),
    ("PUT", "/apis/apps/v1/namespaces/default/deployments/d/scale"),
    ("POST", "/api/v1/namespaces/default/pods/p/eviction"),
    ("POST", "/api/v1/namespaces/default/pods/p/binding"),
]
_PATCH_TYPES = [
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
]


async def _call(
    app: ApiApp,
    method: str,
    path: str,
    body: bytes,
    content_type: str,
    query: bytes = b"",
    token: str = TOKEN,
) -> tuple[int, Any]:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": [
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-type", content_type.encode()),
        ],
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)  # raising here is a failure in itself
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], msgspec.json.decode(payload) if payload else None


_POD = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
_DEPLOYMENT = {
    "metadata": {"name": "d"},
    "spec": {
        "selector": {"matchLabels": {"app": "d"}},
        "template": {"metadata": {"labels": {"app": "d"}}, "spec": _POD["spec"]},
    },
}


def _fresh_app() -> ApiApp:
    """An API with a pod `p` and a deployment `d` (for the subresources)."""
    api = Api(admin_token=TOKEN, clock=lambda: 1_700_000_000.0)
    api.bootstrap()
    app = ApiApp(api)

    async def objects() -> None:
        for path, body in (
            ("/api/v1/namespaces/default/pods", _POD),
            ("/apis/apps/v1/namespaces/default/deployments", _DEPLOYMENT),
        ):
            code, answer = await _call(
                app, "POST", path, json.dumps(body).encode(), "application/json"
            )
            assert code == 201, answer

    trio.run(objects)
    return app


def _answered(code: int, body: Any) -> None:
    assert code < 500, body
    if code >= 400:
        assert body["kind"] == "Status" and body["code"] == code, body


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(target=st.sampled_from(_TARGETS), body=_objects() | _values)
def test_json_bodies_get_an_answer_never_a_500(target: tuple[str, str], body: Any) -> None:
    method, path = target
    raw = json.dumps(body).encode()
    _answered(*trio.run(_call, _fresh_app(), method, path, raw, "application/json"))


@_FUZZ
@given(target=st.sampled_from(_TARGETS), raw=st.binary(max_size=64))
def test_arbitrary_bytes_get_an_answer_never_a_500(target: tuple[str, str], raw: bytes) -> None:
    method, path = target
    for content_type in (
        "application/json",
        "application/yaml",
        "application/vnd.kubernetes.protobuf",
    ):
        _answered(*trio.run(_call, _fresh_app(), method, path, raw, content_type))


@_FUZZ
@given(target=st.sampled_from(_TARGETS), body=_objects())
def test_yaml_bodies_get_an_answer_never_a_500(target: tuple[str, str], body: Any) -> None:
    method, path = target
    raw = yaml.safe_dump(body).encode()
    _answered(*trio.run(_call, _fresh_app(), method, path, raw, "application/yaml"))


@_FUZZ
@given(
    patch_type=st.sampled_from(_PATCH_TYPES),
    body=_objects() | _values | st.lists(st.dictionaries(_keys, _values, max_size=4), max_size=3),
    path=st.sampled_from(
        [
            "/api/v1/namespaces/default/configmaps/kube-root-ca.crt",
            "/api/v1/namespaces/default/configmaps/absent",
            "/apis/apps/v1/namespaces/default/deployments/d/scale",
            "/api/v1/namespaces/default/pods/p",
        ]
    ),
)
def test_patches_get_an_answer_never_a_500(patch_type: str, body: Any, path: str) -> None:
    raw = (yaml.safe_dump(body) if patch_type.endswith("yaml") else json.dumps(body)).encode()
    query = b"fieldManager=fuzz" if patch_type.endswith("yaml") else b""
    _answered(*trio.run(_call, _fresh_app(), "PATCH", path, raw, patch_type, query))


@settings(max_examples=40, deadline=None)
@given(
    target=st.sampled_from(_TARGETS),
    opener=st.sampled_from(["[", '{"a":', '{"apiVersion":"v1","kind":"ConfigMap","data":']),
    depth=st.integers(101, 50_000),
)
def test_deep_nesting_is_refused_before_decoding(
    target: tuple[str, str], opener: str, depth: int
) -> None:
    closer = {"[": "]", '{"a":': "}"}.get(opener, "}")
    raw = (opener * depth + "1" + closer * depth).encode()
    method, path = target
    code, body = trio.run(_call, _fresh_app(), method, path, raw, "application/json")
    _answered(code, body)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


_jwt_like = st.builds(
    lambda header, claims, signature: ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)]
    ),
    st.dictionaries(st.sampled_from(["alg", "kid", "typ"]), _values, max_size=3)
    | st.just({"alg": "ES256"}),
    _objects() | _values,
    st.binary(max_size=80),
)


@_FUZZ
@given(
    token=_jwt_like
    | st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.=", max_size=300
    )
)
def test_bearer_tokens_and_token_reviews_never_make_a_500(token: str) -> None:
    async def both(app: ApiApp) -> None:
        code, body = await _call(
            app, "GET", "/api/v1/namespaces", b"", "application/json", token=token
        )
        assert code == 401, body
        audiences = ["x", "https://kubernetes.default.svc.cluster.local"]
        review = json.dumps({"spec": {"token": token, "audiences": audiences}}).encode()
        path = "/apis/authentication.k8s.io/v1/tokenreviews"
        code, body = await _call(app, "POST", path, review, "application/json")
        assert code == 201 and body["status"]["authenticated"] is False, body

    trio.run(both, _fresh_app())


_query_values = st.text(max_size=20) | st.sampled_from(
    ["", "0", "-1", "1e400", "nan", "app=web", "app in (a,b)", "!app", "metadata.name=x", "x,,y"]
)


@_FUZZ
@given(
    path=st.sampled_from(
        [
            "/api/v1/namespaces/default/configmaps",
            "/api/v1/pods",
            "/apis/apps/v1/namespaces/default/deployments",
        ]
    ),
    params=st.dictionaries(
        st.sampled_from(
            ["labelSelector", "fieldSelector", "limit", "continue", "resourceVersion", "dryRun"]
        ),
        _query_values,
        max_size=4,
    ),
)
def test_list_queries_get_an_answer_never_a_500(path: str, params: dict[str, str]) -> None:
    query = urllib.parse.urlencode(params).encode()
    _answered(*trio.run(_call, _fresh_app(), "GET", path, b"", "application/json", query))
