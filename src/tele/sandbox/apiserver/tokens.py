"""TokenRequest (`serviceaccounts/token`): a service-account JWT for the requested audiences
and lifetime, optionally bound to a pod (it stops authenticating when the pod goes)."""

from __future__ import annotations

from collections.abc import Callable

from . import errors
from .context import timestamp
from .errors import StatusError, invalid, not_found
from .serviceaccount import DEFAULT_EXPIRATION, MIN_EXPIRATION, ServiceAccountTokens
from .store import ApiObject, Store

_MAX_EXPIRATION = 1 << 32


def token_request(
    tokens: ServiceAccountTokens,
    store: Store,
    account: ApiObject,
    body: ApiObject,
    now: Callable[[], float],
) -> ApiObject:
    """The TokenRequest answered: `status.token` and `status.expirationTimestamp`."""
    namespace, name = account["metadata"]["namespace"], account["metadata"]["name"]
    spec = dict(body.get("spec") or {})
    seconds = spec.get("expirationSeconds")
    seconds = DEFAULT_EXPIRATION if seconds is None else int(seconds)
    causes = []
    if seconds < MIN_EXPIRATION:
        causes.append(
            errors.invalid_value(
                "spec.expirationSeconds", seconds, "may not specify a duration less than 10 minutes"
            )
        )
    elif seconds > _MAX_EXPIRATION:
        causes.append(
            errors.invalid_value(
                "spec.expirationSeconds",
                seconds,
                "may not specify a duration larger than 2^32 seconds",
            )
        )
    audiences = [a for a in spec.get("audiences") or [] if isinstance(a, str)]
    ref = spec.get("boundObjectRef")
    pod: ApiObject | None = None
    if ref:
        if ref.get("kind") != "Pod":
            causes.append(errors.unsupported("spec.boundObjectRef.kind", ref.get("kind"), ["Pod"]))
        elif not ref.get("name"):
            causes.append(errors.required("spec.boundObjectRef.name"))
    if causes:
        raise invalid("TokenRequest", name, "authentication.k8s.io", causes)
    if ref:
        pod = store.get("/pods", namespace, ref["name"])
        if pod is None:
            raise not_found("pods", ref["name"])
        if ref.get("uid") and ref["uid"] != pod["metadata"].get("uid"):
            raise StatusError(
                409,
                "Conflict",
                f"the UID in the bound object reference ({ref['uid']}) does not match the UID "
                f"in record ({pod['metadata'].get('uid')}). The object might have been deleted "
                "and then recreated",
            )
        spec["boundObjectRef"] = {
            "kind": "Pod",
            "apiVersion": "v1",
            "name": ref["name"],
            "uid": pod["metadata"].get("uid"),
        }
    token, expires = tokens.issue(account, seconds=seconds, audiences=audiences or None, pod=pod)
    spec["audiences"] = audiences or list(tokens.api_audiences)
    spec["expirationSeconds"] = seconds
    return {
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": timestamp(now())},
        "spec": spec,
        "status": {"token": token, "expirationTimestamp": timestamp(expires)},
    }
