"""Reproducible image layers: sorted tar entries, fixed times, owner 0:0, gzip without a date.

The same files give the same bytes and so the same digest, whatever the machine, the order the
file system lists them in or when the build runs. One pass writes the gzip file and computes
both digests (the compressed blob's and the uncompressed `diff_id`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

EPOCH = 0
"""The mtime of every entry (1970-01-01): reproducible, and what Bazel and ko write."""
GZIP_LEVEL = 6


@dataclass(frozen=True)
class Layer:
    """A finished layer blob: `digest` of the gzip file, `diff_id` of the tar inside."""

    digest: str
    diff_id: str
    size: int
    path: Path


class _HashingWriter(io.RawIOBase):
    def __init__(self, target: BinaryIO | None) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        if self.target is not None:
            self.target.write(view)
        return len(view)


@dataclass
class _Entry:
    kind: bytes
    mode: int
    data: bytes | None = None
    source: Path | None = None
    size: int = 0
    linkname: str = ""
    uid: int = 0
    gid: int = 0


class LayerBuilder:
    """Collects the entries of one layer (by their path in the image), then writes it."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(path: str) -> str:
        clean = os.path.normpath("/" + path).lstrip("/")
        if clean in ("", "."):
            raise ValueError("a layer entry needs a path below /")
        return clean

    def _parents(self, key: str) -> None:
        parent = os.path.dirname(key)
        while parent and parent not in self._entries:
            self._entries[parent] = _Entry(tarfile.DIRTYPE, 0o755)
            parent = os.path.dirname(parent)

    def add_dir(self, path: str, mode: int = 0o755, *, uid: int = 0, gid: int = 0) -> None:
        key = self._key(path)
        self._parents(key)
        self._entries[key] = _Entry(tarfile.DIRTYPE, mode, uid=uid, gid=gid)

    def add_file(
        self, path: str, data: bytes, mode: int = 0o644, *, uid: int = 0, gid: int = 0
    ) -> None:
        key = self._key(path)
        self._parents(key)
        self._entries[key] = _Entry(
            tarfile.REGTYPE, mode, data=data, size=len(data), uid=uid, gid=gid
        )

    def add_host_file(
        self, path: str, source: Path, mode: int = 0o644, *, uid: int = 0, gid: int = 0
    ) -> None:
        """A file whose content is read from `source` when the layer is written."""
        key = self._key(path)
        self._parents(key)
        size = source.stat().st_size
        self._entries[key] = _Entry(
            tarfile.REGTYPE, mode, source=source, size=size, uid=uid, gid=gid
        )

    def add_symlink(self, path: str, target: str) -> None:
        key = self._key(path)
        self._parents(key)
        self._entries[key] = _Entry(tarfile.SYMTYPE, 0o777, linkname=target)

    def add_tree(
        self,
        source: Path,
        dest: str,
        *,
        skip: Callable[[Path], bool] | None = None,
    ) -> None:
        """Add a host directory's files (regular files, directories, symlinks) under `dest`.

        Permissions are kept (execute bits matter), owners are not: everything is root's.
        Hard links become copies; devices, sockets and fifos are left out.
        """
        base = self._key(dest) if dest.strip("/") else ""
        for root, dirs, files in os.walk(source):
            dirs.sort()
            root_path = Path(root)
            for name in [*dirs, *files]:
                host = root_path / name
                if skip is not None and skip(host):
                    if name in dirs:
                        dirs.remove(name)
                    continue
                rel = host.relative_to(source).as_posix()
                key = f"{base}/{rel}" if base else rel
                info = host.lstat()
                mode = stat.S_IMODE(info.st_mode)
                if stat.S_ISLNK(info.st_mode):
                    self.add_symlink(key, os.readlink(host))
                elif stat.S_ISDIR(info.st_mode):
                    self.add_dir(key, mode)
                elif stat.S_ISREG(info.st_mode):
                    self._parents(key)
                    self._entries[key] = _Entry(
                        tarfile.REGTYPE, mode, source=host, size=info.st_size
                    )

    def entries(self) -> list[tuple[str, _Entry]]:
        """The entries so far, sorted by path (for `copy_entry` into another builder)."""
        return sorted(self._entries.items())

    def describe(self, path: str) -> tuple[bytes, int, int, int, str, bytes]:
        """`(type, mode, uid, gid, linkname, sha256 of the content)` of the entry at `path`, as
        `describe_layer` gives a written layer's entries."""
        entry = self._entries[self._key(path)]
        digest = b""
        if entry.data is not None:
            digest = hashlib.sha256(entry.data).digest()
        elif entry.source is not None:
            with entry.source.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").digest()
        return (entry.kind, entry.mode, entry.uid, entry.gid, entry.linkname, digest)

    def copy_entry(self, path: str, entry: _Entry) -> None:
        key = self._key(path)
        self._parents(key)
        self._entries[key] = entry

    def write(self, directory: Path) -> Layer:
        """Write the layer as `directory/<hex>` (a blob store's `blobs/sha256`) and describe it."""
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".layer-{os.getpid()}-{id(self)}.tmp"
        try:
            with tmp.open("wb") as raw:
                compressed = _HashingWriter(raw)
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=GZIP_LEVEL
                ) as gz:
                    uncompressed = _HashingWriter(gz)  # type: ignore[arg-type]
                    with tarfile.open(
                        fileobj=uncompressed,
                        mode="w|",
                        format=tarfile.PAX_FORMAT,
                    ) as tar:
                        for key in sorted(self._entries):
                            self._add(tar, key, self._entries[key])
            digest = "sha256:" + compressed.hash.hexdigest()
            final = directory / compressed.hash.hexdigest()
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return Layer(digest, "sha256:" + uncompressed.hash.hexdigest(), compressed.size, final)

    @staticmethod
    def _add(tar: tarfile.TarFile, key: str, entry: _Entry) -> None:
        info = tarfile.TarInfo(key)
        info.type = entry.kind
        info.mode = entry.mode
        info.mtime = EPOCH
        info.uid, info.gid = entry.uid, entry.gid
        info.uname = info.gname = ""
        if entry.kind == tarfile.SYMTYPE:
            info.linkname = entry.linkname
            tar.addfile(info)
        elif entry.kind == tarfile.REGTYPE:
            info.size = entry.size
            if entry.data is not None:
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                assert entry.source is not None
                with entry.source.open("rb") as f:
                    tar.addfile(info, f)
        else:
            tar.addfile(info)


def describe_layer(layer: Layer) -> dict[str, tuple[bytes, int, int, int, str, bytes]]:
    """`{path: (type, mode, uid, gid, linkname, sha256 of the content)}` of a written layer."""
    index: dict[str, tuple[bytes, int, int, int, str, bytes]] = {}
    with tarfile.open(layer.path, "r:gz") as tar:
        for member in tar:
            digest = b""
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                content = hashlib.sha256()
                with f:
                    while chunk := f.read(1 << 20):
                        content.update(chunk)
                digest = content.digest()
            describe = (member.type, member.mode, member.uid, member.gid, member.linkname, digest)
            index[member.name] = describe
    return index


def layer_from_files(directory: Path, files: Iterable[tuple[str, bytes, int]]) -> Layer:
    """A layer of in-memory files `(path, data, mode)`; for small program layers and tests."""
    builder = LayerBuilder()
    for path, data, mode in files:
        builder.add_file(path, data, mode)
    return builder.write(directory)
