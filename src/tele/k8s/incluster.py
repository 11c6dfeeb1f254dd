"""In-cluster credentials: how the manager and agents reach the API server from their pods.

The service account token is re-read on every use: projected tokens are rotated by the kubelet.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from tele.k8s.config import ClusterConnection
from tele.k8s.errors import KubeconfigError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def in_cluster_connection(account_dir: Path = SERVICE_ACCOUNT_DIR) -> ClusterConnection:
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeconfigError("not running in a pod: KUBERNETES_SERVICE_HOST is not set")
    token_file = account_dir / "token"

    def make_ssl_context() -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(account_dir / "ca.crt"))

    try:
        context = make_ssl_context()
        namespace = (account_dir / "namespace").read_text().strip() or "default"
    except OSError as exc:
        raise KubeconfigError(f"cannot read the pod's service account: {exc}") from exc

    def authorization() -> str | None:
        try:
            return "Bearer " + token_file.read_text().strip()
        except OSError as exc:
            raise KubeconfigError(f"cannot read the service account token: {exc}") from exc

    server_host = f"[{host}]" if ":" in host else host
    return ClusterConnection(
        server=f"https://{server_host}:{port}",
        context="in-cluster",
        namespace=namespace,
        ssl_context=context,
        _authorization=authorization,
        _ssl_factory=make_ssl_context,
    )
