"""The sandbox's registry: started with the cluster, TLS from its CA, basic auth, images pushed
under Docker Hub names and found again through the registry as a docker.io mirror."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import trio

import tele
from tele.image.credentials import Credentials
from tele.image.errors import RegistryUnreachable, Unauthorized
from tele.image.reference import parse_reference
from tele.image.registry import RegistryClient
from tele.image.testing import tiny_image
from tele.sandbox.cluster import ClusterInfo, serve_cluster
from tele.sandbox.oci_registry import open_registry, registry_available
from tele.sandbox.publish import publish, seed

pytestmark = pytest.mark.skipif(
    registry_available() is not None, reason=f"needs {registry_available()}"
)


async def test_cluster_runs_a_registry_that_takes_and_serves_images(tmp_path: Path) -> None:
    images = [
        (tiny_image(tmp_path / "store", [("m", b"manager", 0o644)]), ["tele/traffic-manager:1"]),
        (tiny_image(tmp_path / "store", [("e", b"echo", 0o644)]), ["tele-sandbox/echo:latest"]),
    ]
    async with trio.open_nursery() as nursery:
        info: ClusterInfo = await nursery.start(
            lambda **kw: serve_cluster("imgtest", registry_dir=tmp_path / "registry", **kw)
        )
        registry = info.registry
        assert registry is not None
        assert registry.host == "127.0.0.1" and registry.ca_file.read_bytes() == info.ca.cert_pem
        first = await publish(registry, images)
        assert sorted(p.pushed for p in first) == [True, True]
        again = await publish(registry, images)
        assert [p.pushed for p in again] == [False, False]
        # Short names resolve through the registry as a docker.io mirror (the kubelet's view).
        async with RegistryClient(
            registry.address,
            credentials=registry.credentials,
            ca_file=registry.ca_file,
            mirror_of="docker.io",
        ) as client:
            resolved = await client.resolve(parse_reference("tele-sandbox/echo"))
            assert resolved.digest == images[1][0].digest
        async with RegistryClient(
            registry.address, credentials=Credentials("tele", "nope"), ca_file=registry.ca_file
        ) as client:
            with pytest.raises(Unauthorized):
                await client.resolve(parse_reference(f"{registry.address}/tele-sandbox/echo"))
        nursery.cancel_scope.cancel()
    # Gone with the cluster: nothing listens there any more.
    async with RegistryClient(registry.address, ca_file=registry.ca_file) as client:
        with pytest.raises(RegistryUnreachable):
            await client.manifest_digest(parse_reference(f"{registry.address}/x/y"))


async def test_images_laid_into_the_storage_are_served_and_not_pushed(tmp_path: Path) -> None:
    # What `tele sandbox up` does: the cached images are laid into the registry's storage (blob
    # files hard linked), so the pushes that follow find every manifest there.
    store = tmp_path / "store"
    manager = tiny_image(store, [("m", b"manager", 0o644), ("shared", b"s" * 5000, 0o644)])
    echo = tiny_image(store, [("e", b"echo", 0o644)])
    images = [
        (manager, ["tele/traffic-manager:1", "tele/traffic-agent:1"]),
        (echo, ["tele-sandbox/echo:latest"]),
    ]
    async with open_registry(tmp_path / "registry") as registry:
        assert seed(registry.data_dir / "data", images) == 3
        done = await publish(registry, images)
        assert sorted((p.name, p.pushed) for p in done) == [
            ("tele-sandbox/echo:latest", False),
            ("tele/traffic-agent:1", False),
            ("tele/traffic-manager:1", False),
        ]
        async with RegistryClient(
            registry.address, credentials=registry.credentials, ca_file=registry.ca_file
        ) as client:
            for image, names in images:
                for name in names:
                    ref = parse_reference(f"{registry.address}/{name}")
                    resolved = await client.resolve(ref)
                    assert resolved.digest == image.digest
                    assert resolved.config_bytes == image.config_bytes
                    layer = resolved.layers[0]
                    dest = tmp_path / "pulled"
                    await client.fetch_blob(ref, layer.digest, layer.size, dest)
                    assert dest.read_bytes() == image.layers[0].path.read_bytes()
            # A push of a new tag over a seeded one leaves the image cache's files alone.
            before = {p: p.read_bytes() for p in store.iterdir()}
            await client.push_image(
                parse_reference(f"{registry.address}/tele-sandbox/echo:latest"),
                manager.manifest_bytes,
                manager.blobs(),
            )
            assert {p: p.read_bytes() for p in store.iterdir()} == before


def _tele(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tele", *args], env=env, capture_output=True, text=True, timeout=240, check=False
    )


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mmdebstrap") is None or shutil.which("skopeo") is None,
    reason="needs root (the node), mmdebstrap and skopeo",
)
def test_sandbox_up_shows_the_registry_holding_the_images_and_down_removes_it(
    tele_env: dict[str, str],
) -> None:
    name = f"tele-r{uuid.uuid4().hex[:6]}"
    try:
        up = _tele(tele_env, "sandbox", "up", "--name", name, "-o", "json")
        assert up.returncode == 0, up.stderr
        status = json.loads(
            _tele(tele_env, "sandbox", "status", "--name", name, "-o", "json").stdout
        )
        registry = status[0]["registry"]
        assert set(registry) >= {"address", "username", "password", "ca_file"}
        text = _tele(tele_env, "sandbox", "status", "--name", name).stdout
        assert registry["address"] in text and registry["ca_file"] in text
        for image in ("tele-sandbox/echo:latest", f"tele/traffic-manager:{tele.__version__}"):
            inspect = subprocess.run(
                [
                    "skopeo",
                    "inspect",
                    "--creds",
                    f"{registry['username']}:{registry['password']}",
                    "--cert-dir",
                    str(Path(registry["ca_file"]).parent),
                    f"docker://{registry['address']}/{image}",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert inspect.returncode == 0, inspect.stderr
        data_dir = Path(registry["data_dir"])
        assert data_dir.is_dir()
    finally:
        down = _tele(tele_env, "sandbox", "down", "--name", name)
    assert down.returncode == 0
    assert not data_dir.exists()
    host, port = registry["address"].rsplit(":", 1)
    with socket.socket() as sock:
        assert sock.connect_ex((host, int(port))) != 0, "the registry still listens"


def test_a_registry_left_by_a_dead_sandbox_is_stopped_and_only_it(tmp_path: Path) -> None:
    from tele.certs import CertificateAuthority
    from tele.sandbox.oci_registry import PID_FILE, find_binary, prepare, stop_leftover

    directory = tmp_path / "registry"
    config, _ = prepare(directory, CertificateAuthority.create("t"))
    orphan = subprocess.Popen(
        [find_binary(), "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (directory / PID_FILE).write_text(str(bystander.pid))
        assert not stop_leftover(directory), "a pid that is not this registry is left alone"
        assert bystander.poll() is None
        (directory / PID_FILE).write_text(str(orphan.pid))
        assert stop_leftover(directory)
        assert orphan.wait(timeout=10) != 0
    finally:
        for proc in (orphan, bystander):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
