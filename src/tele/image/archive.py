"""An image archive as `docker save` (Docker >= 25) writes it: an OCI layout plus manifest.json.

One tar holds `oci-layout`, `index.json` and `blobs/sha256/*` (what `oci-archive:`, `ctr import`
and `podman load` read) and `manifest.json` (`[{Config, RepoTags, Layers}]`, what `docker load`,
`kind load image-archive`, `k3d image import` and `docker-archive:` read). Entries are sorted,
owned by root and dated 1970, so the same image gives the same archive.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from .assemble import BuiltImage
from .oci import OCI_INDEX, OCI_MANIFEST
from .reference import DOCKER_HUB, parse_reference


def _info(name: str, size: int = 0, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(path: Path, images: Sequence[tuple[BuiltImage, str]]) -> None:
    """Write `images` (each with a `repository:tag` name) to `path` atomically."""
    index_entries = []
    docker_entries = []
    blobs: dict[str, Path] = {}
    for image, name in images:
        ref = parse_reference(name)
        full = str(ref)
        short = ref.familiar
        blobs.update(image.blobs())
        blobs[image.digest] = image.store / image.digest.removeprefix("sha256:")
        index_entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.digest,
                "size": len(image.manifest_bytes),
                # ctr import (kind, k3d) picks the node's platform from the index.
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": full,
                    "org.opencontainers.image.ref.name": ref.tag or "latest",
                },
            }
        )
        docker_entries.append(
            {
                "Config": f"blobs/sha256/{image.config_digest.removeprefix('sha256:')}",
                "RepoTags": [short if ref.registry == DOCKER_HUB else full],
                "Layers": [
                    f"blobs/sha256/{x.digest.removeprefix('sha256:')}" for x in image.layers
                ],
            }
        )
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
        ).encode(),
        "manifest.json": json.dumps(docker_entries).encode(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_dir("blobs"))
            tar.addfile(_dir("blobs/sha256"))
            for digest in sorted(blobs):
                source = blobs[digest]
                with source.open("rb") as f:
                    tar.addfile(
                        _info(
                            f"blobs/sha256/{digest.removeprefix('sha256:')}", source.stat().st_size
                        ),
                        f,
                    )
            for name in sorted(files):
                tar.addfile(_info(name, len(files[name])), io.BytesIO(files[name]))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _dir(name: str) -> tarfile.TarInfo:
    info = _info(name, mode=0o755)
    info.type = tarfile.DIRTYPE
    return info
