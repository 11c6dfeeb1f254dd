"""The subresources that are not the object itself: scale, pods/eviction and pods/binding.

(status is an update of one part of the object and lives with updates in `rest`; the streaming
subresources — exec, attach, portforward, log — are served by the kubelet.)
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any

from . import crd
from .context import RequestContext
from .errors import StatusError, invalid, required
from .kinds import ResourceType
from .selectors import from_label_selector_object, label_selector_text, matches_labels
from .store import ApiObject, Store


def scale_of(resource_type: ResourceType, obj: ApiObject) -> ApiObject:
    """The Scale (autoscaling/v1) view of a workload or a custom object with a scale subresource."""
    meta = obj["metadata"]
    if resource_type.scale is not None:
        spec_replicas = crd.get_path(obj, resource_type.scale.spec_replicas)
        status_replicas = crd.get_path(obj, resource_type.scale.status_replicas)
        selector = (
            crd.get_path(obj, resource_type.scale.label_selector)
            if resource_type.scale.label_selector
            else ""
        )
    else:
        spec_replicas = (obj.get("spec") or {}).get("replicas", 0)
        status_replicas = (obj.get("status") or {}).get("replicas", 0)
        selector = label_selector_text((obj.get("spec") or {}).get("selector"))
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            if k in meta
        },
        "spec": {"replicas": spec_replicas or 0},
        "status": {"replicas": status_replicas or 0, "selector": selector or ""},
    }


async def evict(
    store: Store,
    pod: ApiObject,
    body: Any,
    ctx: RequestContext,
    now: str,
    delete: Callable[[ApiObject], Awaitable[object]],
) -> ApiObject:
    """pods/eviction: delete the pod (through `delete`, given the DeleteOptions) unless a
    PodDisruptionBudget forbids it; a Running pod spends one of its budget's disruptions."""
    namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    options = (body or {}).get("deleteOptions") or {} if isinstance(body, dict) else {}
    phase = (pod.get("status") or {}).get("phase")
    if phase == "Running" and not pod["metadata"].get("deletionTimestamp"):
        labels = pod["metadata"].get("labels") or {}
        budgets = [
            b
            for b in store.objects("policy/poddisruptionbudgets", namespace)
            if (sel := from_label_selector_object((b.get("spec") or {}).get("selector")))
            is not None
            and matches_labels(sel, labels)
        ]
        if len(budgets) > 1:
            raise StatusError(
                500,
                "InternalError",
                "This pod has more than one PodDisruptionBudget, which the eviction "
                "subresource does not support.",
            )
        if budgets:
            budget = budgets[0]
            status = budget.get("status") or {}
            if int(status.get("disruptionsAllowed") or 0) <= 0:
                msg = (
                    f"The disruption budget {budget['metadata']['name']} needs "
                    f"{status.get('desiredHealthy', 0)} healthy pods and has "
                    f"{status.get('currentHealthy', 0)} currently"
                )
                raise StatusError(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                    details={"causes": [{"reason": "DisruptionBudget", "message": msg}]},
                )
            if not ctx.dry_run:
                new = copy.deepcopy(budget)
                st = new.setdefault("status", {})
                st["disruptionsAllowed"] = int(st.get("disruptionsAllowed") or 0) - 1
                st.setdefault("disruptedPods", {})[name] = now
                store.replace("policy/poddisruptionbudgets", new)
    await delete(options)
    return _created()


def bind(store: Store, pod: ApiObject, body: Any, ctx: RequestContext, now: str) -> ApiObject:
    """pods/binding: assign the pod to the node the Binding names (once) and mark it
    PodScheduled."""
    name = pod["metadata"]["name"]
    node = ((body or {}).get("target") or {}).get("name") if isinstance(body, dict) else None
    if not node:
        raise invalid("Binding", name, "", [required("target.name")])
    if (pod.get("spec") or {}).get("nodeName"):
        raise StatusError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on pods/binding "{name}": pod {name} is already '
            f'assigned to node "{pod["spec"]["nodeName"]}"',
        )
    if not ctx.dry_run:
        new = copy.deepcopy(pod)
        new["spec"]["nodeName"] = node
        conditions = [
            c
            for c in new.setdefault("status", {}).get("conditions") or []
            if c.get("type") != "PodScheduled"
        ]
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "True",
                "lastTransitionTime": now,
                "lastProbeTime": None,
            }
        )
        new["status"]["conditions"] = conditions
        store.replace("/pods", new)
    return _created()


def _created() -> ApiObject:
    """The answer to a POST of an eviction or a binding that was done."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}
