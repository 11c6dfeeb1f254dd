"""One sandbox cluster as a trio service: CA, API server, (later) controllers and the node.

`serve_cluster` is what `tele sandbox run` and the tests start. It reports a `ClusterInfo` with
everything a client needs (address, CA, admin token, kubeconfig) once the API answers; the node
part adds its services to the same nursery.
"""

from __future__ import annotations

import functools
import inspect
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .apiserver import server
from .apiserver.app import ApiApp
from .apiserver.certs import API_SERVER_HOSTS, CertificateAuthority
from .apiserver.kubeconfig import kubeconfig
from .apiserver.rest import Api
from .apiserver.store import Store
from .oci_registry import RegistryInfo


@dataclass
class ClusterInfo:
    name: str
    host: str
    port: int
    ca: CertificateAuthority
    admin_token: str
    api: Api
    app: ApiApp
    registry: RegistryInfo | None = None
    """The sandbox's image registry (address, credentials, CA file) when it runs one; the
    kubelet pulls from it, as a mirror of docker.io for short names (`tele-sandbox/echo`)."""
    api_server: server.ApiServer | None = None
    """Serves the API on more listeners (a socket in the laptop's network namespace)."""

    @property
    def server(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def kubeconfig(self, namespace: str = "default") -> dict[str, Any]:
        return kubeconfig(
            self.name, self.server, self.ca.cert_pem, self.admin_token, namespace=namespace
        )

    def token_kubeconfig(self, token: str, user: str, namespace: str = "default") -> dict[str, Any]:
        return kubeconfig(
            self.name, self.server, self.ca.cert_pem, token, user=user, namespace=namespace
        )


async def serve_cluster(
    name: str = "sandbox",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ca: CertificateAuthority | None = None,
    admin_token: str | None = None,
    history_size: int = 10_000,
    bookmark_interval: float = 60.0,
    nodes: bool = False,
    state_dir: Path | None = None,
    node_options: dict[str, Any] | None = None,
    registry_dir: Path | None = None,
    token_file: Path | None = None,
    task_status: trio.TaskStatus[ClusterInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the cluster until cancelled; report its `ClusterInfo` when the API server listens.

    With `registry_dir`, an image registry (docker-registry, TLS from the cluster CA, basic
    auth) runs too, its storage in that directory; it starts before the node. `token_file`
    holds static bearer tokens (kube-apiserver's `--token-auth-file` format).
    """
    ca = ca or CertificateAuthority.create(f"tele-sandbox-{name}-ca")
    token = admin_token or secrets.token_urlsafe(32)
    pair = ca.issue("kube-apiserver", API_SERVER_HOSTS)
    api = Api(
        Store(history_size),
        admin_token=token,
        ca_pem=ca.cert_pem.decode(),
        token_file=token_file,
    )
    api.bootstrap()
    app = ApiApp(api, bookmark_interval=bookmark_interval)
    from .apiserver.admission import WebhookAdmission

    api.admission = WebhookAdmission(api, ca)
    async with trio.open_nursery() as nursery:
        registry: RegistryInfo | None = None
        if registry_dir is not None:
            from .oci_registry import serve_registry

            registry = await nursery.start(serve_registry, registry_dir, ca)
        api_server = server.ApiServer(app, pair, client_ca_pem=ca.cert_pem)
        bound_host, bound_port = await nursery.start(api_server.serve_tcp, host, port)
        app.server_address = f"{bound_host}:{bound_port}"
        if nodes:
            # The node runtime (controllers, kubelet, service network, DNS) needs root and
            # network namespaces; API-only users leave it off.
            from .kubelet.node import serve_node
            from .network.webhooks import ServiceRelays

            options = dict(node_options or {})
            if registry is not None and "registry" in inspect.signature(serve_node).parameters:
                options["registry"] = registry  # the kubelet pulls from it
            relays = ServiceRelays(api, f"{name}-node")
            await nursery.start(relays.serve)
            api.admission.service_resolver = relays.resolve
            await nursery.start(
                functools.partial(
                    serve_node,
                    api,
                    app,
                    name,
                    state_dir,
                    api_host=bound_host,
                    api_port=bound_port,
                    **options,
                )
            )
        task_status.started(
            ClusterInfo(name, bound_host, bound_port, ca, token, api, app, registry, api_server)
        )
