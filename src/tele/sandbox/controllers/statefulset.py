"""StatefulSet controller: pods `<name>-0..N-1` with stable hostnames under the headless Service,
created in order (OrderedReady waits for each to be Ready) and removed from the highest; a new
template rolls out from the highest ordinal down, one pod at a time (RollingUpdate)."""

from __future__ import annotations

from tele.sandbox.apiserver.store import ApiObject

from .deployment import template_hash
from .manager import ControllerManager
from .objects import pod_ready, resource_of_kind
from .replicaset import is_active, owned_pods, pod_from_template

STS = resource_of_kind("apps", "StatefulSet")
REVISION_LABEL = "controller-revision-hash"
POD = resource_of_kind("", "Pod")


async def reconcile(manager: ControllerManager, namespace: str, name: str) -> None:
    sts = manager.api.store.get(STS.key, namespace, name)
    if sts is None or sts["metadata"].get("deletionTimestamp"):
        return
    spec = sts.get("spec") or {}
    wanted = int(spec.get("replicas", 1))
    ordered = spec.get("podManagementPolicy", "OrderedReady") == "OrderedReady"
    revision = f"{name}-{template_hash(spec.get('template') or {})}"
    pods = {
        p["metadata"]["name"]: p for p in owned_pods(manager, namespace, sts["metadata"]["uid"])
    }
    for i in range(wanted):
        pod_name = f"{name}-{i}"
        pod = pods.get(pod_name)
        if pod is None:
            if manager.api.store.get("/pods", namespace, pod_name) is not None:
                break  # the previous incarnation is still terminating
            body = pod_from_template(sts, spec.get("template") or {}, name=pod_name)
            body["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] = pod_name
            body["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = str(i)
            body["metadata"]["labels"][REVISION_LABEL] = revision
            body["spec"]["hostname"] = pod_name
            if spec.get("serviceName"):
                body["spec"]["subdomain"] = spec["serviceName"]
            await manager.api.create(POD, namespace, body, manager.ctx)
            await manager.event(
                sts,
                "SuccessfulCreate",
                f"create Pod {pod_name} in StatefulSet {name} successful",
                component="statefulset-controller",
            )
            if ordered:
                break
        elif ordered and not pod_ready(pod):
            break
    for pod_name, pod in sorted(pods.items(), key=lambda kv: -int(kv[0].rsplit("-", 1)[1])):
        if int(pod_name.rsplit("-", 1)[1]) >= wanted and is_active(pod):
            await manager.api.delete(POD, namespace, pod_name, {}, manager.ctx)
            if ordered:
                break
    active = [p for p in owned_pods(manager, namespace, sts["metadata"]["uid"]) if is_active(p)]
    ready = sum(1 for p in active if pod_ready(p))
    strategy = (spec.get("updateStrategy") or {}).get("type", "RollingUpdate")
    outdated = sorted(
        (p for p in active if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) != revision),
        key=lambda p: -int(p["metadata"]["name"].rsplit("-", 1)[1]),
    )
    if strategy == "RollingUpdate" and outdated and len(active) == wanted and ready == wanted:
        # Replace the highest outdated ordinal; its successor is created once it is gone.
        await manager.api.delete(POD, namespace, outdated[0]["metadata"]["name"], {}, manager.ctx)
    updated = len(active) - len(outdated)
    sts = manager.api.store.get(STS.key, namespace, name)
    if sts is None:
        return
    previous = (sts.get("status") or {}).get("currentRevision") or revision
    current = revision if not outdated and len(active) == wanted else previous
    status: ApiObject = {
        "observedGeneration": sts["metadata"].get("generation", 1),
        "replicas": len(active),
        "readyReplicas": ready,
        "currentReplicas": updated if current == revision else len(outdated),
        "updatedReplicas": updated,
        "currentRevision": current,
        "updateRevision": revision,
        "availableReplicas": ready,
        "collisionCount": 0,
    }
    await manager.write_status(STS, sts, status)
