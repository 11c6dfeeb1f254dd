"""Every controller of the sandbox's controller manager, by name; the one module that knows them.

Controllers import `objects` and `manager` only, so nothing imports back into this module.
"""

from __future__ import annotations

from collections.abc import Mapping

from tele.sandbox.apiserver.rest import Api

from . import deployment, disruption, endpoints, replicaset, rollout, statefulset
from .manager import ControllerManager, Reconcile

CONTROLLERS: Mapping[str, Reconcile] = {
    "deployment": deployment.reconcile,
    "rollout": rollout.reconcile,
    "replicaset": replicaset.reconcile,
    "statefulset": statefulset.reconcile,
    "endpoints": endpoints.reconcile,
    "disruption": disruption.reconcile,
}


def controller_manager(api: Api) -> ControllerManager:
    """A controller manager running every controller against `api`."""
    return ControllerManager(api, CONTROLLERS)
