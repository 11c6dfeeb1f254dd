"""tele's image, built for real (mmdebstrap + pip: needs the network the first time, ~40 s)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tele.image.build import (
    NONROOT,
    BuildResult,
    build_sandbox_images,
    build_tele_image,
    cache_root,
    tele_key,
    tele_package_dir,
)
from tele.image.layers import describe_layer
from tele.sandbox.oci_registry import RegistryInfo, open_registry, registry_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="needs mmdebstrap"),
]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def images_cache() -> Path:
    """The image cache the suite shares (scripts/test.sh fills it first; content-addressed, so
    a test reads and adds to it without disturbing anyone)."""
    return cache_root()


@pytest.fixture(scope="module")
def built(images_cache: Path) -> BuildResult:
    return build_tele_image(images_cache)


def _names(result: BuildResult, layer: str) -> set[str]:
    path = next(r.layer.path for r in result.layers if r.name == layer)
    with tarfile.open(path) as tar:
        return set(tar.getnames())


def test_tele_image_holds_python_and_tele_but_no_openssh_nor_laptop_libraries(
    built: BuildResult,
) -> None:
    base = _names(built, "base")
    assert {"usr/bin/python3.11", "usr/sbin/nft"} <= base
    assert "etc/passwd" in base
    # The agent serves files with tele.agent.sftp: nothing of OpenSSH is shipped.
    assert not any("openssh" in n or n.startswith("usr/bin/ssh") for n in base)
    assert not any(n.startswith("usr/share/man/") for n in base)
    deps = _names(built, "deps")
    site = "usr/lib/python3/dist-packages"
    for package in ("trio", "h2", "msgspec", "httpx", "cryptography"):
        assert f"{site}/{package}/__init__.py" in deps
    for laptop_only in ("helm_python", "kubernetes", "kubernetes_validate", "pyroute2"):
        assert f"{site}/{laptop_only}/__init__.py" not in deps
    tele = _names(built, "tele")
    assert f"{site}/tele/manager/__main__.py" in tele
    assert "usr/local/bin/tele-entrypoint" in tele
    # This machine's mypyc build of tele.net (scripts/build_native.py) is for its interpreter,
    # not the image's: the image runs those modules as Python.
    assert f"{site}/tele/net/tcpstate.py" in tele
    assert not any("/_native" in n or n.endswith(".so") for n in tele)
    config = json.loads(built.image.config_bytes)
    assert config["config"]["User"] == f"{NONROOT}:{NONROOT}"
    assert config["config"]["Entrypoint"] == ["/usr/local/bin/tele-entrypoint"]
    assert config["config"]["Cmd"] == ["manager"]
    assert built.image.size < 80_000_000


def test_unchanged_inputs_are_a_cache_hit_and_a_code_change_rebuilds_only_tele(
    built: BuildResult, images_cache: Path, tmp_path: Path
) -> None:
    again = build_tele_image(images_cache)
    assert again.cached and again.image.digest == built.image.digest
    package = tmp_path / "tele"
    shutil.copytree(tele_package_dir(), package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "image" / "build.py").write_text(
        # A change no earlier run made: the image cache is shared between runs (the suite's is
        # the user's), so a fixed change was already cached on the second run on a machine.
        (package / "image" / "build.py").read_text() + f"\n# changed {uuid.uuid4().hex}\n"
    )
    changed = build_tele_image(images_cache, package=package)
    assert [r.cached for r in changed.layers] == [True, True, False]
    assert changed.image.digest != built.image.digest
    # Reproducible: the same change built again (cache record dropped) gives the same layer.
    (images_cache / "layers" / f"tele-{tele_key(package)}.json").unlink()
    rebuilt = build_tele_image(images_cache, package=package)
    assert not rebuilt.layers[2].cached
    assert rebuilt.image.digest == changed.image.digest


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chroot into the image")
def test_the_image_runs_the_manager_and_agent_code_as_nonroot(
    built: BuildResult, tmp_path: Path
) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    for layer in built.image.layers:
        with tarfile.open(layer.path) as tar:
            tar.extractall(root, filter="fully_trusted")
    (root / "dev").mkdir(exist_ok=True)
    # Every module of the cluster-side programs imports (the laptop-only libraries are out).
    script = (
        "import importlib, os, pkgutil, ssl, subprocess, tele\n"
        "sides = ('tele.agent', 'tele.manager', 'tele.k8s', 'tele.rpc', 'tele.net', "
        "'tele.contracts')\n"
        "for m in pkgutil.walk_packages(tele.__path__, 'tele.'):\n"
        "    if m.name.startswith(sides): importlib.import_module(m.name)\n"
        "subprocess.run(['/usr/sbin/nft', '--version'], check=True, capture_output=True)\n"
        "print(os.getuid(), ssl.OPENSSL_VERSION.split()[0])"
    )
    result = subprocess.run(
        [
            shutil.which("chroot") or "/usr/sbin/chroot",
            f"--userspec={NONROOT}:{NONROOT}",
            str(root),
            "/usr/bin/python3",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(NONROOT), "OpenSSL"]
    assert not (root / "etc" / "hostname-of-the-host").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chroot into the image")
def test_the_worker_image_has_a_shell_and_the_tools(images_cache: Path, tmp_path: Path) -> None:
    worker = build_sandbox_images(images_cache)["tele-sandbox/worker"]
    root = tmp_path / "rootfs"
    root.mkdir()
    for layer in worker.image.layers:
        with tarfile.open(layer.path) as tar:
            tar.extractall(root, filter="fully_trusted")
    script = (
        "echo hi | grep -c h; seq 2 | tr 12 ab | sed s/b/B/; sleep 0.01; "
        "curl --version | head -c 4; echo; socat -V | grep -o 'socat version'; "
        'python3 -c "print(6*7)"'
    )
    result = subprocess.run(
        [shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == ["1", "a", "B", "curl", "socat version", "42"]


def test_sandbox_images_share_the_base_layer(built: BuildResult, images_cache: Path) -> None:
    images = build_sandbox_images(images_cache)
    assert set(images) >= {"tele-sandbox/echo", "tele-sandbox/worker", "tele-sandbox/l4-echo"}
    base = built.layers[0].layer.digest
    for result in images.values():
        assert result.image.layers[0].digest == base
        assert result.layers[-1].layer.size < 2_000_000
        # The worker has the tools layer between the base and its program; the others don't.
        assert len(result.image.layers) == (
            3 if result.tag.startswith("tele-sandbox/worker:") else 2
        )


def test_the_worker_tools_layer_adds_only_what_the_base_lacks(
    built: BuildResult, images_cache: Path
) -> None:
    worker = build_sandbox_images(images_cache)["tele-sandbox/worker"]
    assert [r.name for r in worker.layers] == ["base", "tools", "program-tele-sandbox-worker"]
    tools = _names(worker, "tools")
    assert {"bin/sh", "bin/sleep", "bin/grep", "usr/bin/curl", "usr/bin/socat"} <= tools
    # Nothing the base already holds unchanged is repeated, and the base's own files stay.
    base = describe_layer(built.layers[0].layer)
    tools_entries = describe_layer(worker.layers[1].layer)
    repeated = {
        name
        for name, entry in tools_entries.items()
        if entry[0] != tarfile.DIRTYPE and base.get(name) == entry
    }
    assert repeated == set()
    assert not tools & {"etc/passwd", "etc/group", "usr/bin/python3", "usr/bin/python3.11"}
    assert worker.layers[1].layer.size < 12_000_000


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RegistryInfo]:
    if registry_available() is not None:
        pytest.skip(f"needs {registry_available()}")
    async with open_registry(tmp_path / "registry") as info:
        yield info


async def test_tele_image_push_with_docker_config_then_a_refusal(
    built: BuildResult, images_cache: Path, registry: RegistryInfo, tmp_path: Path
) -> None:
    import trio

    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_bytes(registry.docker_config())
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "TELE_IMAGE_CACHE": str(images_cache),
        "DOCKER_CONFIG": str(docker),
    }
    target = f"{registry.address}/tele/traffic-manager"
    argv = [str(VENV_BIN / "tele"), "image", "push", target, "--ca-file", str(registry.ca_file)]
    result = await trio.run_process([*argv, "--output", "json"], capture_stdout=True, env=env)
    pushed = json.loads(result.stdout)
    assert pushed["digest"] == built.image.digest
    assert pushed["image"] == f"{target}:{built.tag.rsplit(':', 1)[1]}"
    assert pushed["uploaded_blobs"] == 4
    again = await trio.run_process([*argv, "--output", "json"], capture_stdout=True, env=env)
    assert json.loads(again.stdout)["uploaded_blobs"] == 0

    wrong = base64.b64encode(b"tele:wrong").decode()
    (docker / "config.json").write_text(json.dumps({"auths": {registry.address: {"auth": wrong}}}))
    refused = await trio.run_process(
        argv, capture_stdout=True, capture_stderr=True, env=env, check=False
    )
    assert refused.returncode != 0
    message = refused.stderr.decode().strip()
    assert message.count("\n") == 0, message
    assert registry.address in message and "HTTP 401" in message


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")
def test_tele_image_build_writes_an_archive_skopeo_reads_both_ways(
    built: BuildResult, images_cache: Path, tmp_path: Path
) -> None:
    """`tele image build --sandbox -o FILE`: one tar, read as a docker archive (what docker
    load and kind load image-archive read) by each image's name, and as an OCI archive."""
    import subprocess as sp

    archive = tmp_path / "images.tar"
    env = {**os.environ, "HOME": str(tmp_path), "TELE_IMAGE_CACHE": str(images_cache)}
    done = sp.run(
        [str(VENV_BIN / "tele"), "image", "build", "--sandbox", "-o", str(archive)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"archive: {archive}" in done.stdout
    worker = build_sandbox_images(images_cache)["tele-sandbox/worker"]

    def inspect(source: str) -> dict[str, object]:
        result = sp.run(
            ["skopeo", "inspect", "--raw", source], capture_output=True, timeout=60, check=True
        )
        return dict(json.loads(result.stdout))

    for image, name in ((built.image, built.tag), (worker.image, worker.tag)):
        docker = inspect(f"docker-archive:{archive}:{name}")
        assert docker["config"]["digest"] == image.config_digest, name  # type: ignore[index]
    # The OCI index names tele's image by its version tag: skopeo finds exactly its manifest.
    oci = sp.run(
        ["skopeo", "inspect", "--raw", f"oci-archive:{archive}:{built.tag.rsplit(':', 1)[1]}"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert "sha256:" + hashlib.sha256(oci.stdout).hexdigest() == built.image.digest
