"""The images the sandbox serves: tele's own and the sandbox's programs, pushed to its registry.

They are pushed under the names a real node reads as Docker Hub names (`tele/traffic-manager`,
`tele-sandbox/echo`): the kubelet treats the sandbox registry as a mirror of docker.io, as
containerd does with a `hosts.toml` mirror on a kind node, so manifests and charts keep their
short names. A push skips an image whose manifest is already there (one HEAD).

`seed` makes that the usual case: before the pushes it lays the images into the registry's
storage directly, in Distribution's filesystem layout, with the image cache's blob files hard
linked (no byte copied; copied when the cache is on another file system), so a new sandbox's
registry holds them at once. The pushes then only check each manifest by digest; whatever the
registry does not find there (another storage layout) is pushed as before.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from ..image.assemble import BuiltImage
from ..image.build import build_sandbox_images, build_tele_image, sandbox_tags
from ..image.reference import parse_reference
from ..image.registry import RegistryClient
from .oci_registry import RegistryInfo

log = logging.getLogger(__name__)

TELE_REPOSITORIES = ("tele/traffic-manager", "tele/traffic-agent")
"""tele's one image under the chart's two default names (manager and agent)."""


@dataclass(frozen=True)
class Published:
    name: str
    digest: str
    pushed: bool
    """False when the registry had it already."""


def sandbox_images(cache_root: Path | None = None) -> list[tuple[BuiltImage, list[str]]]:
    """Build (or take from the cache) every image the sandbox serves, with its names."""
    tele = build_tele_image(cache_root)
    version = tele.tag.rsplit(":", 1)[1]
    images: list[tuple[BuiltImage, list[str]]] = [
        (tele.image, [f"{repo}:{version}" for repo in TELE_REPOSITORIES])
    ]
    for repository, result in build_sandbox_images(cache_root).items():
        images.append((result.image, [f"{repository}:{tag}" for tag in sandbox_tags()]))
    return images


_V2 = Path("docker/registry/v2")
"""Distribution's storage root inside its `rootdirectory` (the same since registry 2.0)."""


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _blob_path(blobs: Path, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return blobs / hex_[:2] / hex_ / "data"


def _link_blob(blobs: Path, digest: str, source: Path) -> None:
    target = _blob_path(blobs, digest)
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # A hard link: the registry never writes a committed blob in place (an upload ends in
        # a rename, a delete in an unlink), so the cache's file cannot change through it.
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        # Another file system: a copy (still far cheaper than a push through HTTPS).
        tmp = target.with_name(".data.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def seed(storage: Path, images: list[tuple[BuiltImage, list[str]]]) -> int:
    """Lay `images` under their names into a Distribution filesystem storage (`rootdirectory`
    `storage`); returns how many names were placed. Blobs are hard links to the image cache's
    files; the small link files are written (Distribution rewrites those in place)."""
    root = storage / _V2
    blobs = root / "blobs" / "sha256"
    placed = 0
    for image, names in images:
        for digest, path in image.blobs().items():
            _link_blob(blobs, digest, path)
        if not _blob_path(blobs, image.digest).exists():
            _write(_blob_path(blobs, image.digest), image.manifest_bytes)
        for name in names:
            repository, tag = name.rsplit(":", 1)
            repo = root / "repositories" / repository
            for digest in image.blobs():
                layer = repo / "_layers" / "sha256" / digest.removeprefix("sha256:") / "link"
                if not layer.exists():
                    _write(layer, digest.encode())
            hex_, link = image.digest.removeprefix("sha256:"), image.digest.encode()
            manifests = repo / "_manifests"
            _write(manifests / "revisions" / "sha256" / hex_ / "link", link)
            _write(manifests / "tags" / tag / "index" / "sha256" / hex_ / "link", link)
            _write(manifests / "tags" / tag / "current" / "link", link)
            placed += 1
    return placed


async def publish(
    registry: RegistryInfo, images: list[tuple[BuiltImage, list[str]]]
) -> list[Published]:
    """Push `images` under their names unless the registry has them already."""
    done: list[Published] = []
    start = time.monotonic()
    async with RegistryClient(
        registry.address, credentials=registry.credentials, ca_file=registry.ca_file
    ) as client:
        holder: dict[str, str] = {}
        """digest -> a repository that has the blob: later pushes mount it from there."""

        async def push(image: BuiltImage, name: str) -> None:
            ref = parse_reference(f"{registry.address}/{name}")
            if await client.manifest_digest(ref) == image.digest:
                done.append(Published(name, image.digest, False))
            else:
                await client.push_image(
                    ref, image.manifest_bytes, image.blobs(), mount_from=dict(holder)
                )
                done.append(Published(name, image.digest, True))

        # The first name first (it brings the shared layers), then the rest side by side,
        # mounting those layers from it.
        (first, first_names), *rest = images
        await push(first, first_names[0])
        holder.update(dict.fromkeys(first.blobs(), first_names[0].split(":")[0]))

        async def push_names(image: BuiltImage, names: list[str]) -> None:
            # One name after the other: the later tags of an image find its blobs there
            # (side by side, each would upload them again).
            for name in names:
                await push(image, name)

        async with trio.open_nursery() as nursery:
            for image, names in [(first, first_names[1:]), *rest]:
                nursery.start_soon(push_names, image, names)
    log.info(
        "sandbox registry: %d images pushed, %d already there (%.2f s)",
        sum(p.pushed for p in done),
        sum(not p.pushed for p in done),
        time.monotonic() - start,
    )
    return done
