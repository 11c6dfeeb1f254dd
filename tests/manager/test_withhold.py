"""What an engagement hands over follows RBAC too (issue 15 item 2): a user who may port-forward
but not `get` a Secret gets no value from it and no volume made of it, with one sentence; the
real Authenticator asks the sandbox API server's SubjectAccessReview."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tele.k8s.client import KubeClient
from tele.manager.auth import Authenticator, Principal
from tele.manager.withhold import Source, env_sources, judge, volume_sources
from tele.rpc.server import CALLER, CallerConnection
from tele.sandbox.cluster import ClusterInfo

NS = "default"
SPEC: dict[str, Any] = {
    "serviceAccountName": "web",
    "containers": [
        {
            "name": "app",
            "env": [
                {"name": "PLAIN", "value": "1"},
                {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}},
                {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "ui", "key": "c"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            "volumeMounts": [
                {"name": "settings", "mountPath": "/etc/settings"},
                {"name": "creds", "mountPath": "/etc/creds"},
                {"name": "token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
            ],
        }
    ],
    "volumes": [
        {"name": "settings", "configMap": {"name": "ui"}},
        {"name": "creds", "secret": {"secretName": "db"}},
        {
            "name": "token",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt"}},
                ]
            },
        },
    ],
}
ALL_REMOTE = {
    "/etc/settings": "Remote",
    "/etc/creds": "RemoteReadOnly",
    "/var/run/secrets/kubernetes.io/serviceaccount": "Remote",
}


def test_what_each_value_and_volume_needs() -> None:
    container = SPEC["containers"][0]
    assert env_sources(container) == {
        "DB_PASSWORD": ("get", "secrets", "", "db"),
        "COLOR": ("get", "configmaps", "", "ui"),
    }
    assert volume_sources(SPEC, container, ALL_REMOTE) == [
        ("get", "configmaps", "", "ui"),
        ("get", "secrets", "", "db"),
        ("create", "serviceaccounts", "token", "web"),
        ("get", "configmaps", "", "kube-root-ca.crt"),
    ]
    # Local and Ignore volumes are not exported: they need nothing.
    assert volume_sources(SPEC, container, {"/etc/creds": "Local"}) == []


async def _role(kube: KubeClient, user: str, rules: list[dict[str, Any]]) -> None:
    name = f"{user}-role"
    await kube.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles",
        body={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name},
            "rules": rules,
        },
    )
    await kube.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
        body={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        },
    )


async def _judge_as(auth: Authenticator, user: str, policies: dict[str, str]) -> Any:
    connection = CallerConnection()
    connection.principal = Principal(username=user, groups=("system:authenticated",))
    token = CALLER.set(connection)
    try:

        async def allowed(source: Source) -> bool:
            verb, resource, subresource, name = source
            return await auth.may(verb, resource, NS, subresource=subresource, name=name)

        return await judge(SPEC, "app", policies, allowed, user, NS)
    finally:
        CALLER.reset(token)


@pytest.mark.parametrize("mode", ["enforcing", "permissive", "disabled"])
async def test_a_user_without_get_secrets_gets_no_secret_values_or_volumes(
    kube: KubeClient, sandbox_api: ClusterInfo, mode: str
) -> None:
    user = f"porter-{uuid.uuid4().hex[:8]}"
    portforward = {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]}
    configmaps = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}
    await _role(kube, user, [portforward, configmaps])
    auth = Authenticator(kube, mode)
    withheld = await _judge_as(auth, user, ALL_REMOTE)
    if mode != "enforcing":
        assert withheld.env == set() and withheld.volumes == "" and withheld.notes == []
        return
    assert withheld.env == {"DB_PASSWORD"}
    assert withheld.notes == [
        f"DB_PASSWORD left out of the environment: {user} may not get secrets db in "
        "namespace default"
    ]
    assert withheld.volumes == (
        f"{user} may not get secrets db in namespace default, which a volume of the "
        "container is made of"
    )
    # Without the Secret's volume exported, the service account token is what is missing.
    withheld = await _judge_as(auth, user, {**ALL_REMOTE, "/etc/creds": "Local"})
    assert withheld.volumes.startswith(f"{user} may not create serviceaccounts/token web")
    # Only ConfigMap volumes: exported.
    only_settings = await _judge_as(auth, user, {"/etc/settings": "Remote"})
    assert only_settings.volumes == ""


async def test_a_user_who_may_read_them_gets_everything(
    kube: KubeClient, sandbox_api: ClusterInfo
) -> None:
    user = f"reader-{uuid.uuid4().hex[:8]}"
    await _role(
        kube,
        user,
        [
            {"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
        ],
    )
    withheld = await _judge_as(Authenticator(kube, "enforcing"), user, ALL_REMOTE)
    assert withheld.env == set() and withheld.volumes == "" and withheld.notes == []


def test_what_is_asked_ahead_covers_what_is_judged() -> None:
    """The reviews asked while the engagement's other steps run (cached for `judge`): every
    Secret/ConfigMap reference of the template, and the token volume admission adds."""
    from tele.manager.withhold import likely_sources

    template = {k: v for k, v in SPEC.items() if k != "volumes"}
    template["volumes"] = [v for v in SPEC["volumes"] if v["name"] != "token"]
    ahead = likely_sources(template)
    judged = set(env_sources(SPEC["containers"][0]).values()) | set(
        volume_sources(SPEC, SPEC["containers"][0], ALL_REMOTE)
    )
    assert judged <= ahead
    assert ("create", "serviceaccounts", "token", "web") in ahead
    assert likely_sources({**template, "automountServiceAccountToken": False}) == judged - {
        ("create", "serviceaccounts", "token", "web"),
        ("get", "configmaps", "", "kube-root-ca.crt"),
    }
