"""Optional cluster add-ons of the sandbox: manifests shipped in the package, applied on request.

`tele sandbox up --with argo-rollouts` (or `kubectl apply -f` of `manifest_path(...)`) installs
the Argo Rollouts CRD; the sandbox's Rollout controller then runs the Rollouts created.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tele.errors import ConnectionFailed
from tele.k8s.client import ApiError, Resource, open_kube_client

CRDS = Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False
)

ADDONS = {"argo-rollouts": "argo-rollouts-crd.yaml"}


def manifest_path(addon: str) -> Path:
    """The add-on's manifest file (a real path: kubectl and tests apply it)."""
    return Path(str(resources.files("tele.sandbox") / "manifests" / ADDONS[addon]))


def _objects(addon: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest_path(addon).read_text()) if doc]


async def install(kubeconfig: str, addons: list[str]) -> None:
    """Create the add-ons' CRDs in the sandbox behind `kubeconfig` (existing ones are kept)."""
    async with open_kube_client(kubeconfig) as kube:
        for addon in addons:
            for obj in _objects(addon):
                try:
                    await kube.create(CRDS, obj)
                except ApiError as exc:
                    if not exc.conflict:
                        raise ConnectionFailed(
                            f"The sandbox refused the {addon} add-on: {exc.message}"
                        ) from exc
