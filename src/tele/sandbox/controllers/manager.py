"""The controller manager (the sandbox's kube-controller-manager): a work queue fed by store
events, and one reconcile per key.

Each controller is a function `reconcile(manager, namespace, name)` for one kind; store listeners
map every change to the keys it affects (a pod wakes its owner, its Services and budgets). Keys
are deduplicated while queued; a reconcile that loses an optimistic-concurrency race is queued
again. Controllers write through `rest.Api` exactly as the HTTP layer does, so admission
webhooks see the pods they create.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping

import trio

from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.context import RequestContext, timestamp
from tele.sandbox.apiserver.errors import StatusError
from tele.sandbox.apiserver.events import event_object, record_event
from tele.sandbox.apiserver.kinds import ResourceType
from tele.sandbox.apiserver.rest import Api
from tele.sandbox.apiserver.store import ApiObject, Event

from .objects import ROLLOUT_RESOURCE, controller_of, selector_matches

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (controller, namespace, name)
Reconcile = Callable[["ControllerManager", str, str], Awaitable[None]]


# Kinds that own ReplicaSets, and their controllers (woken when one of their sets changes).
_REPLICASET_OWNERS = {"Deployment": "deployment", "Rollout": "rollout"}


class ControllerManager:
    def __init__(self, api: Api, controllers: Mapping[str, Reconcile]) -> None:
        self.api = api
        self.ctx = RequestContext(User("system:kube-controller-manager", ("system:masters",)))
        self.controllers = dict(controllers)
        self._queued: set[Key] = set()
        self._send, self._recv = trio.open_memory_channel[Key](math.inf)

    def enqueue(self, controller: str, namespace: str, name: str) -> None:
        key = (controller, namespace, name)
        if key not in self._queued and controller in self.controllers:
            self._queued.add(key)
            self._send.send_nowait(key)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        store = self.api.store
        unsubs = [
            store.subscribe("apps/deployments", self._on_owner("deployment")),
            # Rollouts exist only while their CRD does; the controller is idle otherwise.
            store.subscribe(ROLLOUT_RESOURCE, self._on_owner("rollout")),
            store.subscribe("apps/replicasets", self._on_replicaset),
            store.subscribe("apps/statefulsets", self._on_owner("statefulset")),
            store.subscribe("/services", self._on_service),
            store.subscribe("/pods", self._on_pod),
            store.subscribe("policy/poddisruptionbudgets", self._on_owner("disruption")),
        ]
        try:
            for resource, controller in (
                ("apps/deployments", "deployment"),
                (ROLLOUT_RESOURCE, "rollout"),
                ("apps/replicasets", "replicaset"),
                ("apps/statefulsets", "statefulset"),
                ("/services", "endpoints"),
                ("policy/poddisruptionbudgets", "disruption"),
            ):
                for obj in store.objects(resource):
                    meta = obj["metadata"]
                    self.enqueue(controller, meta["namespace"], meta["name"])
            task_status.started()
            async for key in self._recv:
                self._queued.discard(key)
                controller, namespace, name = key
                try:
                    await self.controllers[controller](self, namespace, name)
                except StatusError as exc:
                    if exc.code in (409, 404):
                        self.enqueue(controller, namespace, name)
                    else:
                        log.warning("%s %s/%s: %s", controller, namespace, name, exc.message)
                except Exception:
                    log.exception("%s %s/%s failed", controller, namespace, name)
        finally:
            for unsub in unsubs:
                unsub()

    # --- store events -> keys ------------------------------------------------------------

    def _on_owner(self, controller: str) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            meta = event.obj["metadata"]
            self.enqueue(controller, meta["namespace"], meta["name"])

        return on_event

    def _on_replicaset(self, event: Event) -> None:
        meta = event.obj["metadata"]
        self.enqueue("replicaset", meta["namespace"], meta["name"])
        ref = controller_of(event.obj)
        owner = _REPLICASET_OWNERS.get(str((ref or {}).get("kind")))
        if ref and owner:
            self.enqueue(owner, meta["namespace"], ref["name"])

    def _wake_replicaset_owner(self, namespace: str, name: str) -> None:
        rs = self.api.store.get("apps/replicasets", namespace, name)
        ref = controller_of(rs) if rs is not None else None
        owner = _REPLICASET_OWNERS.get(str((ref or {}).get("kind")))
        if ref and owner:
            self.enqueue(owner, namespace, ref["name"])

    def _on_service(self, event: Event) -> None:
        meta = event.obj["metadata"]
        self.enqueue("endpoints", meta["namespace"], meta["name"])

    def _on_pod(self, event: Event) -> None:
        pod, old = event.obj, event.old
        meta = pod["metadata"]
        ns = meta["namespace"]
        for obj in (pod, old):
            if obj is None:
                continue
            ref = controller_of(obj)
            if ref and ref.get("kind") == "ReplicaSet":
                self.enqueue("replicaset", ns, ref["name"])
                if event.type == "DELETED":
                    # A terminating pod is already out of its set's status, so its removal
                    # changes no ReplicaSet: wake the set's owner (Recreate waits for this).
                    self._wake_replicaset_owner(ns, ref["name"])
            elif ref and ref.get("kind") == "StatefulSet":
                self.enqueue("statefulset", ns, ref["name"])
        labels = [meta.get("labels") or {}]
        if old is not None:
            labels.append(old["metadata"].get("labels") or {})
        store = self.api.store
        for svc in store.objects("/services", ns):
            selector = (svc.get("spec") or {}).get("selector")
            if selector and any(all(lb.get(k) == v for k, v in selector.items()) for lb in labels):
                self.enqueue("endpoints", ns, svc["metadata"]["name"])
        for pdb in store.objects("policy/poddisruptionbudgets", ns):
            if any(selector_matches((pdb.get("spec") or {}).get("selector"), lb) for lb in labels):
                self.enqueue("disruption", ns, pdb["metadata"]["name"])

    # --- writes ----------------------------------------------------------------------------

    async def write_status(
        self, resource_type: ResourceType, obj: ApiObject, status: ApiObject
    ) -> None:
        """Store `status` on `obj` when it changed (no-op writes would wake every watcher)."""
        if obj.get("status") == status:
            return
        body = {**obj, "metadata": dict(obj["metadata"]), "status": status}
        body["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
        meta = obj["metadata"]
        await self.api.update(
            resource_type,
            meta.get("namespace", ""),
            meta["name"],
            body,
            self.ctx,
            subresource="status",
        )

    async def event(
        self, obj: ApiObject, reason: str, message: str, *, component: str, kind: str = "Normal"
    ) -> None:
        meta = obj["metadata"]
        involved = {
            "kind": obj.get("kind"),
            "apiVersion": obj.get("apiVersion"),
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        }
        event = event_object(
            involved,
            meta["namespace"],
            reason,
            message,
            event_type=kind,
            component=component,
            now=timestamp(),
        )
        await record_event(self.api, self.ctx, event)
