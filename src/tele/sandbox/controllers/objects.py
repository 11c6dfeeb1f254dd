"""What every controller needs to read objects: kinds by name, owners, selectors, readiness.

Controllers import from here and from `manager` (the queue they are driven by); neither imports
a controller, so there is no import cycle (`registry` is the one module that knows them all).
"""

from __future__ import annotations

from tele.sandbox.apiserver.kinds import ResourceType, by_kind
from tele.sandbox.apiserver.selectors import from_label_selector_object, matches_labels
from tele.sandbox.apiserver.store import ApiObject

ROLLOUT_GROUP = "argoproj.io"
ROLLOUT_RESOURCE = f"{ROLLOUT_GROUP}/rollouts"
"""The store key of Argo Rollouts (served only while their CRD exists)."""


def resource_of_kind(group: str, kind: str) -> ResourceType:
    """The built-in resource type that serves `kind` of `group`."""
    found = by_kind(group, kind)
    assert found is not None, kind
    return found


def controller_of(obj: ApiObject) -> ApiObject | None:
    """The owner reference marked `controller: true`, if any."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def selector_matches(selector: ApiObject | None, labels: dict[str, str] | None) -> bool:
    sel = from_label_selector_object(selector)
    return sel is not None and matches_labels(sel, labels or {})


def pod_ready(pod: ApiObject) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )
