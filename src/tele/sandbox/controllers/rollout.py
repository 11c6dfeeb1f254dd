"""A minimal Argo Rollouts controller: a Rollout (argoproj.io/v1alpha1) owns ReplicaSets per pod
template, named and labelled by `rollouts-pod-template-hash`, exactly as a Deployment does.

It is active only while the Rollout CRD is served (apply src/tele/sandbox/manifests/
argo-rollouts-crd.yaml, or `tele sandbox up --with argo-rollouts`). Both strategies are a plain
rolling replacement through the Deployment controller's `roll`: `canary` uses its
maxSurge/maxUnavailable (25%/25% by default; steps, analysis and traffic routing are ignored),
`blueGreen` brings the whole new ReplicaSet up before the old one goes (no preview/active
Service switching). `spec.workloadRef` is not supported. The status carries what tools read
without the kubectl plugin: replicas, updated/ready/available counts, HPAReplicas and selector
(for the scale subresource), currentPodHash, stableRS, observedGeneration (a string, as Argo
writes it), phase Healthy/Progressing and the Progressing/Available/Healthy conditions.
"""

from __future__ import annotations

from tele.sandbox.apiserver.context import timestamp
from tele.sandbox.apiserver.kinds import ResourceType
from tele.sandbox.apiserver.selectors import label_selector_text
from tele.sandbox.apiserver.store import ApiObject

from .deployment import Owner, Strategy, replica_sets, resolve, roll
from .manager import ControllerManager
from .objects import ROLLOUT_GROUP, ROLLOUT_RESOURCE

GROUP = ROLLOUT_GROUP
KIND = "Rollout"
RESOURCE = ROLLOUT_RESOURCE

ROLLOUT = Owner(
    KIND,
    f"{GROUP}/v1alpha1",
    "rollouts-controller",
    hash_label="rollouts-pod-template-hash",
    revision="rollout.argoproj.io/revision",
    desired_replicas="rollout.argoproj.io/desired-replicas",
    max_replicas="rollout.argoproj.io/max-replicas",
    stored_as_sent=True,
)


def _strategy(spec: ApiObject, replicas: int) -> Strategy:
    strategy = spec.get("strategy") or {}
    if "blueGreen" in strategy:
        return Strategy(surge=max(replicas, 1), unavailable=0)
    canary = strategy.get("canary") or {}
    surge = resolve(canary.get("maxSurge", "25%"), replicas, True)
    unavailable = resolve(canary.get("maxUnavailable", "25%"), replicas, False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return Strategy(surge, unavailable)


def _served(manager: ControllerManager) -> ResourceType | None:
    return manager.api.kinds.by_kind(GROUP, KIND)


async def reconcile(manager: ControllerManager, namespace: str, name: str) -> None:
    kind = _served(manager)
    if kind is None:
        return  # no Rollout CRD: nothing to control
    rollout = manager.api.store.get(kind.key, namespace, name)
    if rollout is None or rollout["metadata"].get("deletionTimestamp"):
        return
    spec = rollout.get("spec") or {}
    if not isinstance(spec.get("template"), dict) or not isinstance(spec.get("selector"), dict):
        return  # workloadRef Rollouts, or malformed ones (the CRD schema is not enforced)
    await roll(manager, ROLLOUT, rollout, _strategy(spec, int(spec.get("replicas", 1))))
    rollout = manager.api.store.get(kind.key, namespace, name)
    if rollout is not None:
        await manager.write_status(kind, rollout, _status(manager, rollout))


def _status(manager: ControllerManager, rollout: ApiObject) -> ApiObject:
    spec = rollout.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    sets, new = replica_sets(manager, ROLLOUT, rollout)

    def total(field: str, among: list[ApiObject]) -> int:
        return sum(int((rs.get("status") or {}).get(field, 0)) for rs in among)

    updated = total("replicas", [new]) if new else 0
    available = total("availableReplicas", sets)
    current = total("replicas", sets)
    pod_hash = (new["metadata"].get("labels") or {}).get(ROLLOUT.hash_label, "") if new else ""
    healthy = new is not None and updated == available == current == replicas
    old = {c.get("type"): c for c in (rollout.get("status") or {}).get("conditions") or []}
    now = timestamp()

    def condition(kind: str, value: bool, reason: str, message: str) -> ApiObject:
        status = "True" if value else "False"
        prev = old.get(kind) or {}
        same = prev.get("status") == status and prev.get("reason") == reason
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastUpdateTime": prev.get("lastUpdateTime", now) if same else now,
            "lastTransitionTime": prev.get("lastTransitionTime", now) if same else now,
        }

    name = new["metadata"]["name"] if new else rollout["metadata"]["name"]
    status: ApiObject = {
        "observedGeneration": str(rollout["metadata"].get("generation", 1)),
        "replicas": current,
        "updatedReplicas": updated,
        "readyReplicas": total("readyReplicas", sets),
        "availableReplicas": available,
        "HPAReplicas": current,
        "selector": label_selector_text(spec.get("selector")),
        "currentPodHash": pod_hash,
        "phase": "Healthy" if healthy else "Progressing",
        "conditions": [
            condition(
                "Progressing",
                True,
                "NewReplicaSetAvailable" if healthy else "ReplicaSetUpdated",
                f'ReplicaSet "{name}" has successfully progressed.'
                if healthy
                else f'ReplicaSet "{name}" is progressing.',
            ),
            condition(
                "Available",
                available >= replicas,
                "AvailableReason",
                "Rollout has minimum availability"
                if available >= replicas
                else "Rollout does not have minimum availability",
            ),
            condition(
                "Healthy",
                healthy,
                "RolloutHealthy" if healthy else "RolloutProgressing",
                "Rollout is healthy" if healthy else "Rollout is progressing",
            ),
        ],
    }
    if healthy:
        status["stableRS"] = pod_hash
    else:
        status["message"] = f"updated replicas are becoming available ({available}/{replicas})"
    return status
