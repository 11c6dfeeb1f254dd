"""The review APIs: TokenReview ("who is this token?", by the API server's authenticators),
SubjectAccessReview and SelfSubjectAccessReview ("may this user do this?", by its RBAC).

Nothing is stored: each create answers in `status`. The caller needs `create` on the review
resource (RBAC-checked by the HTTP layer like any create).
"""

from __future__ import annotations

from typing import Any

from .auth import User
from .authenticator import Authenticator
from .errors import bad_request, invalid, required
from .rbac import Attributes, Authorizer
from .serviceaccount import InvalidToken
from .store import ApiObject


def token_review(authn: Authenticator, body: ApiObject) -> ApiObject:
    """TokenReview: the user a bearer token authenticates, for the audiences asked."""
    spec = dict(body.get("spec") or {})
    token = spec.get("token") or ""
    audiences = [a for a in spec.get("audiences") or [] if isinstance(a, str)]
    status: ApiObject
    try:
        user, matched = authn.review(token, audiences or None)
    except InvalidToken as exc:
        status = {"authenticated": False, "user": {}, "error": f"[{exc}]"}
    else:
        status = {"authenticated": True, "user": user.info(), "audiences": matched}
    return {
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": None},
        "spec": spec,
        "status": status,
    }


def self_subject_review(user: User) -> ApiObject:
    """SelfSubjectReview: who am I? (`kubectl auth whoami`)"""
    return {
        "kind": "SelfSubjectReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": None},
        "status": {"userInfo": user.info()},
    }


def _attributes(kind: str, spec: ApiObject) -> Attributes:
    res = spec.get("resourceAttributes")
    non = spec.get("nonResourceAttributes")
    if bool(res) == bool(non):
        raise invalid(
            kind,
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
        return Attributes(
            verb=res.get("verb", ""),
            api_group=res.get("group", ""),
            resource=res.get("resource", ""),
            subresource=res.get("subresource", ""),
            namespace=res.get("namespace", ""),
            name=res.get("name", ""),
        )
    assert isinstance(non, dict)
    return Attributes(verb=non.get("verb", ""), path=non.get("path", ""), is_resource=False)


def _decision(authz: Authorizer, user: User, attrs: Attributes) -> ApiObject:
    allowed = authz.authorize(user, attrs)
    status: ApiObject = {"allowed": allowed}
    if allowed:
        status["reason"] = "allowed by RBAC" if not user.is_admin else "system:masters"
    return status


def subject_access_review(authz: Authorizer, body: ApiObject) -> ApiObject:
    """SubjectAccessReview: may the user (and groups) the spec names do this?"""
    spec = dict(body.get("spec") or {})
    if not spec.get("user") and not spec.get("groups"):
        raise invalid(
            "SubjectAccessReview",
            "",
            "authorization.k8s.io",
            [required("spec.user", "at least one of user or group must be specified")],
        )
    attrs = _attributes("SubjectAccessReview", spec)
    extra = {
        str(k): [str(v) for v in vs]
        for k, vs in (spec.get("extra") or {}).items()
        if isinstance(vs, list)
    }
    user = User(
        str(spec.get("user") or ""),
        tuple(str(g) for g in spec.get("groups") or []),
        uid=str(spec.get("uid") or ""),
        extra=extra,
    )
    return {
        "kind": "SubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": None},
        "spec": spec,
        "status": _decision(authz, user, attrs),
    }


def self_subject_rules_review(authz: Authorizer, body: ApiObject, user: User) -> ApiObject:
    """SelfSubjectRulesReview: everything the caller may do in a namespace (`kubectl auth
    can-i --list`), the rules of its roles as RBAC finds them."""
    spec = dict(body.get("spec") or {})
    namespace = str(spec.get("namespace") or "")
    resource_rules: list[ApiObject] = []
    non_resource_rules: list[ApiObject] = []
    for rule in authz.rules_for(user, namespace):
        if rule.get("nonResourceURLs"):
            non_resource_rules.append(
                {"verbs": list(rule.get("verbs") or []), "nonResourceURLs": rule["nonResourceURLs"]}
            )
        else:
            out: ApiObject = {
                "verbs": list(rule.get("verbs") or []),
                "apiGroups": list(rule.get("apiGroups") or []),
                "resources": list(rule.get("resources") or []),
            }
            if rule.get("resourceNames"):
                out["resourceNames"] = list(rule["resourceNames"])
            resource_rules.append(out)
    return {
        "kind": "SelfSubjectRulesReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": None},
        "spec": spec,
        "status": {
            "resourceRules": resource_rules,
            "nonResourceRules": non_resource_rules,
            "incomplete": False,
        },
    }


def self_subject_access_review(authz: Authorizer, body: Any, user: User) -> ApiObject:
    """SelfSubjectAccessReview: may the caller do this? (`kubectl auth can-i`)"""
    if not isinstance(body, dict):
        raise bad_request("the body of the request was not a SelfSubjectAccessReview object")
    spec = body.get("spec") or {}
    status = _decision(authz, user, _attributes("SelfSubjectAccessReview", spec))
    return {
        "kind": "SelfSubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": None},
        "spec": spec,
        "status": status,
    }
