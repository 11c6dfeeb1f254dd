"""How the API server, in the host namespace, calls a webhook behind a Service.

Admission webhooks name a Service (`clientConfig.service`); its pods are reachable only from
the node namespace. For each Service port the API server calls, a loopback listener in the
host namespace splices every connection into the node namespace, to a ready endpoint of the
Service (as kube-apiserver routes webhook calls to endpoints). No route or address is added to
the host.
"""

from __future__ import annotations

import logging

import trio

from ..apiserver.kinds import by_kind
from ..apiserver.rest import Api
from . import netns
from .errors import NodeError
from .relay import splice

log = logging.getLogger(__name__)


class ServiceRelays:
    """`resolve` is the admission plugin's ServiceResolver; run `serve` in the cluster nursery."""

    def __init__(self, api: Api, node_netns: str) -> None:
        self.api = api
        self.node_netns = node_netns
        self._relays: dict[tuple[str, int], int] = {}  # (namespace/name, port) -> local port
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def resolve(self, namespace: str, name: str, port: int) -> tuple[str, int]:
        """The loopback (host, port) that reaches Service `name`'s `port`."""
        key = (f"{namespace}/{name}", port)
        if key not in self._relays:
            assert self._nursery is not None
            self._relays[key] = await self._nursery.start(self._relay, namespace, name, port)
        return "127.0.0.1", self._relays[key]

    def _endpoint(self, namespace: str, name: str, port: int) -> tuple[str, int]:
        """A ready pod address and port behind the Service's `port`, looked up per connection."""
        service_resource, endpoints_resource = by_kind("", "Service"), by_kind("", "Endpoints")
        assert service_resource is not None and endpoints_resource is not None
        service = self.api.store.get(service_resource.key, namespace, name) or {}
        ports = (service.get("spec") or {}).get("ports") or []
        wanted = next((p for p in ports if int(p.get("port", 0)) == port), None)
        if wanted is None:
            raise OSError(f'service "{name}" in namespace {namespace} has no port {port}')
        endpoints = self.api.store.get(endpoints_resource.key, namespace, name) or {}
        for subset in endpoints.get("subsets") or []:
            addresses = subset.get("addresses") or []
            target = next(
                (
                    p
                    for p in subset.get("ports") or []
                    if p.get("name", "") == wanted.get("name", "")
                ),
                None,
            )
            if addresses and target is not None:
                return str(addresses[0]["ip"]), int(target["port"])
        raise OSError(f'service "{name}" in namespace {namespace} has no ready endpoint')

    async def _relay(
        self,
        namespace: str,
        name: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def relay(stream: trio.SocketStream) -> None:
            async with stream:
                try:
                    host, target = self._endpoint(namespace, name, port)
                    upstream = await netns.connect_in(self.node_netns, host, target)
                except (OSError, NodeError) as exc:
                    log.info("webhook relay to %s/%s:%d: %s", namespace, name, port, exc)
                    return
                async with upstream:
                    await splice(stream, upstream)

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(relay, listeners)
