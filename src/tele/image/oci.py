"""OCI and Docker image documents (manifest, index, config) as typed msgspec Structs.

Decoding is bounded: a document larger than its limit or nested deeper than `MAX_JSON_DEPTH`
is refused before it is parsed, and anything that does not fit the schema is a `ValueError`.
"""

from __future__ import annotations

import hashlib
import re
from typing import TypeVar

import msgspec

from ..jsonlimits import check_depth

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (OCI_LAYER_GZIP, OCI_LAYER, DOCKER_LAYER_GZIP)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""containerd's limit: a manifest or index is small; a registry sending more is hostile."""
MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""An image config (history, env, labels) is kilobytes; bounds what a registry makes us hold."""
MAX_JSON_DEPTH = 64
"""Image documents nest about 5 levels; deep nesting only serves to exhaust the parser's stack."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


T = TypeVar("T")


def decode(data: bytes, type_: type[T], limit: int) -> T:
    """Decode a bounded JSON document into `type_`; ValueError with the reason otherwise."""
    if len(data) > limit:
        raise ValueError(f"{len(data)} bytes, more than the {limit} allowed")
    check_depth(data, MAX_JSON_DEPTH)
    try:
        return msgspec.json.decode(data, type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


class Platform(msgspec.Struct, frozen=True, omit_defaults=True):
    architecture: str = ""
    os: str = ""
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"{text!r} is not a platform (os/arch[/variant])")
        return cls(
            os=parts[0], architecture=parts[1], variant=parts[2] if len(parts) == 3 else None
        )


class Descriptor(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", self.digest):
            raise ValueError(f"unsupported digest {self.digest[:80]!r}")
        if not 0 <= self.size < 1 << 42:
            raise ValueError(f"bad size {self.size}")


class Manifest(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    schema_version: int
    config: Descriptor
    layers: list[Descriptor]
    media_type: str | None = None
    annotations: dict[str, str] | None = None


class Index(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    schema_version: int
    manifests: list[Descriptor]
    media_type: str | None = None
    annotations: dict[str, str] | None = None


class _MediaTypeOnly(msgspec.Struct):
    mediaType: str | None = None
    manifests: list[msgspec.Raw] | None = None
    layers: list[msgspec.Raw] | None = None


def sniff_media_type(data: bytes) -> str | None:
    """The media type a manifest says it is (or looks like, for documents without one)."""
    try:
        doc = msgspec.json.decode(data, type=_MediaTypeOnly)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if doc.mediaType:
        return doc.mediaType
    if doc.manifests is not None:
        return OCI_INDEX
    if doc.layers is not None:
        return OCI_MANIFEST
    return None


class ContainerConfig(msgspec.Struct, frozen=True, omit_defaults=True, rename="pascal"):
    """The `config` of an image config: what a runtime combines with the pod's container spec."""

    user: str | None = None
    exposed_ports: dict[str, msgspec.Raw] | None = None
    env: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    volumes: dict[str, msgspec.Raw] | None = None
    working_dir: str | None = None
    labels: dict[str, str] | None = None
    stop_signal: str | None = None


class RootFS(msgspec.Struct, frozen=True, omit_defaults=True):
    type: str
    diff_ids: list[str]


class HistoryEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    created: str | None = None
    created_by: str | None = None
    comment: str | None = None
    empty_layer: bool | None = None


class ImageConfig(msgspec.Struct, frozen=True, omit_defaults=True):
    architecture: str
    os: str
    rootfs: RootFS
    config: ContainerConfig = ContainerConfig()
    variant: str | None = None
    created: str | None = None
    author: str | None = None
    history: list[HistoryEntry] | None = None


def encode(doc: msgspec.Struct) -> bytes:
    """Canonical bytes for a document tele writes (fixed field order, no whitespace)."""
    return msgspec.json.encode(doc)
