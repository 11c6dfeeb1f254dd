"""Deployment controller: one ReplicaSet per pod template (named by pod-template-hash), rolled
with RollingUpdate (maxSurge/maxUnavailable) or Recreate; revisions in annotations; the status
and conditions `kubectl rollout status` reads.

The rolling itself (`roll`) serves every kind that owns ReplicaSets the Deployment way; an
`Owner` says whose labels and annotations it writes (the Rollout controller uses it too).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

from tele.sandbox.apiserver import defaults
from tele.sandbox.apiserver.context import timestamp
from tele.sandbox.apiserver.store import ApiObject

from .manager import ControllerManager
from .objects import controller_of, resource_of_kind
from .replicaset import is_active, owned_pods

DEPLOY = resource_of_kind("apps", "Deployment")
RS = resource_of_kind("apps", "ReplicaSet")
HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
_SAFE = "bcdfghjklmnpqrstvwxz2456789"


@dataclass(frozen=True)
class Owner:
    """A kind that owns ReplicaSets per pod template, and the names it marks them with."""

    kind: str
    api_version: str
    component: str
    """The controller's name in Events."""
    hash_label: str = HASH_LABEL
    revision: str = REVISION
    desired_replicas: str = "deployment.kubernetes.io/desired-replicas"
    max_replicas: str = "deployment.kubernetes.io/max-replicas"
    stored_as_sent: bool = False
    """The API server does not default the owner's template (a custom kind): the controller
    does, so that it compares equal to the ReplicaSets' (defaulted) templates."""


def pod_template(owner: Owner, d: ApiObject) -> ApiObject:
    """The owner's pod template as its ReplicaSets hold it (without their hash label)."""
    template: ApiObject = (d.get("spec") or {}).get("template") or {}
    if owner.stored_as_sent:
        template = copy.deepcopy(template)
        defaults.pod_template(template)
    return template


DEPLOYMENT = Owner("Deployment", "apps/v1", "deployment-controller")


@dataclass(frozen=True)
class Strategy:
    """How to replace pods: surge and unavailability bounds (absolute), or all at once."""

    surge: int
    unavailable: int
    recreate: bool = False


def template_hash(template: ApiObject, collisions: int = 0) -> str:
    """FNV-1a over the canonical template, encoded with Kubernetes' SafeEncodeString alphabet."""
    data = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    if collisions:
        data += str(collisions).encode()
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(_SAFE[ord(c) % len(_SAFE)] for c in str(h))


def _strip_hash(template: ApiObject, label: str = HASH_LABEL) -> ApiObject:
    t = copy.deepcopy(template)
    (t.get("metadata") or {}).get("labels", {}).pop(label, None)
    return t


def resolve(value: object, total: int, round_up: bool) -> int:
    """An int-or-percent bound (maxSurge, maxUnavailable) of `total`."""
    if isinstance(value, str) and value.endswith("%"):
        exact = int(value[:-1]) * total / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(str(value or 0))


def _revision(rs: ApiObject, owner: Owner = DEPLOYMENT) -> int:
    try:
        return int((rs["metadata"].get("annotations") or {}).get(owner.revision, "0"))
    except ValueError:
        return 0


async def _scale(
    manager: ControllerManager,
    owner: Owner,
    d: ApiObject,
    rs: ApiObject,
    replicas: int,
    revision: int | None = None,
) -> ApiObject:
    current = int((rs.get("spec") or {}).get("replicas", 0))
    annotations = dict(rs["metadata"].get("annotations") or {})
    wanted = dict(annotations)
    wanted[owner.desired_replicas] = str(d["spec"].get("replicas", 1))
    if revision is not None:
        wanted[owner.revision] = str(revision)
    if current == replicas and wanted == annotations:
        return rs
    body = copy.deepcopy(rs)
    body["spec"]["replicas"] = replicas
    body["metadata"]["annotations"] = wanted
    meta = rs["metadata"]
    stored = await manager.api.update(RS, meta["namespace"], meta["name"], body, manager.ctx)
    if current != replicas:
        verb = "up" if replicas > current else "down"
        await manager.event(
            d,
            "ScalingReplicaSet",
            f"Scaled {verb} replica set {meta['name']} from {current} to {replicas}",
            component=owner.component,
        )
    return stored


