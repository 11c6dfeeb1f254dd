"""The node's image store: image references, unpacked layers and what each pulled name points to.

Layers are unpacked once, by diff_id, into `layers/<hex>/` with whiteouts in overlayfs' form
(`.wh.NAME` → a 0/0 character device, `.wh..wh..opq` → the `trusted.overlay.opaque` xattr), so
that containers share them as overlayfs lower directories. A layer is unpacked into a temporary
directory and renamed into place only once its diff_id checked out: never half-unpacked.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

Obj = dict[str, Any]

MEDIA_MANIFEST_OCI = "application/vnd.oci.image.manifest.v1+json"
MEDIA_MANIFEST_DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_INDEX_OCI = "application/vnd.oci.image.index.v1+json"
MEDIA_INDEX_DOCKER = "application/vnd.docker.distribution.manifest.list.v2+json"
_GZIP_LAYERS = (
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
)
_PLAIN_LAYERS = ("application/vnd.oci.image.layer.v1.tar",)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


class ImageError(Exception):
    """Pulling or unpacking an image failed; the message says why, as the kubelet reports it."""


@dataclass(frozen=True)
class Image:
    """An image present on the node: its manifest digest, config and layers (bottom first)."""

    ref: str
    digest: str
    config: Obj
    diff_ids: tuple[str, ...]
    size: int

    @property
    def process_config(self) -> Obj:
        return dict(self.config.get("config") or {})


class _HashingReader:
    """A read-only file object that hashes and counts what passes through it."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _hex(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest):
        raise ImageError(f"unsupported digest {digest[:80]!r}")
    return digest.split(":", 1)[1]


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _clean_name(name: str) -> str:
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    if cleaned in ("", "."):
        return "."
    return cleaned


