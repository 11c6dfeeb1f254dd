"""A tiny OCI image for runtime tests, built from Debian's busybox-static: two layers (the
second deletes a file of the first through a whiteout), a user `app` (1000) and a group `staff`."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "cat", "echo", "id", "ls", "sleep", "touch", "hostname", "head", "tr", "env")


def available() -> bool:
    if not Path(BUSYBOX).is_file():
        return False
    with open(BUSYBOX, "rb") as f:
        return b"ld-linux" not in f.read(4096)  # static (no interpreter): needs no host library


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _dir(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def base_layer() -> bytes:
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [
        _dir("bin"),
        _file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755),
        *[_link(f"bin/{a}", "busybox") for a in APPLETS],
        _dir("etc"),
        _file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        ),
        _file("etc/group", b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n"),
        _dir("tmp", 0o1777),
        _dir("home"),
        _dir("home/app"),
        _dir("gone"),
        _file("gone/file", b"deleted by the next layer\n"),
        _file("etc/layer", b"base\n"),
    ]
    entries[-4][0].uid = entries[-4][0].gid = 1000
    return _tar(entries)


def top_layer() -> bytes:
    return _tar([_dir("gone"), _file("gone/.wh.file", b""), _file("etc/layer", b"top\n")])


def write_layout(
    dest: Path,
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    user: str = "",
    env: list[str] | None = None,
    workdir: str = "",
    extra: bytes = b"",
) -> Path:
    """An OCI image layout of the test image at `dest` (replaced)."""
    if dest.exists():
        shutil.rmtree(dest)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    layers = [base_layer(), top_layer()]
    if extra:
        layers.append(_tar([_file("extra", extra)]))
    layer_descs = []
    for raw in layers:
        gz = gzip.compress(raw, mtime=0)
        layer_descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": blob(gz),
                "size": len(gz),
            }
        )
    process: dict[str, Any] = {"Env": env or ["PATH=/bin", "FROM_IMAGE=yes", "OVERRIDE=image"]}
    if entrypoint is not None:
        process["Entrypoint"] = entrypoint
    if cmd is not None:
        process["Cmd"] = cmd
    if user:
        process["User"] = user
    if workdir:
        process["WorkingDir"] = workdir
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": process,
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest() for raw in layers],
            },
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": blob(config),
                "size": len(config),
            },
            "layers": layer_descs,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": blob(manifest),
                "size": len(manifest),
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return dest


def manifest_and_blobs(layout: Path) -> tuple[bytes, dict[str, Path]]:
    """The manifest of a layout written by `write_layout` and every blob by digest (to push)."""
    index = json.loads((layout / "index.json").read_text())
    blobs = {f"sha256:{p.name}": p for p in (layout / "blobs" / "sha256").iterdir()}
    return blobs[index["manifests"][0]["digest"]].read_bytes(), blobs
