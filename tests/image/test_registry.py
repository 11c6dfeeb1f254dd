"""The registry client against a real docker-registry (TLS, basic auth) on 127.0.0.1."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tele.image.credentials import Credentials
from tele.image.errors import NotFound, RegistryUnreachable, Unauthorized
from tele.image.oci import (
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Platform,
    encode,
)
from tele.image.reference import parse_reference
from tele.image.registry import RegistryClient
from tele.image.testing import tiny_image
from tele.sandbox.oci_registry import RegistryInfo, open_registry, registry_available

pytestmark = pytest.mark.skipif(
    registry_available() is not None, reason=f"needs {registry_available()}"
)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RegistryInfo]:
    async with open_registry(tmp_path / "registry") as info:
        yield info


def _client(info: RegistryInfo, **kw: object) -> RegistryClient:
    kw.setdefault("credentials", info.credentials)
    kw.setdefault("ca_file", info.ca_file)
    return RegistryClient(info.address, **kw)  # type: ignore[arg-type]


async def test_push_then_pull_gives_back_the_same_bytes(
    registry: RegistryInfo, tmp_path: Path
) -> None:
    image = tiny_image(tmp_path / "store", [("hello", b"hello world\n", 0o755)])
    ref = parse_reference(f"{registry.address}/tele-test/hello:v1")
    uploads: list[tuple[str, bool]] = []
    async with _client(registry) as client:
        assert await client.manifest_digest(ref) is None
        digest = await client.push_image(
            ref,
            image.manifest_bytes,
            image.blobs(),
            on_blob=lambda d, up: uploads.append((d.digest, up)),
        )
        assert digest == image.digest
        assert await client.manifest_digest(ref) == image.digest
        assert [up for _, up in uploads] == [True, True]
        # A second push finds every blob there and uploads nothing.
        uploads.clear()
        await client.push_image(
            ref,
            image.manifest_bytes,
            image.blobs(),
            on_blob=lambda d, up: uploads.append((d.digest, up)),
        )
        assert [up for _, up in uploads] == [False, False]

        resolved = await client.resolve(ref)
        assert resolved.digest == image.digest
        assert resolved.config_bytes == image.config_bytes
        assert resolved.config.config.cmd == ["/hello"]
        [layer] = resolved.layers
        dest = tmp_path / "layer.tar.gz"
        await client.fetch_blob(ref, layer.digest, layer.size, dest)
        assert dest.read_bytes() == image.layers[0].path.read_bytes()
        # By digest too.
        by_digest = await client.resolve(ref.with_digest(image.digest))
        assert by_digest.digest == image.digest


async def test_an_index_is_resolved_by_platform(registry: RegistryInfo, tmp_path: Path) -> None:
    amd = tiny_image(tmp_path / "store", [("arch", b"amd64", 0o644)])
    arm = tiny_image(tmp_path / "store", [("arch", b"arm64", 0o644)])
    repo = f"{registry.address}/tele-test/multi"
    async with _client(registry) as client:
        for image in (amd, arm):
            await client.push_image(parse_reference(repo), image.manifest_bytes, image.blobs())
        for media_type in (OCI_INDEX, DOCKER_LIST):
            index = Index(
                schema_version=2,
                media_type=media_type,
                manifests=[
                    Descriptor(
                        OCI_MANIFEST,
                        arm.digest,
                        len(arm.manifest_bytes),
                        Platform("arm64", "linux", "v8"),
                    ),
                    Descriptor(
                        OCI_MANIFEST,
                        amd.digest,
                        len(amd.manifest_bytes),
                        Platform("amd64", "linux"),
                    ),
                ],
            )
            ref = parse_reference(f"{repo}:multi")
            index_digest = await client.push_manifest(ref, encode(index), media_type)
            resolved = await client.resolve(ref)
            assert resolved.digest == amd.digest
            assert resolved.index_digest == index_digest
            assert resolved.repo_digest == f"{registry.address}/tele-test/multi@{index_digest}"
            arm_resolved = await client.resolve(ref, "linux/arm64")
            assert arm_resolved.digest == arm.digest
            with pytest.raises(
                NotFound, match=r"no image for linux/s390x \(it has linux/amd64, linux/arm64\)"
            ):
                await client.resolve(ref, "linux/s390x")


async def test_missing_image_and_blob_are_not_found(registry: RegistryInfo, tmp_path: Path) -> None:
    ref = parse_reference(f"{registry.address}/tele-test/none:v9")
    async with _client(registry) as client:
        with pytest.raises(NotFound) as info:
            await client.resolve(ref)
        assert info.value.status == 404
        assert str(info.value) == (
            f"Registry {registry.address}: there is no image "
            f"{registry.address}/tele-test/none:v9 (HTTP 404)."
        )
        dest = tmp_path / "blob"
        with pytest.raises(NotFound):
            await client.fetch_blob(ref, "sha256:" + "0" * 64, 10, dest)
        assert not dest.exists()


async def test_wrong_or_missing_credentials_are_unauthorized(registry: RegistryInfo) -> None:
    ref = parse_reference(f"{registry.address}/tele-test/hello:v1")
    async with _client(registry, credentials=Credentials("tele", "wrong")) as client:
        with pytest.raises(Unauthorized) as info:
            await client.resolve(ref)
    assert info.value.status == 401
    assert "refused the credentials of user 'tele'" in str(info.value)
    assert "wrong" not in str(info.value)
    async with _client(registry, credentials=None) as client:
        with pytest.raises(Unauthorized, match="needs credentials"):
            await client.resolve(ref)


async def test_an_unknown_ca_is_refused_unless_insecure(
    registry: RegistryInfo, tmp_path: Path
) -> None:
    image = tiny_image(tmp_path / "store", [("x", b"x", 0o644)])
    ref = parse_reference(f"{registry.address}/tele-test/ca:v1")
    async with RegistryClient(registry.address, credentials=registry.credentials) as client:
        with pytest.raises(
            RegistryUnreachable, match=r"TLS certificate is not trusted \(certificate verify failed"
        ):
            await client.push_image(ref, image.manifest_bytes, image.blobs())
    async with RegistryClient(
        registry.address, credentials=registry.credentials, insecure=True
    ) as client:
        assert await client.push_image(ref, image.manifest_bytes, image.blobs()) == image.digest


async def test_a_registry_that_is_down_is_unreachable(tmp_path: Path) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ref = parse_reference(f"127.0.0.1:{port}/x/y")
    async with RegistryClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(RegistryUnreachable) as info:
            await client.resolve(ref)
    assert str(info.value).startswith(f"Registry 127.0.0.1:{port}: cannot be reached")
    assert info.value.status is None


async def test_mirror_serves_docker_hub_names(registry: RegistryInfo, tmp_path: Path) -> None:
    image = tiny_image(tmp_path / "store", [("m", b"mirror", 0o644)])
    async with _client(registry, mirror_of="docker.io") as client:
        await client.push_image(
            parse_reference("tele-sandbox/echo:latest"), image.manifest_bytes, image.blobs()
        )
        resolved = await client.resolve(parse_reference("tele-sandbox/echo"))
    assert resolved.digest == image.digest
    assert hashlib.sha256(resolved.manifest_bytes).hexdigest() == image.digest.split(":")[1]
