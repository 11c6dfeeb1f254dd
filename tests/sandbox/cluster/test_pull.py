"""Pulling as a kubelet does, from a real registry (Debian's docker-registry over TLS with
basic auth): Docker Hub short names through the sandbox registry as a mirror, pull secrets,
and the statuses and events a user sees when a pull fails, with nothing left half-unpacked."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from tele.image.credentials import Credentials, docker_config_json
from tele.image.reference import parse_reference
from tele.image.registry import RegistryClient
from tele.sandbox.kubelet import runtime
from tele.sandbox.network import netns
from tele.sandbox.oci_registry import RegistryInfo, open_registry, registry_available
from tele.sandbox.testing import threaded_cluster

from . import busybox
from .conftest import Kubectl, NodeSandbox

pytestmark = pytest.mark.netns


class _Registry:
    """A registry on a thread of its own (the cluster's thread runs the kubelet)."""

    def __init__(self, directory: Path, layouts: dict[str, Path]) -> None:
        self.directory = directory
        self.layouts = layouts
        self.info: RegistryInfo | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_registry(self.directory) as info:
            self.info = info
            async with RegistryClient(
                info.address, credentials=info.credentials, ca_file=info.ca_file
            ) as client:
                for name, layout in self.layouts.items():
                    manifest, blobs = busybox.manifest_and_blobs(layout)
                    await client.push_image(
                        parse_reference(f"{info.address}/{name}"), manifest, blobs
                    )
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> RegistryInfo:
        self._thread.start()
        self._ready.wait(60)
        if self.error is not None or self.info is None:
            raise RuntimeError("the test registry did not start") from self.error
        return self.info

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryInfo]:
    if not runtime.runc_available():
        pytest.skip("needs root and runc")
    if not busybox.available():
        pytest.skip("needs Debian's busybox-static (/bin/busybox, statically linked)")
    missing = registry_available()
    if missing:
        pytest.skip(f"needs {missing}")
    tmp = tmp_path_factory.mktemp("pull")
    cmd = {"cmd": ["sh", "-c", "echo pulled-$(cat /etc/layer)"]}
    layouts = {
        "tele-test/pulled:1": busybox.write_layout(tmp / "pulled", **cmd),
        "tele-test/always:latest": busybox.write_layout(tmp / "always", **cmd),
        "private/img:1": busybox.write_layout(tmp / "private", **cmd),
        "corrupt/img:1": busybox.write_layout(tmp / "corrupt", extra=b"corrupt me " * 100, **cmd),
    }
    with _Registry(tmp / "registry", layouts) as info:
        yield info


@pytest.fixture(scope="module")
def node_sandbox(
    tmp_path_factory: pytest.TempPathFactory, registry: RegistryInfo
) -> Iterator[NodeSandbox]:
    """The module's cluster, with the registry as its Docker Hub mirror."""
    name = f"t3{uuid.uuid4().hex[:6]}"
    base = tmp_path_factory.mktemp("pull-sandbox")
    (base / "home").mkdir()
    try:
        with threaded_cluster(
            base / "kubeconfig",
            name=name,
            nodes=True,
            state_dir=base / "state",
            node_options={"backoff_base": 0.2, "registry": registry},
        ) as cluster:
            yield NodeSandbox(cluster, name, base / "kubeconfig", base / "home")
    finally:
        left = [n for n in netns.list_netns() if n.startswith(f"{name}-")]
        for n in left:
            netns.delete_sync(n)
        assert not left, f"network namespaces left behind: {left}"


def _apply_pod(kubectl: Kubectl, name: str, image: str, **spec: Any) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": image}], **spec},
    }
    kubectl.run("apply", "-f", "-", input=yaml.safe_dump(pod))


def _state(kubectl: Kubectl, name: str) -> dict[str, Any]:
    pod = json.loads(kubectl.run("get", "pod", name, "-o", "json").stdout)
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return dict(statuses[0]["state"]) if statuses else {}


