"""TokenRequest (`serviceaccounts/token`): tokens for a service account, with an expiry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import errors
from .auth import Authenticator
from .context import timestamp
from .errors import invalid
from .store import ApiObject


def token_request(
    authn: Authenticator, account: ApiObject, body: Any, now: Callable[[], float]
) -> ApiObject:
    """serviceaccounts/token: a token for `account` with the requested expiry."""
    namespace, name = account["metadata"]["namespace"], account["metadata"]["name"]
    spec = dict((body or {}).get("spec") or {}) if isinstance(body, dict) else {}
    seconds = int(spec.get("expirationSeconds") or 3600)
    if seconds < 600:
        raise invalid(
            "TokenRequest",
            name,
            "authentication.k8s.io",
            [
                errors.invalid_value(
                    "spec.expirationSeconds",
                    seconds,
                    "may not specify a duration less than 10 minutes",
                )
            ],
        )
    token, expires = authn.issue_service_account_token(
        namespace, name, account["metadata"]["uid"], seconds
    )
    spec.setdefault("audiences", ["https://kubernetes.default.svc.cluster.local"])
    spec["expirationSeconds"] = seconds
    return {
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": timestamp(now())},
        "spec": spec,
        "status": {"token": token, "expirationTimestamp": timestamp(expires)},
    }