def unpack_layer(fileobj: IO[bytes], dest: Path) -> None:
    """Extract one layer tar stream into `dest`, converting whiteouts for overlayfs.

    A member may not leave `dest`, neither by its name nor through a symlink unpacked before it;
    device nodes other than whiteouts are skipped (a layer is data, not access to the host)."""
    root = os.path.realpath(dest)
    whiteouts: list[str] = []
    opaques: list[str] = []

    def check_parent(rel: str) -> None:
        parent = os.path.realpath(os.path.join(root, posixpath.dirname(rel)))
        if not _inside(root, parent):
            raise ImageError(f"layer member {rel!r} leads outside the layer")

    def layer_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        rel = _clean_name(member.name)
        if rel == ".":
            return None if not member.isdir() else member.replace(name=".", deep=False)
        base, parent = posixpath.basename(rel), posixpath.dirname(rel)
        check_parent(rel)
        if base == ".wh..wh..opq":
            opaques.append(parent)
            return None
        if base.startswith(".wh."):
            whiteouts.append(posixpath.join(parent, base[4:]))
            return None
        if member.ischr() or member.isblk():
            return None
        linkname = member.linkname
        if member.islnk():
            linkname = _clean_name(linkname)
            target = os.path.realpath(os.path.join(root, linkname))
            if not _inside(root, target):
                raise ImageError(f"layer hard link {rel!r} points outside the layer")
        return member.replace(name=rel, linkname=linkname, deep=False)

    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            tar.extractall(root, numeric_owner=True, filter=layer_filter)
    except (tarfile.TarError, EOFError, OSError, KeyError, zlib_error()) as exc:
        raise ImageError(f"failed to extract layer: {exc}") from exc
    for rel in opaques:
        target = os.path.join(root, rel)
        os.makedirs(target, exist_ok=True)
        os.setxattr(target, "trusted.overlay.opaque", b"y", follow_symlinks=False)
    for rel in whiteouts:
        target = os.path.join(root, rel)
        if os.path.lexists(target):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.unlink(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


class ImageStore:
    """Files under `root`: `layers/<hex>/` (unpacked, by diff_id), `images/<hex>.json` (by
    manifest digest: config, diff_ids, size) and `refs/<hash of name>.json` (name → digest)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("layers", "images", "refs", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()

    def _sweep_tmp(self) -> None:
        """Remove what an unpacker that died left in tmp/ (its pid is in the name)."""
        for entry in (self.root / "tmp").iterdir():
            pid = entry.name.split("-", 1)[0]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue
            _remove(entry)

    def tmp_path(self, what: str) -> Path:
        return self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex[:12]}-{what}"

    def layer_dir(self, diff_id: str) -> Path:
        return self.root / "layers" / _hex(diff_id)

    def has_layer(self, diff_id: str) -> bool:
        return self.layer_dir(diff_id).is_dir()

    def add_layer(self, blob: Path, media_type: str, diff_id: str) -> Path:
        """Unpack a (digest-checked) layer blob, verifying its diff_id; returns its directory."""
        final = self.layer_dir(diff_id)
        if final.is_dir():
            return final
        if media_type in _GZIP_LAYERS:
            opener: Callable[[IO[bytes]], Any] = lambda f: gzip.GzipFile(fileobj=f)  # noqa: E731
        elif media_type in _PLAIN_LAYERS:
            opener = lambda f: f  # noqa: E731
        else:
            raise ImageError(f"unsupported layer media type {media_type[:100]!r}")
        tmp = self.tmp_path("layer")
        tmp.mkdir()
        try:
            with blob.open("rb") as raw:
                reader = _HashingReader(opener(raw))
                unpack_layer(reader, tmp)  # type: ignore[arg-type]
                try:
                    reader.drain()
                except (OSError, EOFError, zlib_error()) as exc:
                    raise ImageError(f"failed to extract layer: {exc}") from exc
            got = "sha256:" + reader.hash.hexdigest()
            if got != diff_id:
                raise ImageError(
                    f"failed to extract layer {diff_id}: uncompressed content has digest {got}"
                )
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            _remove(tmp)
        return final

    def record(self, name: str, digest: str, config_raw: bytes, size: int) -> Image:
        """Remember that `name` is the image with manifest `digest` (all layers present)."""
        config = parse_config(config_raw)
        diff_ids = tuple(config["rootfs"]["diff_ids"])
        for diff_id in diff_ids:
            if not self.has_layer(diff_id):
                raise ImageError(f"layer {diff_id} is missing from the store")
        entry = {
            "digest": digest,
            "config": config_raw.decode(),
            "size": size,
        }
        _write_atomic(self.root / "images" / f"{_hex(digest)}.json", json.dumps(entry).encode())
        _write_atomic(self._ref_file(name), json.dumps({"name": name, "digest": digest}).encode())
        return Image(name, digest, config, diff_ids, size)

    def _ref_file(self, name: str) -> Path:
        return self.root / "refs" / (hashlib.sha256(name.encode()).hexdigest() + ".json")

    def by_digest(self, name: str, digest: str) -> Image | None:
        try:
            entry = json.loads((self.root / "images" / f"{_hex(digest)}.json").read_text())
            config = parse_config(entry["config"].encode())
        except (OSError, ValueError, KeyError, ImageError):
            return None
        diff_ids = tuple(config["rootfs"]["diff_ids"])
        if not all(self.has_layer(d) for d in diff_ids):
            return None
        return Image(name, digest, config, diff_ids, int(entry.get("size") or 0))

    def lookup(self, name: str) -> Image | None:
        """The image `name` (normalized) points to, when it is present."""
        try:
            digest = json.loads(self._ref_file(name).read_text())["digest"]
        except (OSError, ValueError, KeyError):
            return None
        return self.by_digest(name, digest)

    def import_layout(self, layout: Path, name: str) -> Image:
        """Load an OCI image layout (as `kind load` preloads an image): every blob verified."""

        def blob(digest: str) -> Path:
            return layout / "blobs" / "sha256" / _hex(digest)

        def verified(desc: Obj) -> Path:
            path = blob(desc["digest"])
            if sha256_file(path) != desc["digest"]:
                raise ImageError(f"blob {desc['digest']} does not match its digest")
            return path

        index = json.loads((layout / "index.json").read_text())
        desc = index["manifests"][0]
        manifest_raw = verified(desc).read_bytes()
        manifest = json.loads(manifest_raw)
        if manifest.get("mediaType") in (MEDIA_INDEX_OCI, MEDIA_INDEX_DOCKER):
            desc = select_platform(manifest)
            manifest_raw = verified(desc).read_bytes()
            manifest = json.loads(manifest_raw)
        config_raw = verified(manifest["config"]).read_bytes()
        config = parse_config(config_raw)
        layers = manifest.get("layers") or []
        if len(layers) != len(config["rootfs"]["diff_ids"]):
            raise ImageError("the manifest's layers do not match the config's diff_ids")
        for layer, diff_id in zip(layers, config["rootfs"]["diff_ids"], strict=True):
            if not self.has_layer(diff_id):
                self.add_layer(verified(layer), layer.get("mediaType", ""), diff_id)
        size = sum(int(layer.get("size") or 0) for layer in layers)
        return self.record(name, desc["digest"], config_raw, size)


def parse_config(raw: bytes) -> Obj:
    try:
        config = json.loads(raw)
        diff_ids = config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError("the image config is not valid") from exc
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and _DIGEST_RE.fullmatch(d) for d in diff_ids
    ):
        raise ImageError("the image config's rootfs.diff_ids are not valid")
    if not isinstance(config.get("config") or {}, dict):
        raise ImageError("the image config is not valid")
    return dict(config)


def select_platform(index: Obj, platform: str = "linux/amd64") -> Obj:
    """The manifest descriptor of an image index for `platform`."""
    os_name, arch = platform.split("/", 1)
    for desc in index.get("manifests") or []:
        p = desc.get("platform") or {}
        if p.get("os") == os_name and p.get("architecture") == arch:
            return dict(desc)
    raise ImageError(f"no match for platform in manifest: not found ({platform})")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
