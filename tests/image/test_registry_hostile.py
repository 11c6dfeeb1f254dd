"""The registry client against a stub registry that lies, breaks off, floods or refuses."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from tele.image.credentials import Credentials
from tele.image.errors import DigestMismatch, RegistryError, Unauthorized
from tele.image.oci import (
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    encode,
    sha256_digest,
)
from tele.image.reference import parse_reference
from tele.image.registry import RegistryClient, parse_challenge
from tele.testing.waits import wait_for

from .stub import Handler, Request, Stub, StubFactory, response

CONFIG = json.dumps(
    {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
    }
).encode()
LAYER = b"the layer's bytes" * 100


def _manifest(layer: bytes = LAYER, layer_size: int | None = None) -> bytes:
    return encode(
        Manifest(
            schema_version=2,
            media_type=OCI_MANIFEST,
            config=Descriptor(OCI_CONFIG, sha256_digest(CONFIG), len(CONFIG)),
            layers=[Descriptor(OCI_LAYER_GZIP, sha256_digest(layer), layer_size or len(layer))],
        )
    )


@pytest.fixture
async def stub_factory() -> AsyncIterator[StubFactory]:
    async with trio.open_nursery() as nursery:

        async def start(handler: Handler) -> Stub:
            stub = Stub(handler)
            await nursery.start(stub.serve)
            return stub

        yield start
        nursery.cancel_scope.cancel()


def _router(routes: dict[str, bytes | Callable[[Request], bytes]]) -> Handler:
    async def handler(request: Request, stream: trio.SocketStream) -> None:
        for prefix, answer in routes.items():
            if request.path.split("?")[0].endswith(prefix):
                data = answer(request) if callable(answer) else answer
                await stream.send_all(data)
                return
        await stream.send_all(response(404, b'{"errors":[{"code":"NOT_FOUND"}]}'))

    return handler


def _blob_route(body: bytes, content_length: int | None = None) -> bytes:
    return response(200, body, content_length=content_length)


async def test_garbage_instead_of_a_manifest_is_a_registry_error(stub_factory: StubFactory) -> None:
    stub = await stub_factory(_router({"/manifests/v1": response(200, b"<html>hello</html>")}))
    async with RegistryClient(stub.address) as client:
        with pytest.raises(RegistryError) as info:
            await client.resolve(parse_reference(f"{stub.address}/a/b:v1"))
    assert "not a manifest" in str(info.value) and stub.address in str(info.value)


@pytest.mark.parametrize("announce", [True, False])
async def test_an_oversized_manifest_is_refused(stub_factory: StubFactory, announce: bool) -> None:
    body = b'{"mediaType": "' + b"x" * (MAX_MANIFEST_BYTES + 10) + b'"}'
    raw = response(200, body) if announce else response(200, body, headers={"Content-Length": ""})
    if not announce:
        raw = raw.replace(b"Content-Length: \r\n", b"")
    stub = await stub_factory(_router({"/manifests/v1": raw}))
    async with RegistryClient(stub.address) as client:
        with pytest.raises(RegistryError, match=r"(more|longer) than the 4194304"):
            await client.resolve(parse_reference(f"{stub.address}/a/b:v1"))


async def test_deeply_nested_json_is_refused(stub_factory: StubFactory) -> None:
    body = (
        b'{"schemaVersion":2,"mediaType":"'
        + OCI_MANIFEST.encode()
        + b'","x":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}"
    )
    stub = await stub_factory(_router({"/manifests/v1": response(200, body)}))
    async with RegistryClient(stub.address) as client:
        with pytest.raises(RegistryError, match="nested deeper than 64"):
            await client.resolve(parse_reference(f"{stub.address}/a/b:v1"))


def _pull_routes(blob: bytes, **blob_kw: int) -> dict[str, bytes | Callable[[Request], bytes]]:
    return {
        "/manifests/v1": response(200, _manifest()),
        f"/blobs/{sha256_digest(CONFIG)}": response(200, CONFIG),
        f"/blobs/{sha256_digest(LAYER)}": _blob_route(blob, **blob_kw),
    }


async def _pull_layer(stub: Stub, tmp_path: Path) -> Path:
    ref = parse_reference(f"{stub.address}/a/b:v1")
    dest = tmp_path / "layer"
    async with RegistryClient(stub.address) as client:
        resolved = await client.resolve(ref)
        [layer] = resolved.layers
        try:
            await client.fetch_blob(ref, layer.digest, layer.size, dest)
        finally:
            assert not dest.exists(), "a failed fetch leaves nothing behind"
    return dest


async def test_a_blob_with_other_content_is_a_digest_mismatch(
    stub_factory: StubFactory, tmp_path: Path
) -> None:
    other = b"X" * len(LAYER)
    stub = await stub_factory(_router(_pull_routes(other)))
    with pytest.raises(DigestMismatch, match="arrived with digest " + sha256_digest(other)):
        await _pull_layer(stub, tmp_path)


async def test_a_truncated_blob_is_a_digest_mismatch(
    stub_factory: StubFactory, tmp_path: Path
) -> None:
    stub = await stub_factory(_router(_pull_routes(LAYER[:100], content_length=len(LAYER))))
    with pytest.raises(DigestMismatch, match=f"broke off after 100 of {len(LAYER)} bytes"):
        await _pull_layer(stub, tmp_path)


async def test_a_blob_longer_than_announced_is_cut_off(
    stub_factory: StubFactory, tmp_path: Path
) -> None:
    long = LAYER + b"more" * 1_000_000
    raw = _blob_route(long).replace(f"Content-Length: {len(long)}\r\n".encode(), b"")
    routes = _pull_routes(LAYER)
    routes[f"/blobs/{sha256_digest(LAYER)}"] = raw
    stub = await stub_factory(_router(routes))
    with pytest.raises(DigestMismatch, match=f"longer than the {len(LAYER)} bytes"):
        await _pull_layer(stub, tmp_path)


async def test_a_blob_announced_with_another_size_is_refused(
    stub_factory: StubFactory, tmp_path: Path
) -> None:
    stub = await stub_factory(_router(_pull_routes(LAYER + b"!")))
    with pytest.raises(DigestMismatch, match=f"announced as {len(LAYER) + 1} bytes"):
        await _pull_layer(stub, tmp_path)


async def test_a_manifest_that_does_not_match_its_digest(stub_factory: StubFactory) -> None:
    digest = "sha256:" + "e" * 64
    stub = await stub_factory(_router({f"/manifests/{digest}": response(200, _manifest())}))
    async with RegistryClient(stub.address) as client:
        with pytest.raises(DigestMismatch, match="not the one named"):
            await client.resolve(parse_reference(f"{stub.address}/a/b@{digest}"))


async def test_bearer_token_flow_with_basic_credentials(stub_factory: StubFactory) -> None:
    creds = Credentials("alice", "s3cret")
    holder: dict[str, Stub] = {}

    def protected(body: bytes) -> Callable[[Request], bytes]:
        def answer(request: Request) -> bytes:
            if request.headers.get("authorization") != "Bearer tok-123":
                realm = f"http://{holder['stub'].address}/token"
                challenge = f'Bearer realm="{realm}",service="stub",scope="repository:a/b:pull"'
                return response(401, b"", {"WWW-Authenticate": challenge})
            return response(200, body)

        return answer

    def token(request: Request) -> bytes:
        expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        if request.headers.get("authorization") != expected:
            return response(401)
        assert "scope=repository%3Aa%2Fb%3Apull" in request.path and "service=stub" in request.path
        return response(200, b'{"token": "tok-123", "expires_in": 300}')

    routes: dict[str, bytes | Callable[[Request], bytes]] = {
        "/token": token,
        "/manifests/v1": protected(_manifest()),
        f"/blobs/{sha256_digest(CONFIG)}": protected(CONFIG),
    }
    stub = await stub_factory(_router(routes))
    holder["stub"] = stub
    ref = parse_reference(f"{stub.address}/a/b:v1")
    async with RegistryClient(stub.address, credentials=creds) as client:
        resolved = await client.resolve(ref)
    assert resolved.config_bytes == CONFIG
    # The token was fetched once and reused for the config blob.
    assert sum(r.path.startswith("/token") for r in stub.requests) == 1
    async with RegistryClient(stub.address, credentials=Credentials("alice", "bad")) as client:
        with pytest.raises(
            Unauthorized, match="token service refused the credentials of user 'alice'"
        ):
            await client.resolve(ref)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"garbage", "token service answered garbage"),
        (b'{"token": "' + b"a" * 300_000 + b'"}', "more than the 262144"),
        (b'{"token": "bad\\r\\ninjected: 1"}', "no usable token"),
        (b'{"nothing": 1}', "no usable token"),
    ],
)
async def test_a_hostile_token_service(stub_factory: StubFactory, body: bytes, match: str) -> None:
    holder: dict[str, Stub] = {}

    def manifest(request: Request) -> bytes:
        realm = f"http://{holder['stub'].address}/token"
        return response(401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}"'})

    stub = await stub_factory(_router({"/token": response(200, body), "/manifests/v1": manifest}))
    holder["stub"] = stub
    async with RegistryClient(stub.address) as client:
        with pytest.raises(RegistryError, match=match):
            await client.resolve(parse_reference(f"{stub.address}/a/b:v1"))


async def test_a_refused_push_names_the_registry_and_status_without_escapes(
    stub_factory: StubFactory, tmp_path: Path
) -> None:
    body = b'{"errors":[{"code":"DENIED","message":"no pushing here \\u001b[31mred"}]}'
    stub = await stub_factory(
        _router({"/blobs/uploads/": response(403, body), "/blobs/": response(404)})
    )
    store = tmp_path / "store"
    from tele.image.testing import tiny_image

    image = tiny_image(store, [("f", b"f", 0o644)])
    async with RegistryClient(stub.address) as client:
        with pytest.raises(Unauthorized) as info:
            await client.push_image(
                parse_reference(f"{stub.address}/a/b:v1"), image.manifest_bytes, image.blobs()
            )
    message = str(info.value)
    assert message.startswith(f"Registry {stub.address}: refused starting an upload to a/b")
    assert message.endswith("(HTTP 403).")
    assert "\x1b" not in message and "no pushing here" in message


def test_challenges_are_parsed_with_quotes_and_escapes() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg \\"x\\"",scope=repository:a:pull'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": 'reg "x"',
        "scope": "repository:a:pull",
    }
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert parse_challenge("") == ("", {})


async def test_a_manifest_with_too_many_layers_is_refused(stub_factory: StubFactory) -> None:
    layer = Descriptor(OCI_LAYER_GZIP, sha256_digest(LAYER), len(LAYER))
    manifest = encode(
        Manifest(
            schema_version=2,
            media_type=OCI_MANIFEST,
            config=Descriptor(OCI_CONFIG, sha256_digest(CONFIG), len(CONFIG)),
            layers=[layer] * 129,
        )
    )
    stub = await stub_factory(_router({"/manifests/v1": response(200, manifest)}))
    async with RegistryClient(stub.address) as client:
        with pytest.raises(RegistryError, match="has 129 layers, more than the 128"):
            await client.resolve(parse_reference(f"{stub.address}/a/b:v1"))


async def test_a_cancelled_fetch_leaves_no_partial_file(
    stub_factory: StubFactory, tmp_path: Path
) -> None:
    half_sent = trio.Event()

    async def handler(request: Request, stream: trio.SocketStream) -> None:
        if "/blobs/" in request.path:
            head = response(200, b"", content_length=len(LAYER))
            await stream.send_all(head + LAYER[: len(LAYER) // 2])
            half_sent.set()
            await trio.sleep_forever()  # the registry stalls mid-blob
        await stream.send_all(response(404))

    stub = await stub_factory(handler)
    ref = parse_reference(f"{stub.address}/a/b:v1")
    dest = tmp_path / "layer"
    async with RegistryClient(stub.address) as client, trio.open_nursery() as nursery:

        async def fetch() -> None:
            await client.fetch_blob(ref, sha256_digest(LAYER), len(LAYER), dest)

        nursery.start_soon(fetch)
        await half_sent.wait()
        await wait_for(dest.exists)  # the client has started writing
        nursery.cancel_scope.cancel()
    assert not dest.exists()
