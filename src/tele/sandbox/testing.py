"""Run a sandbox cluster on a background thread, for blocking clients (kubectl, the official
Python client) in tests and benchmarks. The thread owns its own trio loop; `stop()` cancels it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
import yaml

from .cluster import ClusterInfo, serve_cluster


class ThreadedCluster:
    def __init__(self, **options: Any) -> None:
        self._options = options
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self.info: ClusterInfo | None = None
        self._thread = threading.Thread(target=self._run, name="sandbox-cluster", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the starter, not lost in the thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                self.info = await nursery.start(lambda **kw: serve_cluster(**self._options, **kw))
                self._ready.set()

    def start(self, timeout: float = 20.0) -> ClusterInfo:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the sandbox cluster did not start in time")
        if self._error is not None:
            raise RuntimeError("the sandbox cluster failed to start") from self._error
        assert self.info is not None
        return self.info

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a sync function on the cluster's trio thread (store access without races)."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def stop(self, timeout: float = 10.0) -> None:
        if self._token is not None and self._scope is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)


@contextmanager
def threaded_cluster(
    kubeconfig_path: Path | None = None, **options: Any
) -> Iterator[ThreadedCluster]:
    cluster = ThreadedCluster(**options)
    try:
        info = cluster.start()
        if kubeconfig_path is not None:
            kubeconfig_path.write_text(yaml.safe_dump(info.kubeconfig()))
            kubeconfig_path.chmod(0o600)
        yield cluster
    finally:
        cluster.stop()
