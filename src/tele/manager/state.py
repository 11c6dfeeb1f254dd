"""What the manager must not forget when its pod is replaced: the workloads that get an agent.

A client's engagement makes a workload's pods get a traffic agent (the webhook injects it into
every new pod). That set lives in memory for speed and is mirrored, after each change, into a
ConfigMap in the manager's namespace (`traffic-manager-state`, key `agent-workloads`, a JSON
list of [kind, namespace, name]), which a new manager pod reads before its webhook answers.
Without it, a restarted manager would let the next pod of an engaged workload start without the
agent, and the clients that engage again after re-arriving would have to wait for a new roll.

Engagements themselves are not kept: they belong to client sessions, which a new manager does
not know; the clients re-arrive and engage again (tele.daemon.session).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import trio

from tele.contracts.names import STATE_CONFIGMAP
from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient

log = logging.getLogger(__name__)

KEY = "agent-workloads"
RETRY_SECONDS = 2.0

WorkloadKey = tuple[str, str, str]
"""(kind, namespace, name)"""


class AgentWorkloads:
    """A set of workload keys, saved to the state ConfigMap by `keep_saved` after each change."""

    def __init__(self, kube: KubeClient | None, namespace: str) -> None:
        self._kube = kube
        self._namespace = namespace
        self._keys: set[WorkloadKey] = set()
        self._changed = trio.Event()
        self.version = 0
        """How many changes were made."""
        self.saved_version = 0
        """How many changes have reached the ConfigMap."""

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[WorkloadKey]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: WorkloadKey) -> None:
        if key not in self._keys:
            self._keys.add(key)
            self._mark()

    def discard(self, key: WorkloadKey) -> None:
        if key in self._keys:
            self._keys.discard(key)
            self._mark()

    def _mark(self) -> None:
        self.version += 1
        self._changed.set()

    async def load(self) -> None:
        """Read the saved set (a missing ConfigMap is an empty one; an unreadable one is logged
        and the manager goes on with what it has)."""
        if self._kube is None:
            return
        try:
            found = await self._kube.get_or_none(k8s.CONFIGMAPS, STATE_CONFIGMAP, self._namespace)
        except ApiError as exc:
            log.warning("cannot read the manager's state (%s): %s", STATE_CONFIGMAP, exc.message)
            return
        if found is None:
            return
        try:
            entries = json.loads((found.get("data") or {}).get(KEY) or "[]")
            loaded = {(str(k), str(ns), str(n)) for k, ns, n in entries}
        except (ValueError, TypeError) as exc:
            log.warning("ignoring the unreadable %s in %s: %s", KEY, STATE_CONFIGMAP, exc)
            return
        self._keys |= loaded
        if loaded:
            log.info(
                "agents stay enabled for %s",
                ", ".join(f"{k} {ns}/{n}" for k, ns, n in sorted(loaded)),
            )

    async def keep_saved(self) -> None:
        """Write each change to the ConfigMap, forever; failures are retried."""
        if self._kube is None:
            return
        while True:
            if self.saved_version == self.version:
                self._changed = trio.Event()
                await self._changed.wait()
            version = self.version
            try:
                await self._save()
            except (ApiError, OSError) as exc:
                message = exc.message if isinstance(exc, ApiError) else str(exc)
                log.warning("cannot save the manager's state (%s): %s", STATE_CONFIGMAP, message)
                await trio.sleep(RETRY_SECONDS)
                continue
            self.saved_version = version

    async def _save(self) -> None:
        assert self._kube is not None
        data = {KEY: json.dumps([list(k) for k in sorted(self._keys)])}
        try:
            await self._kube.patch(k8s.CONFIGMAPS, STATE_CONFIGMAP, {"data": data}, self._namespace)
        except ApiError as exc:
            if exc.code != 404:
                raise
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": STATE_CONFIGMAP,
                    "namespace": self._namespace,
                    "labels": {"app.kubernetes.io/managed-by": "traffic-manager"},
                },
                "data": data,
            }
            await self._kube.create(k8s.CONFIGMAPS, body, self._namespace)
