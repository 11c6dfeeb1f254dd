"""Release records: what one `tele helm install` owns, kept in the cluster.

A record is a Secret `tele-release-<name>` in the release namespace (a Secret because values may
hold credentials). It carries the revision, the user-supplied values, the namespace scope and the
list of objects applied, so that upgrade prunes what is no longer rendered, uninstall deletes
exactly what it owns, and every install can see every other manager's scope for conflict checks.
"""

from __future__ import annotations

import base64
import datetime
from typing import Any, Literal

import msgspec

from tele.k8s import client as k8s
from tele.k8s.client import KubeClient

Obj = dict[str, Any]

RECORD_PREFIX = "tele-release-"
RECORD_TYPE = "tele.io/release.v1"
MANAGED_BY = "app.kubernetes.io/managed-by"
RELEASE_LABEL = "tele.io/release"
RECORD_SELECTOR = f"{MANAGED_BY}=tele,{RELEASE_LABEL}"

Status = Literal["pending-install", "pending-upgrade", "deployed", "uninstalling"]


class ObjectRef(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One applied object, enough to find and delete it again."""

    api_version: str
    kind: str
    name: str
    namespace: str = ""

    @classmethod
    def of(cls, obj: Obj) -> ObjectRef:
        meta = obj.get("metadata") or {}
        return cls(
            str(obj["apiVersion"]),
            str(obj["kind"]),
            str(meta["name"]),
            str(meta.get("namespace") or ""),
        )

    def describe(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"


class ReleaseRecord(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    namespace: str
    revision: int
    status: Status
    chart_version: str
    app_version: str
    values: Obj  # user-supplied, as given (what --reuse-values reuses)
    scope: Obj  # the merged `namespaces` and `namespaceSelector`
    objects: list[ObjectRef]
    # The manifests last applied in full, for the fields an upgrade must remove (ops.py).
    manifests: list[Obj] = msgspec.field(default_factory=list)
    updated: str = ""

    @property
    def record_name(self) -> str:
        return record_name(self.name)


def record_name(release: str) -> str:
    return RECORD_PREFIX + release


def scope_of(merged_values: Obj) -> Obj:
    return {
        "namespaces": list(merged_values.get("namespaces") or []),
        "namespaceSelector": dict(merged_values.get("namespaceSelector") or {}),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _to_secret(record: ReleaseRecord) -> Obj:
    payload = base64.b64encode(msgspec.json.encode(record)).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": RECORD_TYPE,
        "metadata": {
            "name": record.record_name,
            "namespace": record.namespace,
            "labels": {
                MANAGED_BY: "tele",
                RELEASE_LABEL: record.name,
                "tele.io/revision": str(record.revision),
                "tele.io/status": record.status,
            },
        },
        "data": {"release": payload},
    }


def _from_secret(secret: Obj) -> ReleaseRecord | None:
    try:
        raw = base64.b64decode((secret.get("data") or {})["release"])
        return msgspec.json.decode(raw, type=ReleaseRecord)
    except (KeyError, ValueError, msgspec.DecodeError):
        return None  # not ours or damaged: never let it block other releases


async def read(kube: KubeClient, release: str, namespace: str) -> ReleaseRecord | None:
    secret = await kube.get_or_none(k8s.SECRETS, record_name(release), namespace)
    return None if secret is None else _from_secret(secret)


async def write(kube: KubeClient, record: ReleaseRecord) -> None:
    record.updated = _now()
    await kube.patch(
        k8s.SECRETS,
        record.record_name,
        _to_secret(record),
        record.namespace,
        patch_type="apply",
        field_manager="tele-helm",
        force=True,
    )


async def delete(kube: KubeClient, record: ReleaseRecord) -> None:
    await kube.delete(k8s.SECRETS, record.record_name, record.namespace)


async def list_all(kube: KubeClient) -> list[ReleaseRecord]:
    """Every tele release record in the cluster, whichever namespace holds it."""
    secrets, _ = await kube.list(k8s.SECRETS, label_selector=RECORD_SELECTOR)
    records = [_from_secret(s) for s in secrets if s.get("type") == RECORD_TYPE]
    return [r for r in records if r is not None]
