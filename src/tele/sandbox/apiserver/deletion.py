"""Deletion as Kubernetes does it: graceful pod deletion, finalizers, the three propagation
policies with owner-reference garbage collection, CRDs taking their objects along, and the
namespace lifecycle (Terminating until its last object is gone). No admission, no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from . import crd
from .context import timestamp
from .errors import StatusError
from .kinds import KindRegistry, ResourceType
from .service_addresses import ServiceAddresses
from .store import ApiObject, Store

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class Deletion:
    """Removes objects from one store and collects what they leave behind."""

    def __init__(
        self,
        store: Store,
        kinds: KindRegistry,
        services: ServiceAddresses,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._kinds = kinds
        self._services = services
        self._clock = clock

    def _resource_type_of(self, resource_key: str) -> ResourceType:
        found = self._kinds.by_key(resource_key)
        assert found is not None, resource_key
        return found

    @staticmethod
    def pod_needs_grace(pod: ApiObject, grace: int | None) -> bool:
        spec = pod.get("spec") or {}
        phase = (pod.get("status") or {}).get("phase")
        if grace is None:
            grace = int(spec.get("terminationGracePeriodSeconds") or 0)
        return bool(grace > 0 and spec.get("nodeName") and phase not in ("Succeeded", "Failed"))

    def delete_now(
        self,
        resource_type: ResourceType,
        live: ApiObject,
        propagation: str = "Background",
        grace: int | None = None,
    ) -> ApiObject:
        """Delete (synchronously: no admission) with the given policy; returns the object."""
        meta = live["metadata"]
        if resource_type.kind == "Namespace":
            return self._delete_namespace(live)
        if resource_type.kind == "Pod":
            spec = live.get("spec") or {}
            wanted = int(
                grace if grace is not None else spec.get("terminationGracePeriodSeconds") or 0
            )
            if self.pod_needs_grace(live, wanted):
                current = meta.get("deletionGracePeriodSeconds")
                if current is not None and current <= wanted:
                    return live
                new = copy.deepcopy(live)
                new["metadata"]["deletionTimestamp"] = timestamp(self._clock() + wanted)
                new["metadata"]["deletionGracePeriodSeconds"] = wanted
                return self._store.replace(resource_type.key, new)
        uid = meta.get("uid", "")
        if propagation == "Orphan":
            for dep_key, dep in self._store.dependents(uid):
                new = copy.deepcopy(dep)
                new["metadata"]["ownerReferences"] = [
                    r for r in new["metadata"].get("ownerReferences") or [] if r.get("uid") != uid
                ]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self._store.replace(dep_key, new)
        finalizers = list(meta.get("finalizers") or [])
        if propagation == "Foreground" and self._store.dependents(uid):
            new = copy.deepcopy(live)
            if "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
            new["metadata"]["finalizers"] = finalizers
            new["metadata"].setdefault("deletionTimestamp", timestamp(self._clock()))
            new["metadata"].setdefault("deletionGracePeriodSeconds", 0)
            self._store.replace(resource_type.key, new)
            for dep_key, dep in self._store.dependents(uid):
                self._collect(dep_key, dep, uid)
            self._finish_foreground(uid)
            return (
                self._store.get(resource_type.key, meta.get("namespace", ""), meta["name"]) or new
            )
        if finalizers:
            if meta.get("deletionTimestamp"):
                return live
            new = copy.deepcopy(live)
            new["metadata"]["deletionTimestamp"] = timestamp(self._clock())
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            return self._store.replace(resource_type.key, new)
        return self.remove(resource_type, live)

    def remove(self, resource_type: ResourceType, live: ApiObject) -> ApiObject:
        meta = live["metadata"]
        if resource_type.kind == crd.KIND:
            self._drop_custom_kinds(meta["name"])
        gone = self._store.remove(
            resource_type.key,
            meta.get("namespace", "") if resource_type.namespaced else "",
            meta["name"],
        )
        if resource_type.kind == "Service":
            self._services.release(live)
        uid = meta.get("uid", "")
        for dep_key, dep in self._store.dependents(uid):
            self._collect(dep_key, dep, uid)
        for ref in meta.get("ownerReferences") or []:
            self._finish_foreground(ref.get("uid", ""))
        ns = meta.get("namespace")
        if ns and resource_type.namespaced:
            self._finish_namespace(ns)
        return gone

    def _drop_custom_kinds(self, crd_name: str) -> None:
        """A CRD goes: its objects go first (finalizers are not waited for), then its kinds."""
        kinds = self._kinds.of_crd(crd_name)
        for key in {resource_type.key for resource_type in kinds}:
            for obj in self._store.objects(key):
                meta = obj["metadata"]
                if self._store.get(key, meta.get("namespace", ""), meta["name"]) is obj:
                    self.remove(kinds[0], obj)
        self._kinds.withdraw(crd_name)

    def _collect(self, dep_key: str, dep: ApiObject, owner_uid: str) -> None:
        """Garbage-collect a dependent of a deleted owner: delete it, or drop the dead reference."""
        refs = dep["metadata"].get("ownerReferences") or []
        alive = [
            r for r in refs if r.get("uid") != owner_uid and self._owner_alive(r.get("uid", ""))
        ]
        if alive:
            new = copy.deepcopy(dep)
            new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
            self._store.replace(dep_key, new)
            return
        if dep["metadata"].get("deletionTimestamp") and dep_key != "/pods":
            return
        self.delete_now(self._resource_type_of(dep_key), dep, "Background", None)

    def _owner_alive(self, uid: str) -> bool:
        found = self._store.by_uid(uid)
        return found is not None and not found[1]["metadata"].get("deletionTimestamp")

    def _finish_foreground(self, uid: str) -> None:
        found = self._store.by_uid(uid)
        if found is None:
            return
        key, owner = found
        meta = owner["metadata"]
        if "foregroundDeletion" not in (meta.get("finalizers") or []) or self._store.dependents(
            uid
        ):
            return
        new = copy.deepcopy(owner)
        new["metadata"]["finalizers"] = [f for f in meta["finalizers"] if f != "foregroundDeletion"]
        if new["metadata"]["finalizers"]:
            self._store.replace(key, new)
        else:
            del new["metadata"]["finalizers"]
            self.remove(self._resource_type_of(key), self._store.replace(key, new))

    def _delete_namespace(self, live: ApiObject) -> ApiObject:
        name = live["metadata"]["name"]
        if name in SYSTEM_NAMESPACES:
            raise StatusError(
                403,
                "Forbidden",
                f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                details={"name": name, "kind": "namespaces"},
            )
        if not live["metadata"].get("deletionTimestamp"):
            new = copy.deepcopy(live)
            new["metadata"]["deletionTimestamp"] = timestamp(self._clock())
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new.setdefault("status", {})["phase"] = "Terminating"
            live = self._store.replace("/namespaces", new)
        for resource_type in self._kinds.all():
            if resource_type.namespaced:
                for obj in self._store.objects(resource_type.key, name):
                    if self._store.get(resource_type.key, name, obj["metadata"]["name"]) is obj:
                        self.delete_now(resource_type, obj, "Background", None)
        self._finish_namespace(name)
        return self._store.get("/namespaces", "", name) or live

    def _finish_namespace(self, namespace: str) -> None:
        ns = self._store.get("/namespaces", "", namespace)
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        for resource_type in self._kinds.all():
            if resource_type.namespaced and self._store.objects(resource_type.key, namespace):
                return
        self._store.remove("/namespaces", "", namespace)
