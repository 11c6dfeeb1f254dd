"""Who asks and how (`RequestContext`), and the admission interface the REST layer awaits.

The HTTP layer builds one `RequestContext` per request; controllers and the kubelet build their
own with a system user. `Admission` is implemented by `admission.WebhookAdmission`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from .auth import User
from .kinds import ResourceType
from .store import ApiObject


def timestamp(t: float | None = None) -> str:
    """A Kubernetes timestamp (RFC 3339, whole seconds, UTC) for the unix time `t` (default:
    now)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


@dataclass
class RequestContext:
    """Who asks and how: user, dryRun, fieldValidation, fieldManager; warnings collected here."""

    user: User
    dry_run: bool = False
    field_validation: str = "Warn"
    field_manager: str = ""
    warnings: list[str] = field(default_factory=list)


class Admission(Protocol):
    """Admission control: mutating (returns the object to store) and validating (raises)."""

    async def mutate(
        self,
        op: str,
        resource_type: ResourceType,
        obj: ApiObject,
        old: ApiObject | None,
        ctx: RequestContext,
        *,
        subresource: str,
    ) -> ApiObject: ...

    async def validate(
        self,
        op: str,
        resource_type: ResourceType,
        obj: ApiObject | None,
        old: ApiObject | None,
        ctx: RequestContext,
        *,
        subresource: str,
    ) -> None: ...


class NoAdmission:
    async def mutate(
        self,
        op: str,
        resource_type: ResourceType,
        obj: ApiObject,
        old: ApiObject | None,
        ctx: RequestContext,
        *,
        subresource: str,
    ) -> ApiObject:
        return obj

    async def validate(
        self,
        op: str,
        resource_type: ResourceType,
        obj: ApiObject | None,
        old: ApiObject | None,
        ctx: RequestContext,
        *,
        subresource: str,
    ) -> None:
        return None
