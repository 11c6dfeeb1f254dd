"""Events the sandbox's own components record (the controllers, the kubelet): the Event object
as Kubernetes' recorders write it, created best effort."""

from __future__ import annotations

import logging

from tele.sandbox.apiserver.context import RequestContext
from tele.sandbox.apiserver.errors import StatusError
from tele.sandbox.apiserver.kinds import by_kind
from tele.sandbox.apiserver.rest import Api
from tele.sandbox.apiserver.store import ApiObject

log = logging.getLogger(__name__)


def event_object(
    involved: ApiObject,
    namespace: str,
    reason: str,
    message: str,
    *,
    event_type: str,
    component: str,
    now: str,
    host: str | None = None,
) -> ApiObject:
    """An Event about the object `involved` describes (its kind, name, uid, ...) in
    `namespace`, reported by `component` (on the node `host`, for a kubelet) at `now`."""
    body: ApiObject = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": event_type,
        "source": {"component": component, **({"host": host} if host else {})},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "reportingComponent": component,
    }
    if host:
        body["reportingInstance"] = host
    return body


async def record_event(api: Api, ctx: RequestContext, event: ApiObject) -> None:
    """Create `event` (best effort: events never fail the work they describe)."""
    resource_type = by_kind("", "Event")
    assert resource_type is not None
    try:
        await api.create(resource_type, event["metadata"]["namespace"], event, ctx)
    except StatusError as exc:
        log.debug(
            "event %s for %s not recorded: %s",
            event["reason"],
            event["involvedObject"]["name"],
            exc.message,
        )
