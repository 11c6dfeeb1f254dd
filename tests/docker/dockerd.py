"""The private dockerd of tele.testing.dockerd for tests: a missing piece skips, saying which."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tele.testing import dockerd as _dockerd
from tele.testing.dockerd import PrivateDockerd

__all__ = ["PrivateDockerd", "busybox_image", "private_dockerd"]


@contextmanager
def private_dockerd() -> Iterator[PrivateDockerd]:
    try:
        context = _dockerd.private_dockerd()
        engine = context.__enter__()
    except _dockerd.Missing as exc:
        pytest.skip(str(exc))
    try:
        yield engine
    except BaseException as exc:
        if not context.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        context.__exit__(None, None, None)


def busybox_image(engine: PrivateDockerd, tag: str = "tele-test/busybox:1") -> str:
    try:
        return _dockerd.busybox_image(engine, tag)
    except _dockerd.Missing as exc:
        pytest.skip(str(exc))


def mounts_under(directory: Path) -> list[str]:
    """The mount points at or under `directory` in this process's mount table."""
    root = str(directory)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4]
        if point == root or point.startswith(f"{root}/"):
            found.append(point)
    return found


@contextmanager
def shared_mount(directory: Path) -> Iterator[Path]:
    """`directory` made a shared mount of its own (a bind on itself), as every mount is on a
    systemd machine (here / is private): Docker passes a container's mounts on to this
    machine only from a shared mount. Unmounted at the end with whatever is still under it."""
    import subprocess

    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(directory)], check=True)
        yield directory
    finally:
        for point in sorted(mounts_under(directory), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
