"""The node's image store: layers unpacked with whiteouts in overlayfs' form, hostile layers
refused without a trace, a diff_id that does not match leaves nothing half-unpacked."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tele.sandbox.kubelet.imagestore import ImageError, ImageStore

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (whiteouts are character devices and trusted.* xattrs)")


def _layer(tmp: Path, members: list[tuple[str, str, bytes | str]]) -> tuple[Path, str]:
    """A gzip layer blob of (kind, name, data-or-linkname); returns its path and diff_id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for kind, name, data in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
                tar.addfile(info)
            else:
                payload = data if isinstance(data, bytes) else data.encode()
                info.size, info.mode = len(payload), 0o644
                tar.addfile(info, io.BytesIO(payload))
    plain = raw.getvalue()
    blob = tmp / hashlib.sha256(plain).hexdigest()[:12]
    blob.write_bytes(gzip.compress(plain))
    return blob, "sha256:" + hashlib.sha256(plain).hexdigest()


def test_whiteouts_become_overlayfs_whiteouts(tmp_path: Path) -> None:
    _need_root()
    store = ImageStore(tmp_path / "store")
    blob, diff_id = _layer(
        tmp_path,
        [
            ("dir", "etc", b""),
            ("file", "etc/.wh.motd", b""),
            ("dir", "var/cache", b""),
            ("file", "var/cache/.wh..wh..opq", b""),
            ("file", "var/cache/new", b"kept"),
            ("file", "bin/tool", b"x"),
            ("hard", "bin/tool2", "bin/tool"),
        ],
    )
    layer = store.add_layer(blob, GZIP, diff_id)
    motd = os.lstat(layer / "etc/motd")
    assert stat.S_ISCHR(motd.st_mode) and motd.st_rdev == os.makedev(0, 0)
    assert not (layer / "etc/.wh.motd").exists()
    assert os.getxattr(layer / "var/cache", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(layer / "var/cache")) == ["new"]
    assert os.stat(layer / "bin/tool2").st_ino == os.stat(layer / "bin/tool").st_ino
    # Unpacked once: a second add is the same directory, untouched.
    assert store.add_layer(blob, GZIP, diff_id) == layer


@pytest.mark.parametrize(
    ("members", "refused"),
    [
        ([("file", "../escape", b"x")], False),
        ([("sym", "link", "/"), ("file", "link/etc/escape", b"x")], True),
        ([("sym", "up", "../../.."), ("file", "up/escape", b"x")], True),
        ([("hard", "h", "../../escape")], True),
        ([("file", "../.wh.escape", b"")], False),
    ],
    ids=["dotdot", "abs-symlink-dir", "rel-symlink-dir", "hardlink-out", "whiteout-out"],
)
def test_hostile_layers_stay_inside_or_are_refused(
    tmp_path: Path, members: list[tuple[str, str, bytes | str]], refused: bool
) -> None:
    """A name with .. is cleaned to stay inside the layer (as containerd does); a member that
    would be written through a symlink or link to a file outside is refused, leaving nothing."""
    _need_root()
    store = ImageStore(tmp_path / "store")
    blob, diff_id = _layer(tmp_path, members)
    before = set(os.listdir("/"))
    if refused:
        with pytest.raises(ImageError):
            store.add_layer(blob, GZIP, diff_id)
        assert not store.has_layer(diff_id)
    else:
        layer = store.add_layer(blob, GZIP, diff_id)
        assert os.path.lexists(layer / "escape")
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert set(os.listdir("/")) == before
    assert not (tmp_path / "escape").exists() and not (tmp_path / "store" / "escape").exists()


def test_wrong_diff_id_or_truncated_layer_leaves_nothing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    blob, diff_id = _layer(tmp_path, [("file", "a", b"data" * 1000)])
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ImageError, match="uncompressed content has digest"):
        store.add_layer(blob, GZIP, wrong)
    assert not store.has_layer(wrong)
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        store.add_layer(blob, GZIP, diff_id)
    assert not store.has_layer(diff_id)
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    with pytest.raises(ImageError, match="unsupported layer media type"):
        store.add_layer(blob, "application/vnd.oci.image.layer.v1.tar+zstd", diff_id)


def test_a_dead_unpackers_leftovers_are_swept(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    stale = tmp_path / "store" / "tmp" / "999999999-abc-layer"
    (stale / "half").mkdir(parents=True)
    ImageStore(store.root)
    assert not stale.exists()
