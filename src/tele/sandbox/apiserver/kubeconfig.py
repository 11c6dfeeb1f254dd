"""Kubeconfig documents for the sandbox: the CA inline and one user's credentials (a bearer
token, or a client certificate and its key)."""

from __future__ import annotations

import base64
from typing import Any

import yaml


def kubeconfig(
    name: str,
    server: str,
    ca_pem: bytes,
    token: str,
    *,
    user: str = "admin",
    namespace: str = "default",
    credentials: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A kubeconfig for `user`: `credentials` (kubeconfig user fields) or else the `token`."""
    cluster = f"tele-sandbox-{name}"
    context = cluster if user == "admin" else f"{cluster}-{user}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": f"{cluster}-{user}", "user": credentials or {"token": token}}],
        "contexts": [
            {
                "name": context,
                "context": {
                    "cluster": cluster,
                    "user": f"{cluster}-{user}",
                    "namespace": namespace,
                },
            }
        ],
        "current-context": context,
        "preferences": {},
    }


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