def replica_sets(
    manager: ControllerManager, owner: Owner, d: ApiObject
) -> tuple[list[ApiObject], ApiObject | None]:
    """The ReplicaSets `d` controls, and the one of its current template (if made yet)."""
    uid = d["metadata"]["uid"]
    sets = [
        obj
        for _, obj in manager.api.store.dependents(uid)
        if obj.get("kind") == "ReplicaSet" and (controller_of(obj) or {}).get("uid") == uid
    ]
    template = pod_template(owner, d)
    new = next(
        (
            rs
            for rs in sets
            if _strip_hash(rs["spec"].get("template") or {}, owner.hash_label) == template
        ),
        None,
    )
    return sets, new


async def reconcile(manager: ControllerManager, namespace: str, name: str) -> None:
    d = manager.api.store.get(DEPLOY.key, namespace, name)
    if d is None or d["metadata"].get("deletionTimestamp"):
        return
    spec = d.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    strategy = spec.get("strategy") or {}
    rolling = strategy.get("rollingUpdate") or {}
    surge = resolve(rolling.get("maxSurge", "25%"), replicas, True)
    unavailable = resolve(rolling.get("maxUnavailable", "25%"), replicas, False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    await roll(
        manager, DEPLOYMENT, d, Strategy(surge, unavailable, strategy.get("type") == "Recreate")
    )
    await _status(manager, namespace, name, unavailable)


async def roll(manager: ControllerManager, owner: Owner, d: ApiObject, strategy: Strategy) -> None:
    """Bring `d`'s ReplicaSets one step closer to its template and replica count."""
    meta = d["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    spec = d.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    template = pod_template(owner, d)
    sets, new = replica_sets(manager, owner, d)
    old = [rs for rs in sets if rs is not new]
    max_rev = max((_revision(rs, owner) for rs in sets), default=0)
    surge, unavailable, recreate = strategy.surge, strategy.unavailable, strategy.recreate
    if not spec.get("paused"):
        if new is None:
            pod_hash = template_hash(template)
            new_template = copy.deepcopy(template)
            labels = new_template.setdefault("metadata", {}).setdefault("labels", {})
            labels[owner.hash_label] = pod_hash
            selector = copy.deepcopy(spec.get("selector") or {})
            selector.setdefault("matchLabels", {})[owner.hash_label] = pod_hash
            if recreate:
                start = 0 if any(rs["spec"].get("replicas") for rs in old) else replicas
            else:
                total = sum(int(rs["spec"].get("replicas", 0)) for rs in old)
                start = max(0, min(replicas, replicas + surge - total))
            body = {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": f"{name}-{pod_hash}",
                    "namespace": namespace,
                    "labels": dict(new_template["metadata"]["labels"]),
                    "annotations": {
                        owner.revision: str(max_rev + 1),
                        owner.desired_replicas: str(replicas),
                        owner.max_replicas: str(replicas + surge),
                    },
                    "ownerReferences": [
                        {
                            "apiVersion": owner.api_version,
                            "kind": owner.kind,
                            "name": name,
                            "uid": uid,
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": {
                    "replicas": start,
                    "minReadySeconds": spec.get("minReadySeconds", 0),
                    "selector": selector,
                    "template": new_template,
                },
            }
            new = await manager.api.create(RS, namespace, body, manager.ctx)
            await manager.event(
                d,
                "ScalingReplicaSet",
                f"Scaled up replica set {name}-{pod_hash} from 0 to {start}",
                component=owner.component,
            )
        elif _revision(new, owner) < max_rev:
            new = await _scale(
                manager, owner, d, new, int(new["spec"].get("replicas", 0)), max_rev + 1
            )
        new_replicas = int(new["spec"].get("replicas", 0))
        if recreate:
            for rs in old:
                if rs["spec"].get("replicas"):
                    await _scale(manager, owner, d, rs, 0)
            old_pods = [
                p for rs in old for p in owned_pods(manager, namespace, rs["metadata"]["uid"])
            ]
            if not any(is_active(p) or p["metadata"].get("deletionTimestamp") for p in old_pods):
                new = await _scale(manager, owner, d, new, replicas)
        else:
            total = sum(int(rs["spec"].get("replicas", 0)) for rs in [new, *old])
            # Pods an old set still has (its controller has not caught up with a scale-down
            # yet) count too, so that the surge bound holds for pods, not only for specs.
            pods = sum(
                1
                for rs in [new, *old]
                for p in owned_pods(manager, namespace, rs["metadata"]["uid"])
                if is_active(p)
            )
            total = max(total, pods)
            if new_replicas < replicas:
                allowed = replicas + surge - total
                if allowed > 0:
                    new = await _scale(
                        manager, owner, d, new, min(replicas, new_replicas + allowed)
                    )
            elif new_replicas > replicas:
                new = await _scale(manager, owner, d, new, replicas)
            # Scale old sets down as far as availability allows.
            everything = [new, *old]
            all_count = sum(int(rs["spec"].get("replicas", 0)) for rs in everything)
            min_available = replicas - unavailable
            new_unavailable = int(new["spec"].get("replicas", 0)) - int(
                (new.get("status") or {}).get("availableReplicas", 0)
            )
            available = sum(
                int((rs.get("status") or {}).get("availableReplicas", 0)) for rs in everything
            )
            budget = min(all_count - min_available - new_unavailable, available - min_available)
            # Old replicas that are not available cost nothing to remove.
            for rs in sorted(old, key=lambda rs: _revision(rs, owner)):
                count = int(rs["spec"].get("replicas", 0))
                unhealthy = count - int((rs.get("status") or {}).get("availableReplicas", 0))
                take = min(count, max(0, unhealthy) + max(0, budget))
                if take > 0:
                    budget -= max(0, take - max(0, unhealthy))
                    await _scale(manager, owner, d, rs, count - take)
        await _cleanup_history(manager, owner, spec, old)


async def _cleanup_history(
    manager: ControllerManager, owner: Owner, spec: ApiObject, old: list[ApiObject]
) -> None:
    limit = int(spec.get("revisionHistoryLimit", 10))
    idle = [
        rs
        for rs in sorted(old, key=lambda rs: _revision(rs, owner))
        if not rs["spec"].get("replicas") and not (rs.get("status") or {}).get("replicas")
    ]
    for rs in idle[: max(0, len(idle) - limit)]:
        meta = rs["metadata"]
        await manager.api.delete(RS, meta["namespace"], meta["name"], {}, manager.ctx)


async def _status(
    manager: ControllerManager, namespace: str, name: str, max_unavailable: int
) -> None:
    store = manager.api.store
    d = store.get(DEPLOY.key, namespace, name)
    if d is None:
        return
    spec = d.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    sets, new = replica_sets(manager, DEPLOYMENT, d)

    def total(field: str, among: list[ApiObject]) -> int:
        return sum(int((rs.get("status") or {}).get(field, 0)) for rs in among)

    updated = total("replicas", [new]) if new else 0
    available = total("availableReplicas", sets)
    status_replicas = total("replicas", sets)
    old_status = d.get("status") or {}
    old_conditions = {c["type"]: c for c in old_status.get("conditions") or []}
    now = timestamp()

    def cond(kind: str, value: bool, reason: str, message: str) -> ApiObject:
        status = "True" if value else "False"
        prev = old_conditions.get(kind)
        same = prev is not None and prev.get("status") == status
        return {
            "type": kind,
            "status": status,
            "lastUpdateTime": prev["lastUpdateTime"]
            if prev is not None and same and prev.get("reason") == reason
            else now,
            "lastTransitionTime": prev["lastTransitionTime"] if prev is not None and same else now,
            "reason": reason,
            "message": message,
        }

    complete = (
        new is not None
        and updated == replicas
        and available == replicas
        and status_replicas == replicas
    )
    new_name = new["metadata"]["name"] if new else name
    status: ApiObject = {
        "observedGeneration": d["metadata"].get("generation", 1),
        "replicas": status_replicas,
        "updatedReplicas": updated,
        "readyReplicas": total("readyReplicas", sets),
        "availableReplicas": available,
        "unavailableReplicas": max(0, replicas - available),
        "conditions": [
            cond(
                "Available",
                available >= replicas - max_unavailable,
                "MinimumReplicasAvailable"
                if available >= replicas - max_unavailable
                else "MinimumReplicasUnavailable",
                "Deployment has minimum availability."
                if available >= replicas - max_unavailable
                else "Deployment does not have minimum availability.",
            ),
            cond(
                "Progressing",
                True,
                "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                f'ReplicaSet "{new_name}" has successfully progressed.'
                if complete
                else f'ReplicaSet "{new_name}" is progressing.',
            ),
        ],
    }
    for key in ("readyReplicas", "availableReplicas", "unavailableReplicas", "updatedReplicas"):
        if not status[key]:
            del status[key]
    await manager.write_status(DEPLOY, d, status)
    if new is not None:
        revision = (new["metadata"].get("annotations") or {}).get(REVISION)
        d = store.get(DEPLOY.key, namespace, name)
        if d is not None and (d["metadata"].get("annotations") or {}).get(REVISION) != revision:
            body = copy.deepcopy(d)
            body["metadata"].setdefault("annotations", {})[REVISION] = revision
            await manager.api.update(DEPLOY, namespace, name, body, manager.ctx)
