"""Questions asked of Kubernetes objects as the API returns them (plain dicts), without I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition is True and it is not being deleted."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False
