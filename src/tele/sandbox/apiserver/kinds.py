"""The resource kinds the sandbox serves: names, scope, verbs, subresources, field labels.

One `ResourceType` per REST resource; discovery, routing, RBAC and OpenAPI all read this table.
`RESOURCES` are the built-in kinds; a `KindRegistry` (one per API server) adds the kinds that
CustomResourceDefinitions declare while they exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

_META_FIELDS = frozenset({"metadata.name", "metadata.namespace"})


@dataclass(frozen=True)
class PrinterColumn:
    """A CRD's additionalPrinterColumns entry: a Table column filled from a JSONPath."""

    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0
    format: str = ""


@dataclass(frozen=True)
class ScalePaths:
    """Where a custom kind's `scale` subresource reads and writes (JSONPaths, `.spec.x`)."""

    spec_replicas: str
    status_replicas: str
    label_selector: str = ""


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    kind: str
    plural: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    subresources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    field_labels: frozenset[str] = field(default_factory=frozenset)
    # kinds with a `status` subresource ignore status on the main resource, and count generation
    has_status: bool = False
    # Served for a CustomResourceDefinition (named by `crd`): stored as-is, no kind-specific
    # defaults or validation, no strategic merge patch.
    crd: str = ""
    printer_columns: tuple[PrinterColumn, ...] = ()
    scale: ScalePaths | None = None
    schema: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def custom(self) -> bool:
        return bool(self.crd)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Store key: group/plural (one version per group here)."""
        return f"{self.group}/{self.plural}"

    @property
    def group_resource(self) -> str:
        """`deployments.apps` style, as in error messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def supports_field(self, label: str) -> bool:
        return label in _META_FIELDS or label in self.field_labels


def _resource(
    group: str, version: str, kind: str, plural: str, namespaced: bool = True, **kw: object
) -> ResourceType:
    return ResourceType(
        group=group,
        version=version,
        kind=kind,
        plural=plural,
        singular=kind.lower(),
        namespaced=namespaced,
        **kw,  # type: ignore[arg-type]
    )


_ONLY_CREATE = ("create",)

# The node's objects: a Node (its status written whole by the kubelet, so without a status
# subresource here) and its heartbeat Lease.
_NODE_RESOURCES = (
    ResourceType(
        group="",
        version="v1",
        kind="Node",
        plural="nodes",
        singular="node",
        namespaced=False,
        short_names=("no",),
        verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"),
    ),
    ResourceType(
        group="coordination.k8s.io",
        version="v1",
        kind="Lease",
        plural="leases",
        singular="lease",
        namespaced=True,
    ),
)

RESOURCES: tuple[ResourceType, ...] = (
    _resource(
        "",
        "v1",
        "Namespace",
        "namespaces",
        False,
        short_names=("ns",),
        subresources=("status", "finalize"),
        has_status=True,
        verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
        field_labels=frozenset({"status.phase"}),
    ),
    _resource(
        "",
        "v1",
        "Pod",
        "pods",
        short_names=("po",),
        categories=("all",),
        has_status=True,
        subresources=("status", "eviction", "log", "portforward", "exec", "attach", "binding"),
        field_labels=frozenset(
            {
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.podIPs",
                "status.nominatedNodeName",
            }
        ),
    ),
    _resource(
        "",
        "v1",
        "Service",
        "services",
        short_names=("svc",),
        categories=("all",),
        has_status=True,
        subresources=("status", "proxy"),
        verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"),
    ),
    _resource("", "v1", "Endpoints", "endpoints", short_names=("ep",)),
    _resource("", "v1", "ConfigMap", "configmaps", short_names=("cm",)),
    _resource("", "v1", "Secret", "secrets", field_labels=frozenset({"type"})),
    _resource(
        "", "v1", "ServiceAccount", "serviceaccounts", short_names=("sa",), subresources=("token",)
    ),
    _resource(
        "",
        "v1",
        "Event",
        "events",
        short_names=("ev",),
        field_labels=frozenset(
            {
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            }
        ),
    ),
    _resource(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        short_names=("deploy",),
        categories=("all",),
        has_status=True,
        subresources=("status", "scale"),
    ),
    _resource(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        short_names=("rs",),
        categories=("all",),
        has_status=True,
        subresources=("status", "scale"),
        field_labels=frozenset({"status.replicas"}),
    ),
    _resource(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        short_names=("sts",),
        categories=("all",),
        has_status=True,
        subresources=("status", "scale"),
    ),
    _resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    _resource(
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        False,
    ),
    _resource(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
        False,
    ),
    _resource(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        short_names=("pdb",),
        has_status=True,
        subresources=("status",),
    ),
    _resource("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    _resource("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False),
    _resource("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    _resource(
        "rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False
    ),
    _resource(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        False,
        short_names=("crd", "crds"),
        categories=("api-extensions",),
        has_status=True,
        subresources=("status",),
    ),
    _resource(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        False,
        verbs=_ONLY_CREATE,
    ),
    _resource(
        "authorization.k8s.io",
        "v1",
        "SubjectAccessReview",
        "subjectaccessreviews",
        False,
        verbs=_ONLY_CREATE,
    ),
    _resource(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectRulesReview",
        "selfsubjectrulesreviews",
        False,
        verbs=_ONLY_CREATE,
    ),
    _resource(
        "authentication.k8s.io", "v1", "TokenReview", "tokenreviews", False, verbs=_ONLY_CREATE
    ),
    _resource(
        "authentication.k8s.io",
        "v1",
        "SelfSubjectReview",
        "selfsubjectreviews",
        False,
        verbs=_ONLY_CREATE,
    ),
    *_NODE_RESOURCES,
)