def _wait_reason(kubectl: Kubectl, name: str, reason: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        state = _state(kubectl, name)
        got = next(iter(state.values()), {}) if state else {}
        if got.get("reason") == reason:
            return dict(got)
        assert time.monotonic() < deadline, f"pod {name}: waited for {reason}, state {state}"
        time.sleep(0.1)


def _events(kubectl: Kubectl, name: str) -> list[tuple[str, str]]:
    items = json.loads(
        kubectl.run(
            "get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json"
        ).stdout
    )["items"]
    return [(e["reason"], e["message"]) for e in items]


def _store(sandbox: NodeSandbox) -> Path:
    return sandbox.kubeconfig.parent / "state" / "images"


def test_short_name_pulled_through_the_mirror(kubectl: Kubectl) -> None:
    _apply_pod(kubectl, "first", "tele-test/pulled:1")
    kubectl.run("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/first", "--timeout=60s")
    assert kubectl.run("logs", "first").stdout == "pulled-top\n"
    events = _events(kubectl, "first")
    assert ("Pulling", 'Pulling image "tele-test/pulled:1"') in events
    pulled = [m for r, m in events if r == "Pulled"]
    assert len(pulled) == 1 and re.fullmatch(
        r'Successfully pulled image "tele-test/pulled:1" in [0-9.]+m?s \([0-9.]+m?s including '
        r"waiting\)\. Image size: \d+ bytes\.",
        pulled[0],
    ), pulled
    _apply_pod(kubectl, "second", "tele-test/pulled:1")
    kubectl.run("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/second", "--timeout=60s")
    assert ("Pulled", 'Container image "tele-test/pulled:1" already present on machine') in (
        _events(kubectl, "second")
    )
    # `:latest` (here: no tag) is pulled again for every container, as with policy Always.
    for name in ("always-1", "always-2"):
        _apply_pod(kubectl, name, "tele-test/always")
        kubectl.run(
            "wait", "--for=jsonpath={.status.phase}=Succeeded", f"pod/{name}", "--timeout=60s"
        )
        assert ("Pulling", 'Pulling image "tele-test/always"') in _events(kubectl, name)


def test_a_tagged_image_is_pulled_by_its_digest_too(
    kubectl: Kubectl, registry: RegistryInfo
) -> None:
    """`tele-test/pulled:1` was pushed with a tag: the digest the node reports for it names the
    same image (present already: a digest never changes, so IfNotPresent), through the mirror
    and from the registry by its own address; a digest the registry lacks is NotFound."""
    _apply_pod(kubectl, "by-tag", "tele-test/pulled:1")
    kubectl.run("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/by-tag", "--timeout=60s")
    pod = json.loads(kubectl.run("get", "pod", "by-tag", "-o", "json").stdout)
    image_id = pod["status"]["containerStatuses"][0]["imageID"]
    repository, digest = image_id.split("@")
    assert repository == "docker.io/tele-test/pulled" and digest.startswith("sha256:")
    for name, image in (
        ("by-digest", f"tele-test/pulled@{digest}"),
        ("by-tag-and-digest", f"tele-test/pulled:1@{digest}"),
        ("by-address", f"{registry.address}/tele-test/pulled@{digest}"),
    ):
        _apply_pod(kubectl, name, image)
        kubectl.run(
            "wait", "--for=jsonpath={.status.phase}=Succeeded", f"pod/{name}", "--timeout=60s"
        )
        assert kubectl.run("logs", name).stdout == "pulled-top\n", name
        ran = json.loads(kubectl.run("get", "pod", name, "-o", "json").stdout)
        assert ran["status"]["containerStatuses"][0]["imageID"].endswith(f"@{digest}"), name
    assert (
        "Pulled",
        f'Container image "tele-test/pulled@{digest}" already present on machine',
    ) in (_events(kubectl, "by-digest"))
    missing = "sha256:" + "0" * 64
    _apply_pod(kubectl, "no-such-digest", f"tele-test/pulled@{missing}")
    waiting = _wait_reason(kubectl, "no-such-digest", "ErrImagePull")
    assert f'Failed to pull image "tele-test/pulled@{missing}"' in waiting["message"]
    assert "code = NotFound" in waiting["message"], waiting


def test_private_image_needs_its_pull_secret(kubectl: Kubectl, registry: RegistryInfo) -> None:
    image = f"{registry.address}/private/img:1"
    _apply_pod(kubectl, "anonymous", image)
    waiting = _wait_reason(kubectl, "anonymous", "ErrImagePull")
    assert waiting["message"].startswith(f'Failed to pull image "{image}": ')
    assert "credentials" in waiting["message"] or "401" in waiting["message"], waiting
    _wait_reason(kubectl, "anonymous", "ImagePullBackOff")
    events = _events(kubectl, "anonymous")
    for expected in [
        ("Pulling", f'Pulling image "{image}"'),
        ("Failed", "Error: ErrImagePull"),
        ("BackOff", f'Back-off pulling image "{image}"'),
        ("Failed", "Error: ImagePullBackOff"),
    ]:
        assert expected in events, events
    for secret, creds in [
        ("wrong", Credentials(registry.username, "not-the-password")),
        ("right", registry.credentials),
    ]:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {
                ".dockerconfigjson": base64.b64encode(
                    docker_config_json(registry.address, creds)
                ).decode()
            },
        }
        kubectl.run("apply", "-f", "-", input=json.dumps(body))
        _apply_pod(kubectl, f"with-{secret}", image, imagePullSecrets=[{"name": secret}])
    _wait_reason(kubectl, "with-wrong", "ErrImagePull")
    kubectl.run(
        "wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/with-right", "--timeout=60s"
    )


