"""ReplicaSet controller: keep `spec.replicas` active pods from the template; report counts."""

from __future__ import annotations

import copy

from tele.sandbox.apiserver.store import ApiObject

from .manager import ControllerManager
from .objects import controller_of, pod_ready, resource_of_kind

RS = resource_of_kind("apps", "ReplicaSet")
POD = resource_of_kind("", "Pod")


def owned_pods(manager: ControllerManager, namespace: str, uid: str) -> list[ApiObject]:
    return [
        p
        for _, p in manager.api.store.dependents(uid)
        if p.get("kind") == "Pod" and (controller_of(p) or {}).get("uid") == uid
    ]


def is_active(pod: ApiObject) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return not pod["metadata"].get("deletionTimestamp") and phase not in ("Succeeded", "Failed")


def pod_from_template(
    owner: ApiObject, template: ApiObject, *, name: str = "", generate: str = ""
) -> ApiObject:
    meta_t = template.get("metadata") or {}
    meta: ApiObject = {
        "namespace": owner["metadata"]["namespace"],
        "labels": dict(meta_t.get("labels") or {}),
        "ownerReferences": [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if meta_t.get("annotations"):
        meta["annotations"] = dict(meta_t["annotations"])
    if name:
        meta["name"] = name
    else:
        meta["generateName"] = generate
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": copy.deepcopy(template.get("spec") or {}),
    }


async def reconcile(manager: ControllerManager, namespace: str, name: str) -> None:
    rs = manager.api.store.get(RS.key, namespace, name)
    if rs is None or rs["metadata"].get("deletionTimestamp"):
        return
    uid = rs["metadata"]["uid"]
    spec = rs.get("spec") or {}
    wanted = int(spec.get("replicas", 1))
    pods = owned_pods(manager, namespace, uid)
    active = [p for p in pods if is_active(p)]
    if len(active) < wanted:
        for _ in range(wanted - len(active)):
            pod = pod_from_template(rs, spec.get("template") or {}, generate=f"{name}-")
            created = await manager.api.create(POD, namespace, pod, manager.ctx)
            await manager.event(
                rs,
                "SuccessfulCreate",
                f"Created pod: {created['metadata']['name']}",
                component="replicaset-controller",
            )
    elif len(active) > wanted:
        # Delete the least useful first: unscheduled, then not ready, then the newest.
        ordered = sorted(
            active, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True
        )
        ordered.sort(key=lambda p: (bool((p.get("spec") or {}).get("nodeName")), pod_ready(p)))
        for pod in ordered[: len(active) - wanted]:
            await manager.api.delete(POD, namespace, pod["metadata"]["name"], {}, manager.ctx)
            await manager.event(
                rs,
                "SuccessfulDelete",
                f"Deleted pod: {pod['metadata']['name']}",
                component="replicaset-controller",
            )
    rs = manager.api.store.get(RS.key, namespace, name)
    if rs is None:
        return
    active = [p for p in owned_pods(manager, namespace, uid) if is_active(p)]
    ready = sum(1 for p in active if pod_ready(p))
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    status: ApiObject = {
        "replicas": len(active),
        "fullyLabeledReplicas": sum(
            1
            for p in active
            if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
        ),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "observedGeneration": rs["metadata"].get("generation", 1),
    }
    await manager.write_status(RS, rs, status)
