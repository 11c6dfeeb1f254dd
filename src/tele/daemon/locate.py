"""Locating the traffic manager: a ready manager pod (waiting for one to become ready, saying
why not), and the transport to it — a port-forward to that pod, or TCP to a given address."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager

import trio

from tele.errors import ConnectionFailed, UserError
from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient
from tele.k8s.objects import pod_is_ready
from tele.k8s.portforward import open_portforward
from tele.rpc import manager_api as mapi

log = logging.getLogger(__name__)

MANAGER_SELECTOR = "app=traffic-manager"


class NoManager(UserError):
    """No traffic manager is installed (or none is ready) in the manager namespace."""


class ManagerLocator:
    """Finds the manager in `namespace` of `kube`'s cluster, or uses `address` (HOST:PORT)."""

    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        *,
        address: str = "",
        wait: float = 0.0,
        cluster_timeout: float = 20.0,
    ) -> None:
        self._kube = kube
        self._cluster_timeout = cluster_timeout
        """How long the Kubernetes API server may take to answer the first question."""
        self.namespace = namespace
        self._address = address
        self._wait = wait
        self.manager_pod = ""
        """The pod (or address) of the last transport opened."""
        self.api_port = mapi.DEFAULT_PORT
        """The found pod's `api` container port (Helm `apiPort`)."""

    @property
    def by_address(self) -> bool:
        return bool(self._address)

    async def find_manager_pod(self, wait: float = 0.0) -> str:
        """A ready manager pod's name, waiting up to `wait` seconds for one to become ready
        (following the pods with a watch). NoManager when none is installed; after the wait, a
        ConnectionFailed naming each pod and what it is doing."""
        try:
            with trio.move_on_after(self._cluster_timeout) as asking:
                pods, version = await self._kube.list(
                    k8s.PODS, self.namespace, label_selector=MANAGER_SELECTOR
                )
            if asking.cancelled_caught:
                raise ConnectionFailed(
                    f"The Kubernetes API server {self._kube.connection.server} did not answer "
                    f"within {self._cluster_timeout:g}s (config timeouts.clusterConnect)."
                )
        except ApiError as exc:
            if exc.not_found:
                raise self._no_manager() from None
            raise
        current = {p["metadata"]["name"]: p for p in pods}
        if not current and not await self._manager_deployed():
            raise self._no_manager()
        with trio.move_on_after(wait):
            while True:
                ready = [p for p in current.values() if pod_is_ready(p)]
                if ready:
                    newest = max(
                        ready, key=lambda p: str(p["metadata"].get("creationTimestamp", ""))
                    )
                    self.api_port = api_port(newest)
                    return str(newest["metadata"]["name"])
                if wait <= 0:
                    break
                log.info("waiting for the traffic manager: %s", _describe(current.values()))
                watch = self._kube.watch(
                    k8s.PODS,
                    self.namespace,
                    resource_version=version,
                    label_selector=MANAGER_SELECTOR,
                )
                async with aclosing(watch) as events:
                    async for event in events:
                        version = str(event.object["metadata"].get("resourceVersion") or version)
                        if event.type == "DELETED":
                            current.pop(event.name, None)
                        elif event.type != "BOOKMARK":
                            current[event.name] = event.object
                        if any(pod_is_ready(p) for p in current.values()):
                            break
        raise ConnectionFailed(
            f"The traffic manager in namespace {self.namespace} is not ready"
            f"{f' after {wait:g}s' if wait > 0 else ''}: "
            f"{_describe(current.values()) or 'no pod'}."
        )

    async def _manager_deployed(self) -> bool:
        found = await self._kube.get_or_none(k8s.DEPLOYMENTS, "traffic-manager", self.namespace)
        return found is not None

    def _no_manager(self) -> NoManager:
        return NoManager(
            f"No traffic manager is installed in namespace {self.namespace} of "
            f"{self._kube.connection.context}; install one with `tele helm install`."
        )

    def open_transport(self) -> AbstractAsyncContextManager[trio.abc.Stream]:
        """A new transport to the manager (a `LinkPool`'s opener)."""
        return self._transport()

    @asynccontextmanager
    async def _transport(self) -> AsyncIterator[trio.abc.Stream]:
        if self._address:
            host, _, port = self._address.rpartition(":")
            tcp = await trio.open_tcp_stream(host or "127.0.0.1", int(port))
            self.manager_pod = self._address
            async with tcp:
                yield tcp
            return
        pod = await self.find_manager_pod(wait=self._wait)
        self.manager_pod = pod
        async with open_portforward(
            self._kube.connection, self.namespace, pod, self.api_port
        ) as stream:
            yield stream


def api_port(pod: k8s.Obj) -> int:
    """The manager pod's container port named `api` (Helm `apiPort`); the default if unnamed."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "api" and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return mapi.DEFAULT_PORT


def _describe(pods: Iterable[k8s.Obj]) -> str:
    """ "name (phase, reason)" for each pod: what a person needs to see why it is not ready."""
    parts = []
    for pod in pods:
        status = pod.get("status") or {}
        reasons = [
            str((cs.get("state") or {}).get("waiting", {}).get("reason") or "")
            for cs in status.get("containerStatuses") or []
        ]
        detail = ", ".join([str(status.get("phase") or "Pending"), *[r for r in reasons if r]])
        parts.append(f"{pod['metadata']['name']} ({detail})")
    return "; ".join(parts)
