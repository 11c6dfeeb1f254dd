"""A watch response from a hostile or broken API server ends that watch with an ApiError: a line
nested 100,000 deep (RecursionError got past the ValueError handler), a line that never ends
(held without bound), events that are not objects. Good events before them still arrive."""

from __future__ import annotations

import json
from contextlib import aclosing

import httpx
import pytest

from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient

GOOD = json.dumps({"type": "ADDED", "object": {"metadata": {"name": "a"}}}).encode() + b"\n"


async def watch_of(kube: KubeClient, body: bytes) -> tuple[list[str], ApiError | None]:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    kube._watch_http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    names: list[str] = []
    try:
        async with aclosing(kube.watch(k8s.CONFIGMAPS, "default")) as events:
            async for event in events:
                names.append(event.object["metadata"]["name"])
    except ApiError as exc:
        return names, exc
    return names, None


@pytest.mark.parametrize(
    "bad",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"type": "ADDED", "object": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"[1, 2]",
        b'{"type": "ADDED"}',
        b'{"type": "ERROR", "object": "not a status"}',
        b'{"type": "ERROR", "object": {"code": "x"}}',
    ],
)
async def test_a_malformed_event_ends_the_watch_with_an_api_error(
    kube: KubeClient, bad: bytes
) -> None:
    names, error = await watch_of(kube, GOOD + bad + b"\n" + GOOD)
    assert names == ["a"]
    assert isinstance(error, ApiError)


async def test_a_line_that_never_ends_is_cut_off(
    kube: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(k8s, "MAX_WATCH_EVENT", 1000)
    names, error = await watch_of(kube, GOOD + b"x" * 100_000)
    assert names == ["a"]
    assert error is not None and "over 1000 bytes" in error.message
