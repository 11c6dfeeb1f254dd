"""Disruption controller: a PodDisruptionBudget's healthy, desired and expected pod counts and
how many disruptions (evictions) it allows right now."""

from __future__ import annotations

import math

from tele.sandbox.apiserver.context import timestamp
from tele.sandbox.apiserver.store import ApiObject

from .manager import ControllerManager
from .objects import controller_of, pod_ready, resource_of_kind, selector_matches

PDB = resource_of_kind("policy", "PodDisruptionBudget")


def _expected(manager: ControllerManager, pods: list[ApiObject]) -> int:
    """Pods the owners want: the sum of the replicas of the controllers of the matched pods."""
    owners: dict[str, int] = {}
    for pod in pods:
        ref = controller_of(pod)
        if ref is None:
            owners[pod["metadata"]["uid"]] = 1
            continue
        found = manager.api.store.by_uid(ref.get("uid", ""))
        if found is None:
            continue
        owners[ref["uid"]] = int((found[1].get("spec") or {}).get("replicas", 1))
    return sum(owners.values())


async def reconcile(manager: ControllerManager, namespace: str, name: str) -> None:
    pdb = manager.api.store.get(PDB.key, namespace, name)
    if pdb is None:
        return
    spec = pdb.get("spec") or {}
    pods = [
        p
        for p in manager.api.store.objects("/pods", namespace)
        if selector_matches(spec.get("selector"), p["metadata"].get("labels"))
        and not p["metadata"].get("deletionTimestamp")
    ]
    healthy = sum(1 for p in pods if pod_ready(p))
    expected = _expected(manager, pods)
    if "minAvailable" in spec:
        value = spec["minAvailable"]
        if isinstance(value, str) and value.endswith("%"):
            desired = math.ceil(int(value[:-1]) * expected / 100)
        else:
            desired = int(value)
    elif "maxUnavailable" in spec:
        value = spec["maxUnavailable"]
        if isinstance(value, str) and value.endswith("%"):
            desired = expected - math.floor(int(value[:-1]) * expected / 100)
        else:
            desired = expected - int(value)
    else:
        desired = expected
    old = pdb.get("status") or {}
    live_names = {p["metadata"]["name"] for p in pods}
    disrupted = {k: v for k, v in (old.get("disruptedPods") or {}).items() if k in live_names}
    allowed = max(0, healthy - len(disrupted) - max(0, desired))
    status: ApiObject = {
        "observedGeneration": pdb["metadata"].get("generation", 1),
        "currentHealthy": healthy,
        "desiredHealthy": max(0, desired),
        "expectedPods": expected,
        "disruptionsAllowed": allowed,
        "conditions": [
            {
                "type": "DisruptionAllowed",
                "status": "True" if allowed > 0 else "False",
                "reason": "SufficientPods" if allowed > 0 else "InsufficientPods",
                "message": "",
                "observedGeneration": pdb["metadata"].get("generation", 1),
                "lastTransitionTime": next(
                    (
                        c["lastTransitionTime"]
                        for c in old.get("conditions") or []
                        if c.get("type") == "DisruptionAllowed"
                        and c.get("status") == ("True" if allowed > 0 else "False")
                    ),
                    timestamp(),
                ),
            }
        ],
    }
    if disrupted:
        status["disruptedPods"] = disrupted
    await manager.write_status(PDB, pdb, status)
