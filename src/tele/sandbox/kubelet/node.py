"""The node side of a sandbox cluster in one service: controllers, kubelet, service proxy,
cluster DNS, the in-cluster address of the API server, and the node's API subresources."""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

import trio

from tele.sandbox.apiserver.app import ApiApp
from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.context import RequestContext
from tele.sandbox.apiserver.errors import StatusError
from tele.sandbox.apiserver.kinds import by_kind
from tele.sandbox.apiserver.rest import Api
from tele.sandbox.controllers.registry import controller_manager
from tele.sandbox.network import netns
from tele.sandbox.network.dns import serve_dns
from tele.sandbox.network.node import DNS_IP, GATEWAY
from tele.sandbox.network.proxy import serve_proxy
from tele.sandbox.network.relay import serve_relay
from tele.sandbox.oci_registry import RegistryInfo

from .handlers import NodeHandlers, attach_handler, exec_handler
from .kubelet import Kubelet
from .nodestatus import serve_node_status

log = logging.getLogger(__name__)

API_SERVICE_IP = "10.96.0.1"


async def serve_api_address(
    node_ns: str,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Make the API server reachable from pods at 10.96.0.1:443 (the `kubernetes` Service)."""
    await netns.ip_batch(node_ns, [f"addr add {API_SERVICE_IP}/32 dev lo"])
    await serve_relay(node_ns, (API_SERVICE_IP, 443), (host, port), task_status=task_status)


async def _claim_dns_service(api: Api) -> None:
    resource_type = by_kind("", "Service")
    assert resource_type is not None
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "kube-dns",
            "namespace": "kube-system",
            "labels": {"k8s-app": "kube-dns"},
        },
        "spec": {
            "clusterIP": DNS_IP,
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            ],
        },
    }
    try:
        await api.create(
            resource_type,
            "kube-system",
            body,
            RequestContext(User("system:apiserver", ("system:masters",))),
        )
    except StatusError as exc:
        if exc.code != 409:
            raise


async def serve_node(
    api: Api,
    app: ApiApp,
    cluster: str,
    state_dir: Path | None,
    *,
    api_host: str,
    api_port: int,
    backoff_base: float = 10.0,
    registry: RegistryInfo | None = None,
    task_status: trio.TaskStatus[Kubelet] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the node until cancelled; on the way out every namespace it made is deleted, and the
    state directory too when it was a temporary one (`state_dir` None)."""
    if state_dir is None:
        with tempfile.TemporaryDirectory(prefix=f"tele-sandbox-{cluster}-") as tmp:
            await serve_node(
                api,
                app,
                cluster,
                Path(tmp),
                api_host=api_host,
                api_port=api_port,
                backoff_base=backoff_base,
                registry=registry,
                task_status=task_status,
            )
        return
    kubelet = Kubelet(api, cluster, state_dir, backoff_base=backoff_base, registry=registry)
    handlers = NodeHandlers(kubelet)
    await _claim_dns_service(api)
    async with trio.open_nursery() as nursery:
        await nursery.start(kubelet.serve)
        await nursery.start(
            serve_node_status, api, kubelet.ctx, kubelet.node_name, GATEWAY, state_dir
        )
        await nursery.start(serve_proxy, api.store, kubelet.node_ns)
        await nursery.start(serve_dns, api.store, kubelet.node_ns)
        await nursery.start(serve_api_address, kubelet.node_ns, api_host, api_port)
        await nursery.start(controller_manager(api).serve)
        app.subresource_handlers[("pods", "log")] = handlers.log
        app.subresource_handlers[("pods", "portforward")] = handlers.portforward
        app.subresource_handlers[("pods", "exec")] = functools.partial(exec_handler, kubelet)
        app.subresource_handlers[("pods", "attach")] = functools.partial(attach_handler, kubelet)
        task_status.started(kubelet)
