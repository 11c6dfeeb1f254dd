"""Layers and archives are reproducible: the same files give the same bytes."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tele.image.archive import write_archive
from tele.image.layers import LayerBuilder
from tele.image.oci import sha256_digest
from tele.image.testing import tiny_image


def _layer(store: Path, order: list[str], tmp: Path) -> str:
    builder = LayerBuilder()
    tree = tmp / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "script").write_text("#!/bin/sh\n")
    (tree / "script").chmod(0o755)
    for name in order:
        if name == "tree":
            builder.add_tree(tree, "opt/tree")
        else:
            builder.add_file(name, name.encode())
    return builder.write(store).digest


def test_the_same_files_in_any_order_give_the_same_digest(tmp_path: Path) -> None:
    first = _layer(tmp_path / "a", ["b/x", "a", "tree", "c/d/e"], tmp_path)
    (tmp_path / "tree" / "script").touch()  # a new mtime changes nothing
    second = _layer(tmp_path / "b", ["tree", "c/d/e", "a", "b/x"], tmp_path)
    assert first == second


def test_layer_entries_are_sorted_owned_by_root_and_dated_1970(tmp_path: Path) -> None:
    builder = LayerBuilder()
    builder.add_file("z/file", b"z", 0o600)
    builder.add_file("a/run", b"#!", 0o755)
    builder.add_symlink("a/link", "run")
    layer = builder.write(tmp_path)
    raw = layer.path.read_bytes()
    assert sha256_digest(raw) == layer.digest and len(raw) == layer.size
    assert raw[4:8] == b"\0\0\0\0", "gzip header without a date"
    with tarfile.open(layer.path) as tar:
        members = tar.getmembers()
        assert sha256_digest(gzip.decompress(raw)) == layer.diff_id
    assert [m.name for m in members] == ["a", "a/link", "a/run", "z", "z/file"]
    assert {(m.uid, m.gid, m.mtime, m.uname) for m in members} == {(0, 0, 0, "")}
    assert {m.name: oct(m.mode) for m in members}["a/run"] == "0o755"


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")
def test_the_archive_reads_as_docker_archive_and_oci_archive(tmp_path: Path) -> None:
    image = tiny_image(tmp_path / "store", [("hello", b"hi", 0o755)])
    archive = tmp_path / "image.tar"
    write_archive(archive, [(image, "tele-test/hello:v1")])
    again = tmp_path / "again.tar"
    write_archive(again, [(image, "tele-test/hello:v1")])
    assert archive.read_bytes() == again.read_bytes()
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest[0]["RepoTags"] == ["tele-test/hello:v1"]
    for transport in ("docker-archive", "oci-archive"):
        result = subprocess.run(
            ["skopeo", "inspect", "--raw", f"{transport}:{archive}"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        inspected = json.loads(result.stdout)
        assert inspected["config"]["digest"] == image.config_digest, transport
    # The OCI side carries exactly our manifest.
    oci = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci-archive:{archive}"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert sha256_digest(oci.stdout) == image.digest


@pytest.mark.skipif(shutil.which("umoci") is None, reason="needs umoci")
def test_umoci_unpacks_the_archives_oci_layout(tmp_path: Path) -> None:
    image = tiny_image(tmp_path / "store", [("hello", b"hi", 0o755)])
    archive = tmp_path / "image.tar"
    write_archive(archive, [(image, "tele-test/hello:v1")])
    layout = tmp_path / "layout"
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:v1", str(tmp_path / "bundle")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert (tmp_path / "bundle" / "rootfs" / "hello").read_bytes() == b"hi"
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["process"]["args"] == ["/hello"]


def test_the_cache_keeps_the_last_versions_of_a_layer_and_drops_older_blobs(
    tmp_path: Path,
) -> None:
    import os

    from tele.image.build import KEEP_VERSIONS, _Cache

    cache = _Cache(tmp_path)
    made = []
    for version in range(KEEP_VERSIONS + 2):
        result = cache.layer(
            "tele", f"key{version}", lambda v=version: _one_file_layer(cache.store, v)
        )
        made.append(result.layer)
        # Records age by use: make each older than the next.
        record = tmp_path / "layers" / f"tele-key{version}.json"
        os.utime(record, (1000 + version, 1000 + version))
    other = cache.layer("tele-other", "x", lambda: _one_file_layer(cache.store, 99))
    cache.prune("tele")
    remaining = sorted(p.name for p in (tmp_path / "layers").iterdir())
    assert remaining == sorted(
        [f"tele-key{v}.json" for v in range(2, KEEP_VERSIONS + 2)] + ["tele-other-x.json"]
    )
    assert not made[0].path.exists() and not made[1].path.exists()
    assert all(layer.path.exists() for layer in made[2:]) and other.layer.path.exists()
    assert cache.lookup("tele", "key0") is None and cache.lookup("tele", "key6") is not None


def _one_file_layer(store: Path, version: int) -> object:
    builder = LayerBuilder()
    builder.add_file("version", str(version).encode())
    return builder.write(store)


def test_the_image_tag_is_what_the_chart_deploys() -> None:
    import yaml

    import tele
    from tele.helm.chart import chart_dir
    from tele.image.build import default_tag

    chart = yaml.safe_load((chart_dir() / "Chart.yaml").read_text())
    values = yaml.safe_load((chart_dir() / "values.yaml").read_text())
    assert default_tag() == f"{values['image']['name']}:{chart['appVersion']}"
    assert chart["appVersion"] == tele.__version__
