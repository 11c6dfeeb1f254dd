"""Shared fixtures: an isolated home for every test that runs tele as a user would."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import yaml

from tele import _patches
from tele.k8s.client import KubeClient, open_kube_client
from tele.sandbox.cluster import ClusterInfo, serve_cluster

_patches.apply()  # as tele's processes do: the suite runs the patched libraries

if TYPE_CHECKING:
    from tests.daemon.util import DaemonGuard

VENV_BIN = Path(sys.executable).parent


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A run ended with SIGTERM (a CI time limit, `kill`) stops as Ctrl-C does: pytest then
    tears down the fixtures that are set up, so sandboxes, namespaces and mounts are removed
    instead of left behind by a process that just died."""
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture
def tele_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a `tele` subprocess with private config, cache, state and runtime dirs."""
    env = dict(os.environ)
    # Images are content-addressed and slow to build the first time: every test shares the
    # user's image cache (before HOME and XDG_CACHE_HOME below point elsewhere).
    from tele.image.build import CACHE_ENV, cache_root

    env[CACHE_ENV] = str(cache_root())
    for name in ("config", "cache", "state", "runtime"):
        (tmp_path / name).mkdir(mode=0o700)
    env.update(
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_RUNTIME_DIR=str(tmp_path / "runtime"),
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
        # A `tele connect` that forgot --no-vif must not set up a network interface here.
        TELE_VIF="0",
    )
    yield env


@pytest.fixture
def guard(tele_env: dict[str, str]) -> Iterator[DaemonGuard]:
    """Kills, at the end, every process that runs with this test's tele_env."""
    from tests.daemon.util import DaemonGuard  # it imports this module

    guard = DaemonGuard(tele_env)
    try:
        yield guard
    finally:
        guard.kill_all()


@pytest.fixture
async def sandbox_api(nursery: trio.Nursery) -> ClusterInfo:
    """A sandbox API server (no nodes) in the test's own trio run; it keeps 50 changes of
    watch history, so that tests can outrun it and see 410 Gone."""
    info: ClusterInfo = await nursery.start(
        lambda **kw: serve_cluster("test", history_size=50, **kw)
    )
    return info


@pytest.fixture
async def kube(sandbox_api: ClusterInfo, tmp_path: Path) -> AsyncIterator[KubeClient]:
    """tele's Kubernetes client, as the sandbox's admin, through a kubeconfig file."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(sandbox_api.kubeconfig()))
    async with open_kube_client(str(path)) as client:
        yield client