# Subresources whose body is another kind (group, version, kind), for discovery.
SUBRESOURCE_KINDS: dict[str, tuple[str, str, str]] = {
    "eviction": ("policy", "v1", "Eviction"),
    "scale": ("autoscaling", "v1", "Scale"),
    "token": ("authentication.k8s.io", "v1", "TokenRequest"),
    "binding": ("", "v1", "Binding"),
    "log": ("", "v1", "Pod"),
    "portforward": ("", "v1", "PodPortForwardOptions"),
    "exec": ("", "v1", "PodExecOptions"),
    "attach": ("", "v1", "PodAttachOptions"),
    "proxy": ("", "v1", "ServiceProxyOptions"),
}

SUBRESOURCE_VERBS: dict[str, tuple[str, ...]] = {
    "status": ("get", "patch", "update"),
    "scale": ("get", "patch", "update"),
    "eviction": ("create",),
    "token": ("create",),
    "binding": ("create",),
    "log": ("get",),
    "portforward": ("create", "get"),
    "exec": ("create", "get"),
    "attach": ("create", "get"),
    "finalize": ("update",),
    "proxy": ("create", "delete", "get", "patch", "update"),
}


def group_versions(resources: Iterable[ResourceType] = RESOURCES) -> list[tuple[str, str]]:
    """Served (group, version) pairs in a stable order, core first."""
    seen: list[tuple[str, str]] = []
    for resource_type in resources:
        gv = (resource_type.group, resource_type.version)
        if gv not in seen:
            seen.append(gv)
    return seen


_BY_PLURAL = {
    (resource_type.group, resource_type.version, resource_type.plural): resource_type
    for resource_type in RESOURCES
}
_BY_KIND = {(resource_type.group, resource_type.kind): resource_type for resource_type in RESOURCES}


def by_plural(group: str, version: str, plural: str) -> ResourceType | None:
    return _BY_PLURAL.get((group, version, plural))


def by_kind(group: str, kind: str) -> ResourceType | None:
    return _BY_KIND.get((group, kind))


def kind_of(group: str, kind: str) -> ResourceType:
    """The served kind (for kinds this module defines; a KeyError is a bug)."""
    return _BY_KIND[(group, kind)]


BUILTIN_GROUPS = frozenset(resource_type.group for resource_type in RESOURCES)


class KindRegistry:
    """The kinds one API server serves: the built-in ones plus those of its CRDs.

    `generation` changes whenever the set changes, so that discovery and OpenAPI documents
    derived from it can be cached per generation.
    """

    def __init__(self) -> None:
        self._custom: dict[str, tuple[ResourceType, ...]] = {}
        self._all: tuple[ResourceType, ...] = RESOURCES
        self.generation = 0

    def all(self) -> tuple[ResourceType, ...]:
        return self._all

    def custom(self) -> tuple[ResourceType, ...]:
        return self._all[len(RESOURCES) :]

    def serve(self, crd_name: str, kinds: tuple[ResourceType, ...]) -> None:
        """Serve (or re-serve, after an update) the kinds of CRD `crd_name`."""
        self._custom[crd_name] = kinds
        self._changed()

    def withdraw(self, crd_name: str) -> tuple[ResourceType, ...]:
        kinds = self._custom.pop(crd_name, ())
        self._changed()
        return kinds

    def _changed(self) -> None:
        self._all = RESOURCES + tuple(
            resource_type for kinds in self._custom.values() for resource_type in kinds
        )
        self.generation += 1

    def of_crd(self, crd_name: str) -> tuple[ResourceType, ...]:
        return self._custom.get(crd_name, ())

    def group_versions(self) -> list[tuple[str, str]]:
        return group_versions(self._all)

    def by_plural(self, group: str, version: str, plural: str) -> ResourceType | None:
        found = _BY_PLURAL.get((group, version, plural))
        if found is not None or group in BUILTIN_GROUPS:
            return found
        return next(
            (
                resource_type
                for resource_type in self.custom()
                if (resource_type.group, resource_type.version, resource_type.plural)
                == (group, version, plural)
            ),
            None,
        )

    def by_kind(self, group: str, kind: str) -> ResourceType | None:
        """The kind's resource (for a custom kind served in several versions, the first)."""
        found = _BY_KIND.get((group, kind))
        if found is not None or group in BUILTIN_GROUPS:
            return found
        return next(
            (
                resource_type
                for resource_type in self.custom()
                if (resource_type.group, resource_type.kind) == (group, kind)
            ),
            None,
        )

    def by_key(self, key: str) -> ResourceType | None:
        """The resource stored under `key` (group/plural)."""
        return next(
            (resource_type for resource_type in self._all if resource_type.key == key), None
        )
