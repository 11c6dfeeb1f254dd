"""The private Docker Engine fixture (one per test module: starting one takes a second or
two)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.docker.dockerd import PrivateDockerd, private_dockerd


@pytest.fixture(scope="module")
def dockerd() -> Iterator[PrivateDockerd]:
    with private_dockerd() as engine:
        yield engine
