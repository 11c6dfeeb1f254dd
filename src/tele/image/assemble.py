"""An image from layers: its config and manifest written into a content-addressed blob store.

The store is an OCI layout's `blobs/sha256/` directory; `BuiltImage.blobs()` maps each digest to
its file, which is what `RegistryClient.push_image` and the archive writer take.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .layers import Layer
from .oci import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    ContainerConfig,
    Descriptor,
    HistoryEntry,
    ImageConfig,
    Manifest,
    RootFS,
    encode,
    sha256_digest,
)


@dataclass(frozen=True)
class BuiltImage:
    manifest_bytes: bytes
    config_bytes: bytes
    layers: tuple[Layer, ...]
    store: Path
    """The `blobs/sha256` directory holding config, manifest and layers."""

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest_bytes)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config_bytes)

    @property
    def size(self) -> int:
        """Bytes a pull transfers: manifest, config and compressed layers."""
        return len(self.manifest_bytes) + len(self.config_bytes) + sum(x.size for x in self.layers)

    def blobs(self) -> dict[str, Path]:
        found = {self.config_digest: self.store / self.config_digest.removeprefix("sha256:")}
        found.update({layer.digest: layer.path for layer in self.layers})
        return found


def write_blob(store: Path, data: bytes) -> Path:
    """Store `data` under its digest (atomically; an existing blob is left as it is)."""
    store.mkdir(parents=True, exist_ok=True)
    path = store / sha256_digest(data).removeprefix("sha256:")
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def assemble(
    store: Path,
    layers: Sequence[Layer],
    config: ContainerConfig,
    *,
    history: Sequence[str] = (),
    architecture: str = "amd64",
    os_name: str = "linux",
    annotations: dict[str, str] | None = None,
) -> BuiltImage:
    """Write the config and manifest of an image made of `layers` (bottom first) into `store`.

    `history`, when given, has one line per layer (tools check that they match).
    """
    if history and len(history) != len(layers):
        raise ValueError("history needs one entry per layer")
    image_config = ImageConfig(
        architecture=architecture,
        os=os_name,
        rootfs=RootFS("layers", [layer.diff_id for layer in layers]),
        config=config,
        created="1970-01-01T00:00:00Z",
        history=[HistoryEntry(created="1970-01-01T00:00:00Z", created_by=h) for h in history]
        or None,
    )
    config_bytes = encode(image_config)
    write_blob(store, config_bytes)
    manifest = Manifest(
        schema_version=2,
        media_type=OCI_MANIFEST,
        config=Descriptor(OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes)),
        layers=[Descriptor(OCI_LAYER_GZIP, layer.digest, layer.size) for layer in layers],
        annotations=annotations,
    )
    manifest_bytes = encode(manifest)
    write_blob(store, manifest_bytes)
    return BuiltImage(manifest_bytes, config_bytes, tuple(layers), store)