def test_registry_down(kubectl: Kubectl) -> None:
    image = "127.0.0.1:9/nobody/home:1"
    _apply_pod(kubectl, "down", image)
    waiting = _wait_reason(kubectl, "down", "ErrImagePull")
    assert waiting["message"].startswith(f'Failed to pull image "{image}": rpc error: ')


def test_digest_mismatch_leaves_nothing(
    kubectl: Kubectl, registry: RegistryInfo, node_sandbox: NodeSandbox
) -> None:
    layout = busybox.write_layout(
        node_sandbox.kubeconfig.parent / "corrupt-layout",
        cmd=["sh", "-c", "echo pulled-$(cat /etc/layer)"],
        extra=b"corrupt me " * 100,
    )
    manifest = json.loads(busybox.manifest_and_blobs(layout)[0])
    layer = manifest["layers"][-1]["digest"].removeprefix("sha256:")
    stored = list(registry.data_dir.rglob(f"blobs/sha256/{layer[:2]}/{layer}/data"))
    assert len(stored) == 1, stored
    data = bytearray(stored[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored[0].write_bytes(bytes(data))
    image = f"{registry.address}/corrupt/img:1"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "pull"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(registry.docker_config()).decode()},
    }
    kubectl.run("apply", "-f", "-", input=json.dumps(secret))
    _apply_pod(kubectl, "corrupt", image, imagePullSecrets=[{"name": "pull"}])
    waiting = _wait_reason(kubectl, "corrupt", "ErrImagePull")
    assert "digest" in waiting["message"].lower(), waiting
    store = _store(node_sandbox)
    diff_id = json.loads(
        (
            layout / "blobs" / "sha256" / manifest["config"]["digest"].removeprefix("sha256:")
        ).read_text()
    )["rootfs"]["diff_ids"][-1]
    assert not (store / "layers" / diff_id.removeprefix("sha256:")).exists()
    assert [p.name for p in (store / "tmp").iterdir()] == []
    kubectl.run("delete", "pod", "corrupt", "--timeout=30s")


_ = (os, shutil)
