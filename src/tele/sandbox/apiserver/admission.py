"""Admission webhooks: mutating then validating, called as Kubernetes calls them.

Placeholder for the webhook layer (filled in below in a later commit)."""

from __future__ import annotations

from typing import Any

from .rest import Api, NoAdmission


class WebhookAdmission(NoAdmission):
    def __init__(self, api: Api, ca: Any) -> None:
        self.api = api
        self.ca = ca
