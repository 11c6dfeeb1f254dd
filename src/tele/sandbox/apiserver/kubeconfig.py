"""Kubeconfig documents for the sandbox: the CA inline and a bearer token per user."""

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
) -> dict[str, Any]:
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
        "users": [{"name": f"{cluster}-{user}", "user": {"token": token}}],
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
