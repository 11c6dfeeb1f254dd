"""The cluster side of `tele gather-logs`: which logs a client may have (the traffic manager's
pods, the traffic agents' containers, nothing else) and each one's end, read from `pods/log`
with the manager's permissions once the caller's own RBAC allows it (`get pods/log` in that
namespace, as `kubectl logs` would need)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

from tele.contracts.agentconfig import AGENT_CONTAINER
from tele.k8s import client as k8s
from tele.k8s.client import ApiError, ApiUnreachable, KubeClient
from tele.rpc import manager_api as api
from tele.rpc.errors import Code, RpcError

log = logging.getLogger(__name__)

MANAGER_SELECTOR: Final = "app=traffic-manager,telepresence=manager"
"""The chart's selector labels of the manager's pods (tm.selectorLabels)."""
MANAGER_CONTAINER: Final = "traffic-manager"
MAX_LINES: Final = 50_000
MAX_BYTES: Final = 3 * 1024 * 1024
"""The end of a log that one reply carries: under the RPC message limit (4 MiB) with room
for JSON escapes of a log's usual text."""
READ_LIMIT: Final = 16 * 1024 * 1024
"""What is read of the API server's answer at most (limitBytes) before keeping its end."""
MAX_SOURCES: Final = 500
"""Agents listed at most (a cluster with more gets the first ones and a problem saying so)."""


Require = Callable[..., Awaitable[None]]
"""Authenticator.require: RpcError PERMISSION_DENIED unless the caller may."""


class ClusterLogs:
    """LOG_SOURCES and POD_LOG for client sessions."""

    def __init__(
        self,
        *,
        kube: KubeClient,
        manager_namespace: str,
        pods: Callable[[], Iterable[Mapping[str, Any]]],
        workload_of: Callable[[Mapping[str, Any]], str],
        require: Require,
        check_session: Callable[[str], object],
    ) -> None:
        self._kube = kube
        self._manager_namespace = manager_namespace
        self._pods = pods
        self._workload_of = workload_of
        self._require = require
        self._check_session = check_session

    async def _may_read(self, namespace: str) -> str:
        """ "" when the caller may read pod logs in `namespace`, else why not."""
        try:
            await self._require("get", "pods", namespace, subresource="log")
        except RpcError as exc:
            if exc.code is not Code.PERMISSION_DENIED and exc.code is not Code.UNAUTHENTICATED:
                raise
            return exc.message
        return ""

    async def _manager_pods(self) -> list[str]:
        try:
            pods, _ = await self._kube.list(
                k8s.PODS, self._manager_namespace, label_selector=MANAGER_SELECTOR
            )
        except (ApiError, ApiUnreachable) as exc:
            log.warning("cannot list the traffic manager's pods: %s", exc)
            return []
        return sorted(str((p.get("metadata") or {}).get("name") or "") for p in pods)

    def _agent_sources(self, wanted: str) -> list[api.LogSource]:
        sources = []
        for pod in self._pods():
            meta = pod.get("metadata") or {}
            containers = (pod.get("spec") or {}).get("containers") or []
            if not any(c.get("name") == AGENT_CONTAINER for c in containers):
                continue
            name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "")
            workload = self._workload_of(pod)
            if wanted != "all" and wanted not in name and wanted not in workload:
                continue
            sources.append(
                api.LogSource(
                    kind="traffic-agent",
                    pod=name,
                    namespace=namespace,
                    container=AGENT_CONTAINER,
                    workload=workload,
                )
            )
        return sorted(sources, key=lambda s: (s.namespace, s.pod))

    async def sources(self, request: api.LogSourcesRequest) -> api.LogSources:
        self._check_session(request.session_id)
        sources: list[api.LogSource] = []
        problems: list[str] = []
        if request.traffic_manager:
            why = await self._may_read(self._manager_namespace)
            pods = await self._manager_pods() if not why else []
            if why:
                problems.append(f"The traffic manager's log is not yours to read: {why}.")
            elif not pods:
                problems.append(
                    f"No traffic manager pod found in namespace {self._manager_namespace}."
                )
            sources += [
                api.LogSource(
                    kind="traffic-manager",
                    pod=pod,
                    namespace=self._manager_namespace,
                    container=MANAGER_CONTAINER,
                    workload="traffic-manager",
                )
                for pod in pods
            ]
        if request.traffic_agents != "none":
            agents = self._agent_sources(request.traffic_agents)
            if len(agents) > MAX_SOURCES:
                problems.append(f"Only the first {MAX_SOURCES} of {len(agents)} agents' logs.")
                agents = agents[:MAX_SOURCES]
            refused: dict[str, str] = {}
            for namespace in sorted({a.namespace for a in agents}):
                if why := await self._may_read(namespace):
                    refused[namespace] = why
                    problems.append(f"The agents' logs in namespace {namespace}: {why}.")
            sources += [a for a in agents if a.namespace not in refused]
            if not agents:
                which = "" if request.traffic_agents == "all" else f" {request.traffic_agents!r}"
                problems.append(f"No traffic agent{which} to gather logs from.")
        return api.LogSources(sources=sources, problems=problems)

    def _known(self, source: api.LogSource) -> bool:
        """Only the manager's own pods and agent containers: never a log of the caller's
        choosing read with the manager's permissions."""
        if source.kind == "traffic-agent":
            return source.container == AGENT_CONTAINER and any(
                a.pod == source.pod and a.namespace == source.namespace
                for a in self._agent_sources("all")
            )
        return (
            source.kind == "traffic-manager"
            and source.container == MANAGER_CONTAINER
            and source.namespace == self._manager_namespace
        )

    async def read(self, request: api.PodLogRequest) -> api.PodLog:
        self._check_session(request.session_id)
        source = request.source
        if not self._known(source) or (
            source.kind == "traffic-manager" and source.pod not in await self._manager_pods()
        ):
            raise RpcError(
                Code.NOT_FOUND,
                f"{source.namespace}/{source.pod} is neither a traffic manager nor an agent pod",
            )
        if why := await self._may_read(source.namespace):
            raise RpcError(Code.PERMISSION_DENIED, why)
        path = k8s.PODS.path(source.namespace, source.pod, "log")
        params: dict[str, str | int] = {
            "container": source.container,
            "tailLines": MAX_LINES,
            "limitBytes": READ_LIMIT,
        }
        try:
            text = await self._kube.request("GET", path, params=params, text=True)
        except (ApiError, ApiUnreachable) as exc:
            raise RpcError(
                Code.UNAVAILABLE, f"cannot read {source.namespace}/{source.pod}'s log: {exc}"
            ) from None
        data = str(text or "").encode()
        truncated = len(data) > MAX_BYTES
        if truncated:  # the end is what explains a problem: keep it, from a line's start
            data = data[-MAX_BYTES:]
            data = data[data.find(b"\n") + 1 :]
        return api.PodLog(text=data.decode(errors="replace"), truncated=truncated)
