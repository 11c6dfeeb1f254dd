"""Fixtures the e2e modules share."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def mount_dir(tmp_path: Path) -> Iterator[Path]:
    """The --mount directory; whatever is still mounted under tmp_path at the end is unmounted
    (the test fails on it after that), also when the test failed first."""
    where = tmp_path / "mnt"
    yield where
    left = [
        line.split(" ")[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split(" ")[4].startswith(str(tmp_path))
    ]
    for path in left:
        subprocess.run(["umount", "-l", path], check=False)
    assert not left, f"mounts left behind: {left}"
