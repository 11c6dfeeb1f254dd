"""RBAC authorization over the stored Roles, ClusterRoles and their bindings.

`system:masters` bypasses it (the admin); everyone else needs a rule. The denial text is the
API server's (`User "x" cannot list resource "pods" in API group "" in the namespace "y"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .auth import User
from .store import Store

ApiObject = dict[str, Any]


@dataclass(frozen=True)
class Attributes:
    verb: str
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""
    is_resource: bool = True

    def forbidden_text(self, user: User) -> str:
        if not self.is_resource:
            return f'User "{user.name}" cannot {self.verb} path "{self.path}"'
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        where = f'in the namespace "{self.namespace}"' if self.namespace else "at the cluster scope"
        return (
            f'User "{user.name}" cannot {self.verb} resource "{resource}" in API group '
            f'"{self.api_group}" {where}'
        )


def _subject_matches(subject: ApiObject, user: User, binding_namespace: str) -> bool:
    kind = subject.get("kind")
    name = subject.get("name")
    if kind == "User":
        return bool(name == user.name)
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_namespace
        return user.name == f"system:serviceaccount:{ns}:{name}"
    return False


def _glob(patterns: list[str], value: str) -> bool:
    return "*" in patterns or value in patterns


def rule_allows(rule: ApiObject, attrs: Attributes) -> bool:
    if not _glob(rule.get("verbs") or [], attrs.verb):
        return False
    if not attrs.is_resource:
        for url in rule.get("nonResourceURLs") or []:
            if url == attrs.path or (url.endswith("*") and attrs.path.startswith(url[:-1])):
                return True
        return False
    if not _glob(rule.get("apiGroups") or [], attrs.api_group):
        return False
    resources = rule.get("resources") or []
    combined = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    if not (
        "*" in resources
        or combined in resources
        or (attrs.subresource and f"*/{attrs.subresource}" in resources)
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


class Authorizer:
    def __init__(self, store: Store) -> None:
        self._store = store

    def _role_rules(self, ref: ApiObject, namespace: str) -> list[ApiObject]:
        if ref.get("kind") == "ClusterRole":
            role = self._store.get(
                "rbac.authorization.k8s.io/clusterroles", "", ref.get("name", "")
            )
        else:
            role = self._store.get(
                "rbac.authorization.k8s.io/roles", namespace, ref.get("name", "")
            )
        return list((role or {}).get("rules") or [])

    def rules_for(self, user: User, namespace: str) -> list[ApiObject]:
        rules: list[ApiObject] = []
        for binding in self._store.objects("rbac.authorization.k8s.io/clusterrolebindings"):
            if any(_subject_matches(s, user, "") for s in binding.get("subjects") or []):
                rules += self._role_rules(binding.get("roleRef") or {}, "")
        if namespace:
            for binding in self._store.objects("rbac.authorization.k8s.io/rolebindings", namespace):
                if any(_subject_matches(s, user, namespace) for s in binding.get("subjects") or []):
                    rules += self._role_rules(binding.get("roleRef") or {}, namespace)
        return rules

    def authorize(self, user: User, attrs: Attributes) -> bool:
        if user.is_admin:
            return True
        return any(rule_allows(rule, attrs) for rule in self.rules_for(user, attrs.namespace))


def bootstrap_objects() -> list[ApiObject]:
    """The default ClusterRoles and bindings every cluster has (trimmed to the usual ones)."""
    rbac = "rbac.authorization.k8s.io/v1"
    read = ["get", "list", "watch"]
    write = ["create", "delete", "deletecollection", "patch", "update"]
    namespaced_groups = [
        (
            "",
            [
                "pods",
                "pods/log",
                "pods/status",
                "services",
                "endpoints",
                "configmaps",
                "secrets",
                "serviceaccounts",
                "events",
                "persistentvolumeclaims",
            ],
        ),
        (
            "apps",
            [
                "deployments",
                "deployments/scale",
                "replicasets",
                "replicasets/scale",
                "statefulsets",
                "statefulsets/scale",
            ],
        ),
        ("discovery.k8s.io", ["endpointslices"]),
        ("policy", ["poddisruptionbudgets"]),
    ]

    def role(name: str, rules: list[ApiObject]) -> ApiObject:
        return {
            "apiVersion": rbac,
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "rules": rules,
        }

    def binding(name: str, role_name: str, group: str) -> ApiObject:
        return {
            "apiVersion": rbac,
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role_name,
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
        }

    view = [
        {"apiGroups": [g], "resources": [r for r in rs if r != "secrets"], "verbs": read}
        for g, rs in namespaced_groups
    ]
    edit = [
        {"apiGroups": [g], "resources": rs, "verbs": read + write} for g, rs in namespaced_groups
    ]
    edit.append(
        {
            "apiGroups": [""],
            "resources": [
                "pods/exec",
                "pods/portforward",
                "pods/attach",
                "pods/eviction",
                "serviceaccounts/token",
            ],
            "verbs": ["create", "get"],
        }
    )
    admin = [
        *edit,
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["roles", "rolebindings"],
            "verbs": read + write,
        },
    ]
    return [
        role(
            "cluster-admin",
            [
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]},
            ],
        ),
        role("admin", admin),
        role("edit", edit),
        role("view", view),
        role(
            "system:discovery",
            [
                {
                    "nonResourceURLs": [
                        "/api",
                        "/api/*",
                        "/apis",
                        "/apis/*",
                        "/healthz",
                        "/livez",
                        "/readyz",
                        "/openapi",
                        "/openapi/*",
                        "/version",
                        "/version/",
                    ],
                    "verbs": ["get"],
                }
            ],
        ),
        role(
            "system:basic-user",
            [
                {
                    "apiGroups": ["authorization.k8s.io"],
                    "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    "verbs": ["create"],
                },
                {
                    "apiGroups": ["authentication.k8s.io"],
                    "resources": ["selfsubjectreviews"],
                    "verbs": ["create"],
                },
            ],
        ),
        role(
            "system:auth-delegator",
            [
                {
                    "apiGroups": ["authentication.k8s.io"],
                    "resources": ["tokenreviews"],
                    "verbs": ["create"],
                },
                {
                    "apiGroups": ["authorization.k8s.io"],
                    "resources": ["subjectaccessreviews"],
                    "verbs": ["create"],
                },
            ],
        ),
        {
            "apiVersion": rbac,
            "kind": "Role",
            "metadata": {
                "name": "extension-apiserver-authentication-reader",
                "namespace": "kube-system",
                "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
            },
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": ["extension-apiserver-authentication"],
                    "verbs": read,
                }
            ],
        },
        binding("cluster-admin", "cluster-admin", "system:masters"),
        binding("system:discovery", "system:discovery", "system:authenticated"),
        binding("system:basic-user", "system:basic-user", "system:authenticated"),
    ]
