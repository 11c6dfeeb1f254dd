"""The private dockerd of tele.testing.dockerd for tests: a missing piece skips, saying which."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
