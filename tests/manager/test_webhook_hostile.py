"""Hostile callers of the agent injector's webhook: a body nested 100,000 deep, bodies of any
shape, a mutator with a bug. Each gets an AdmissionReview error (400 / 500); the webhook keeps
serving the next review."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tele.certs import CertificateAuthority, client_context
from tele.manager.webhook import WEBHOOK_PATH, Review, WebhookServer, WebhookTLS, allow_all


def review(uid: str = "u-1") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"kind": "Pod"}, "object": {"metadata": {"name": "p"}}},
    }


@pytest.fixture(scope="module")
def tls() -> WebhookTLS:
    ca = CertificateAuthority.create("tele-test-webhook-ca")
    return WebhookTLS(ca.cert_pem, ca.issue("webhook", ["127.0.0.1"]))


async def run_webhook(
    nursery: trio.Nursery, tls: WebhookTLS, mutator: Any = allow_all
) -> tuple[WebhookServer, httpx.AsyncClient]:
    server = WebhookServer(tls, mutator)
    port = await nursery.start(server.serve, 0, "127.0.0.1")
    client = httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{port}", verify=client_context(tls.ca_pem), timeout=10
    )
    return server, client


@pytest.fixture
async def webhook(nursery: trio.Nursery, tls: WebhookTLS) -> AsyncIterator[httpx.AsyncClient]:
    _, client = await run_webhook(nursery, tls)
    async with client:
        yield client


async def test_a_body_nested_100000_deep_is_400_and_the_webhook_keeps_serving(
    webhook: httpx.AsyncClient,
) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    answer = await webhook.post(WEBHOOK_PATH, content=nested)
    assert answer.status_code == 400
    assert answer.json()["response"]["allowed"] is False
    assert answer.json()["response"]["status"]["code"] == 400
    good = await webhook.post(WEBHOOK_PATH, json=review())
    assert good.status_code == 200
    assert good.json()["response"] == {"allowed": True, "uid": "u-1"}


async def test_nesting_inside_a_review_is_400_too(webhook: httpx.AsyncClient) -> None:
    body = json.dumps(review())[:-1] + ', "x": ' + "{" * 50_000 + "}" * 50_000 + "}"
    answer = await webhook.post(WEBHOOK_PATH, content=body.encode())
    assert answer.status_code == 400
    assert (await webhook.post(WEBHOOK_PATH, json=review())).status_code == 200


async def test_a_body_over_the_limit_is_413(webhook: httpx.AsyncClient) -> None:
    try:
        answer = await webhook.post(WEBHOOK_PATH, content=b" " * (3 * 1024 * 1024 + 1))
    except httpx.TransportError:
        pass  # the webhook answered 413 and closed while the body was still being sent
    else:
        assert answer.status_code == 413
    assert (await webhook.post(WEBHOOK_PATH, json=review())).status_code == 200


async def test_a_bug_in_answering_is_500_with_its_traceback_in_the_log(
    nursery: trio.Nursery, tls: WebhookTLS, caplog: pytest.LogCaptureFixture
) -> None:
    async def mutator(request: Review) -> Review:
        if request["uid"] == "bad":
            return {"allowed": True, **request["not-there-either"]}  # raises KeyError
        return {"allowed": True}

    server, client = await run_webhook(nursery, tls, mutator)
    # the mutator's own failures are answered (allowed, with a warning): make _answer itself fail
    original = server._answer

    async def broken(request: h11.Request, body: bytes) -> tuple[int, dict[str, Any]]:
        if b'"boom"' in body:
            raise RecursionError("a bug deep inside")
        return await original(request, body)

    server._answer = broken  # type: ignore[method-assign]
    async with client:
        answer = await client.post(WEBHOOK_PATH, json=review("boom"))
        assert answer.status_code == 500
        assert answer.json()["response"]["status"]["code"] == 500
        assert any(r.exc_info and r.exc_info[0] is RecursionError for r in caplog.records)
        assert (await client.post(WEBHOOK_PATH, json=review("bad"))).status_code == 200
        assert (await client.post(WEBHOOK_PATH, json=review())).status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"request": json_values}).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"request": st.fixed_dictionaries({"uid": json_values})}).map(
        lambda v: json.dumps(v).encode()
    ),
    st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n + b"{" * n),
)


@settings(max_examples=200, deadline=None)
@given(body=bodies)
def test_any_body_is_answered_with_a_status(tls: WebhookTLS, body: bytes) -> None:
    server = WebhookServer(tls)
    request = h11.Request(method="POST", target=WEBHOOK_PATH, headers=[("host", "x")])
    status, reply = trio.run(server._answer, request, body)
    assert status in (200, 400)
    json.dumps(reply)  # the reply can always be sent
    if status == 200:
        assert reply["response"]["allowed"] is True


async def test_a_peer_holding_connections_cannot_crowd_out_the_api_server(
    nursery: trio.Nursery, tls: WebhookTLS
) -> None:
    server = WebhookServer(tls)
    server.max_per_peer = 3
    port = await nursery.start(server.serve, 0, "127.0.0.1")
    # A pod (127.0.0.2 here) opens connections and never speaks TLS on them.
    hogs = []
    for _ in range(10):
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.2", 0))
        await sock.connect(("127.0.0.1", port))
        hogs.append(trio.SocketStream(sock))
    try:
        refused = 0
        for hog in hogs[3:]:
            with trio.fail_after(5):
                refused += await hog.receive_some(10) == b""  # closed at once
        assert refused == 7
        # The API server (another address) is served as before.
        transport = httpx.AsyncHTTPTransport(
            local_address="127.0.0.1", verify=client_context(tls.ca_pem)
        )
        async with httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{port}", transport=transport, timeout=10
        ) as api_server:
            assert (await api_server.post(WEBHOOK_PATH, json=review())).status_code == 200
    finally:
        for hog in hogs:
            await hog.aclose()
