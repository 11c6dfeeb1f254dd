"""Access reviews: the API's answer to "may this user do this?", evaluated with its RBAC."""

from __future__ import annotations

from typing import Any

from .auth import User
from .errors import bad_request, invalid, required
from .rbac import Attributes, Authorizer
from .store import ApiObject


def self_subject_access_review(authz: Authorizer, body: Any, user: User) -> ApiObject:
    """SelfSubjectAccessReview: may the caller do this? (`kubectl auth can-i`)"""
    if not isinstance(body, dict):
        raise bad_request("the body of the request was not a SelfSubjectAccessReview object")
    spec = body.get("spec") or {}
    res = spec.get("resourceAttributes")
    non = spec.get("nonResourceAttributes")
    if bool(res) == bool(non):
        raise invalid(
            "SelfSubjectAccessReview",
            "",
            "authorization.k8s.io",
            [
                required(
                    "spec.resourceAttributes",
                    "exactly one of nonResourceAttributes or resourceAttributes must be specified",
                )
            ],
        )
    if res:
        attrs = Attributes(
            verb=res.get("verb", ""),
            api_group=res.get("group", ""),
            resource=res.get("resource", ""),
            subresource=res.get("subresource", ""),
            namespace=res.get("namespace", ""),
            name=res.get("name", ""),
        )
    else:
        assert isinstance(non, dict)
        attrs = Attributes(verb=non.get("verb", ""), path=non.get("path", ""), is_resource=False)
    allowed = authz.authorize(user, attrs)
    status: ApiObject = {"allowed": allowed}
    if allowed:
        status["reason"] = "allowed by RBAC" if not user.is_admin else "system:masters"
    return {
        "kind": "SelfSubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": None},
        "spec": spec,
        "status": status,
    }
