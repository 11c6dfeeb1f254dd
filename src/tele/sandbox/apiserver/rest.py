"""REST semantics of the API: create, read, list, update, patch, delete, and the subresources.

This is where Kubernetes' rules live: system metadata (uid, resourceVersion, generation,
timestamps), defaults, validation, optimistic concurrency, status subresources, graceful pod
deletion, finalizers, propagation policies and owner-reference garbage collection, namespace
lifecycle, Service address allocation, eviction and token requests, and the kinds that
CustomResourceDefinitions add and take away. It does no network I/O itself; admission webhooks
are awaited through the `Admission` interface.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from . import crd, defaults, errors, patch, schemas, validation
from .allocators import IpAllocator, PortAllocator
from .auth import Authenticator, User
from .errors import (
    ApiError,
    Cause,
    already_exists,
    bad_request,
    conflict,
    invalid,
    not_found,
    required,
)
from .kinds import KindRegistry, ResourceType, by_kind, kind_of
from .rbac import Attributes, Authorizer, bootstrap_objects
from .selectors import (
    FieldSelector,
    LabelSelector,
    from_label_selector_object,
    label_selector_text,
    matches_fields,
    matches_labels,
)
from .store import Obj, Store

log = logging.getLogger(__name__)

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_SYSTEM_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
# Kinds whose spec changes bump metadata.generation.
_GENERATION_KINDS = frozenset(
    {
        "Deployment",
        "ReplicaSet",
        "StatefulSet",
        "Pod",
        "PodDisruptionBudget",
        "Service",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
)


@dataclass
class Ctx:
    """Who asks and how: user, dryRun, fieldValidation, fieldManager; warnings collected here."""

    user: User
    dry_run: bool = False
    field_validation: str = "Warn"
    field_manager: str = ""
    warnings: list[str] = field(default_factory=list)


class Admission(Protocol):
    """Admission control: mutating (returns the object to store) and validating (raises)."""

    async def mutate(
        self, op: str, rt: ResourceType, obj: Obj, old: Obj | None, ctx: Ctx, *, subresource: str
    ) -> Obj: ...

    async def validate(
        self,
        op: str,
        rt: ResourceType,
        obj: Obj | None,
        old: Obj | None,
        ctx: Ctx,
        *,
        subresource: str,
    ) -> None: ...


class NoAdmission:
    async def mutate(
        self, op: str, rt: ResourceType, obj: Obj, old: Obj | None, ctx: Ctx, *, subresource: str
    ) -> Obj:
        return obj

    async def validate(
        self,
        op: str,
        rt: ResourceType,
        obj: Obj | None,
        old: Obj | None,
        ctx: Ctx,
        *,
        subresource: str,
    ) -> None:
        return None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _strip_rv(obj: Obj) -> Obj:
    meta = {
        k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "managedFields")
    }
    return {**obj, "metadata": meta}


class Api:
    """The API's behaviour over one `Store`; the HTTP layer maps requests onto these methods."""

    def __init__(
        self,
        store: Store | None = None,
        *,
        admin_token: str = "",
        clock: Callable[[], float] = time.time,
        service_cidr: str = "10.96.0.0/16",
        ca_pem: str = "",
        signing_key: bytes | None = None,
    ) -> None:
        self.store = store or Store()
        self.kinds = KindRegistry()
        self.clock = clock
        self.ips = IpAllocator(service_cidr)
        self.node_ports = PortAllocator()
        self.authn = Authenticator(self.store, admin_token or uuid.uuid4().hex, signing_key)
        self.authz = Authorizer(self.store)
        self.admission: Admission = NoAdmission()
        self.ca_pem = ca_pem

    # --- bootstrap -------------------------------------------------------------------------

    def bootstrap(self) -> None:
        """The objects every cluster starts with: namespaces, API Service, default RBAC."""
        ctx = Ctx(User("system:apiserver", ("system:masters",)))
        for ns in SYSTEM_NAMESPACES:
            self._create_now(
                kind_of("", "Namespace"),
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                ctx,
            )
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"component": "apiserver", "provider": "kubernetes"},
            },
            "spec": {
                "clusterIP": str(self.ips.network.network_address + 1),
                "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
            },
        }
        self._create_now(kind_of("", "Service"), svc, ctx)
        for obj in bootstrap_objects():
            rt = by_kind("rbac.authorization.k8s.io", obj["kind"])
            assert rt is not None
            self._create_now(rt, obj, ctx)

    def _create_now(self, rt: ResourceType, obj: Obj, ctx: Ctx) -> Obj:
        prepared = self._prepare_create(
            rt, copy.deepcopy(obj), obj["metadata"].get("namespace", ""), ctx
        )
        self._generate_name(prepared)
        self._check_valid(rt, prepared)
        return self._commit_create(rt, prepared, ctx)

    # --- helpers ---------------------------------------------------------------------------

    def now(self) -> str:
        return _iso(self.clock())

    def _decode(self, rt: ResourceType, body: Any, namespace: str, ctx: Ctx) -> Obj:
        """Check kind/apiVersion/namespace of a body and prune or refuse undeclared fields."""
        if not isinstance(body, dict):
            raise bad_request(f"the body of the request was not a {rt.kind} object")
        kind = body.get("kind") or rt.kind
        api_version = body.get("apiVersion") or rt.api_version
        if kind != rt.kind or api_version != rt.api_version:
            raise bad_request(
                f'{kind} in version "{api_version.rpartition("/")[2]}" cannot be handled as a '
                f"{rt.kind}: the object provided is of the wrong kind"
            )
        obj = dict(body)
        obj["kind"], obj["apiVersion"] = rt.kind, rt.api_version
        meta = obj.get("metadata")
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: metadata '
                "must be an object"
            )
        meta = dict(meta)
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if body_ns and namespace and body_ns != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
            meta["namespace"] = namespace or body_ns or ""
        else:
            meta.pop("namespace", None)
        obj["metadata"] = meta
        schema = schemas.kind_schema(rt.group, rt.version, rt.kind)
        report = validation.FieldReport()
        obj = validation.check_fields(obj, schema, "", report)
        prefix = f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}'
        if report.type_errors:
            raise bad_request(f"{prefix}: json: cannot unmarshal: {report.type_errors[0]}")
        if report.unknown:
            unknown = ", ".join(f'unknown field "{p}"' for p in report.unknown)
            if ctx.field_validation == "Strict":
                raise bad_request(f"{prefix}: strict decoding error: {unknown}")
            if ctx.field_validation == "Warn":
                ctx.warnings += [f'unknown field "{p}"' for p in report.unknown]
        if not isinstance(obj, dict):
            raise bad_request(f"{prefix}: the body is not an object")
        return obj

    def _rt_of(self, resource_key: str) -> ResourceType:
        found = self.kinds.by_key(resource_key)
        assert found is not None, resource_key
        return found

    @staticmethod
    def _defaults(rt: ResourceType, obj: Obj) -> None:
        if not rt.custom:  # custom objects are stored as sent (no schema defaulting)
            defaults.apply_defaults(obj)

    def _check_valid(self, rt: ResourceType, obj: Obj, old: Obj | None = None) -> None:
        if rt.custom:
            # Only object metadata: a custom kind may share a built-in kind's name, and its
            # schema is not enforced. (The kind blanked: its names are DNS subdomains.)
            causes = validation.metadata_causes({**obj, "kind": ""})
        else:
            causes = validation.validate(obj)
            if rt.kind == crd.KIND:
                causes += crd.causes(obj)
        if old is not None and not rt.custom:
            causes += validation.update_causes(obj, old)
        if causes:
            raise invalid(rt.kind, obj["metadata"].get("name", ""), rt.group, causes)

    def _namespace_open(self, rt: ResourceType, namespace: str) -> None:
        if not rt.namespaced:
            return
        ns = self.store.get("/namespaces", "", namespace)
        if ns is None:
            raise not_found("namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f'{rt.plural} "{{name}}" is forbidden: unable to create new content in namespace '
                f"{namespace} because it is being terminated",
            )

    def live(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        obj = self.store.get(rt.key, namespace if rt.namespaced else "", name)
        if obj is None:
            raise not_found(rt.plural, name, rt.group)
        return obj

    # --- create ----------------------------------------------------------------------------

    @staticmethod
    def _generate_name(obj: Obj) -> None:
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                random.choice(_NAME_CHARS) for _ in range(5)
            )

    def _prepare_create(self, rt: ResourceType, body: Any, namespace: str, ctx: Ctx) -> Obj:
        # The decoded body is ours alone (freshly parsed, rebuilt by the schema walk): no copy.
        obj = self._decode(rt, body, namespace, ctx)
        meta = obj["metadata"]
        for key in (
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = self.now()
        if rt.kind in _GENERATION_KINDS or rt.custom or rt.kind == crd.KIND:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if rt.custom and rt.has_status:
            obj.pop("status", None)  # only the status subresource writes it
        elif rt.has_status and rt.kind not in ("Namespace",):
            obj["status"] = self._initial_status(rt)
        self._defaults(rt, obj)
        return obj

    def _initial_status(self, rt: ResourceType) -> Obj:
        if rt.kind == "Pod":
            return {"phase": "Pending", "qosClass": "BestEffort"}
        if rt.kind == "Service":
            return {"loadBalancer": {}}
        if rt.kind in ("ReplicaSet", "StatefulSet"):
            return {"replicas": 0, "availableReplicas": 0}
        if rt.kind == "PodDisruptionBudget":
            return {
                "disruptionsAllowed": 0,
                "currentHealthy": 0,
                "desiredHealthy": 0,
                "expectedPods": 0,
            }
        return {}

    async def create(self, rt: ResourceType, namespace: str, body: Any, ctx: Ctx) -> Obj:
        obj = self._prepare_create(rt, body, namespace, ctx)
        if rt.namespaced:
            self._namespace_open_named(rt, namespace, obj["metadata"].get("name", ""))
        obj = await self.admission.mutate("CREATE", rt, obj, None, ctx, subresource="")
        # Names from generateName are chosen after mutating admission, as the real server does.
        self._generate_name(obj)
        self._defaults(rt, obj)
        self._check_valid(rt, obj)
        await self.admission.validate("CREATE", rt, obj, None, ctx, subresource="")
        return self._commit_create(rt, obj, ctx)

    def _namespace_open_named(self, rt: ResourceType, namespace: str, name: str) -> None:
        try:
            self._namespace_open(rt, namespace)
        except ApiError as exc:
            if exc.code == 403:
                exc.message = exc.message.replace("{name}", name)
            raise

    def _commit_create(self, rt: ResourceType, obj: Obj, ctx: Ctx) -> Obj:
        meta = obj["metadata"]
        ns = meta.get("namespace", "") if rt.namespaced else ""
        if self.store.get(rt.key, ns, meta["name"]) is not None:
            raise already_exists(rt.plural, meta["name"], rt.group)
        claimed: list[str] = []
        ports: list[int] = []
        if rt.kind == "Service":
            self._allocate_service(obj, None, claimed, ports)
        if rt.kind == crd.KIND:
            obj["status"] = crd.status(obj, self.now())
        if ctx.dry_run:
            for ip in claimed:
                self.ips.release(ip)
            for port in ports:
                self.node_ports.release(port)
            return obj
        stored = self.store.create(rt.key, obj)
        self._after_create(rt, stored)
        return stored

    def _after_create(self, rt: ResourceType, obj: Obj) -> None:
        if rt.kind == crd.KIND:
            self.kinds.serve(obj["metadata"]["name"], crd.kinds_of(obj))
            return
        if rt.kind != "Namespace":
            return
        name = obj["metadata"]["name"]
        system = Ctx(User("system:serviceaccount-controller", ("system:masters",)))
        sa_rt = by_kind("", "ServiceAccount")
        cm_rt = by_kind("", "ConfigMap")
        assert sa_rt is not None and cm_rt is not None
        self._create_now(
            sa_rt,
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "default", "namespace": name},
            },
            system,
        )
        if self.ca_pem:
            self._create_now(
                cm_rt,
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "kube-root-ca.crt", "namespace": name},
                    "data": {"ca.crt": self.ca_pem},
                },
                system,
            )

    def _allocate_service(
        self, obj: Obj, old: Obj | None, claimed: list[str], ports: list[int]
    ) -> None:
        spec = obj["spec"]
        old_spec = (old or {}).get("spec") or {}
        name = obj["metadata"]["name"]
        causes: list[Cause] = []
        if spec.get("type") == "ExternalName":
            spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
        elif spec.get("clusterIP") == "None":
            spec["clusterIPs"] = ["None"]
        elif old_spec.get("clusterIP") and not spec.get("clusterIP"):
            spec["clusterIP"] = old_spec["clusterIP"]
            spec["clusterIPs"] = [spec["clusterIP"]]
        elif not spec.get("clusterIP"):
            ip = self.ips.allocate()
            if ip is None:
                raise ApiError(
                    500, "InternalError", "failed to allocate a serviceIP: range is full"
                )
            claimed.append(ip)
            spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
        elif spec["clusterIP"] != old_spec.get("clusterIP"):
            cause = self.ips.claim(spec["clusterIP"])
            if cause is not None:
                causes.append(cause)
            else:
                claimed.append(spec["clusterIP"])
            spec["clusterIPs"] = [spec["clusterIP"]]
        if spec.get("type") != "ExternalName":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        old_ports = {p.get("nodePort") for p in old_spec.get("ports") or [] if p.get("nodePort")}
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            for i, port in enumerate(spec.get("ports") or []):
                wanted = port.get("nodePort")
                if wanted and wanted in old_ports:
                    continue
                if wanted:
                    cause = self.node_ports.claim(int(wanted), f"spec.ports[{i}].nodePort")
                    if cause is not None:
                        causes.append(cause)
                    else:
                        ports.append(int(wanted))
                else:
                    allocated = self.node_ports.allocate()
                    if allocated is not None:
                        ports.append(allocated)
                        port["nodePort"] = allocated
        else:
            for port in spec.get("ports") or []:
                port.pop("nodePort", None)
        if causes:
            for ip in claimed:
                self.ips.release(ip)
            for p in ports:
                self.node_ports.release(p)
            raise invalid("Service", name, "", causes)

    def _release_service(self, obj: Obj, keep: Obj | None = None) -> None:
        spec = obj.get("spec") or {}
        keep_spec = (keep or {}).get("spec") or {}
        if spec.get("clusterIP") not in (None, "", "None") and spec.get(
            "clusterIP"
        ) != keep_spec.get("clusterIP"):
            self.ips.release(spec["clusterIP"])
        kept = {p.get("nodePort") for p in keep_spec.get("ports") or []}
        for port in spec.get("ports") or []:
            if port.get("nodePort") and port["nodePort"] not in kept:
                self.node_ports.release(port["nodePort"])

    # --- read ------------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        return self.live(rt, namespace, name)

    def list_objects(
        self,
        rt: ResourceType,
        namespace: str | None,
        *,
        labels: LabelSelector = (),
        fields: FieldSelector = (),
        limit: int = 0,
        continue_token: str = "",
    ) -> tuple[list[Obj], Obj]:
        """Matching objects and the list metadata (resourceVersion, continue, remaining)."""
        start: tuple[str, str] | None = None
        if continue_token:
            try:
                data = json.loads(base64.urlsafe_b64decode(continue_token.encode()))
                start = (str(data["start"][0]), str(data["start"][1]))
            except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
                raise bad_request(f"continue key is not valid: {continue_token}") from None
        objs = self.store.objects(rt.key, namespace if rt.namespaced else None)
        if start is not None:
            objs = [
                o
                for o in objs
                if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > start
            ]
        if labels or fields:
            objs = [
                o
                for o in objs
                if matches_labels(labels, o["metadata"].get("labels")) and matches_fields(fields, o)
            ]
        meta: Obj = {"resourceVersion": str(self.store.resource_version)}
        if limit and len(objs) > limit:
            last = objs[limit - 1]["metadata"]
            token = {
                "rv": self.store.resource_version,
                "start": [last.get("namespace", ""), last["name"]],
            }
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            meta["remainingItemCount"] = len(objs) - limit
            objs = objs[:limit]
        return objs, meta

    # --- update ----------------------------------------------------------------------------

    async def update(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        body: Any,
        ctx: Ctx,
        *,
        subresource: str = "",
    ) -> Obj:
        live = self.live(rt, namespace, name)
        new = self._decode(rt, body, namespace, ctx)
        if new["metadata"].get("name") != name:
            raise bad_request(
                f"the name of the object ({new['metadata'].get('name')}) does not match the name "
                f"on the URL ({name})"
            )
        return await self._update(
            rt,
            live,
            new,
            ctx,
            subresource=subresource,
            expect_rv=new["metadata"].get("resourceVersion"),
        )

    async def _update(
        self,
        rt: ResourceType,
        live: Obj,
        new: Obj,
        ctx: Ctx,
        *,
        subresource: str,
        expect_rv: str | None,
    ) -> Obj:
        name = live["metadata"]["name"]
        if expect_rv and expect_rv != live["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, name, rt.group)
        new = copy.deepcopy(new)
        if subresource == "status":
            merged = {**copy.deepcopy(live), "status": new.get("status") or {}}
        else:
            merged = new
            if rt.has_status and "status" in live:
                merged["status"] = copy.deepcopy(live["status"])
            elif rt.has_status:
                merged.pop("status", None)
        meta = merged["metadata"]
        live_meta = live["metadata"]
        meta["name"] = name
        if rt.namespaced:
            meta["namespace"] = live_meta["namespace"]
        for key in _SYSTEM_META:
            if key in live_meta:
                meta[key] = live_meta[key]
            else:
                meta.pop(key, None)
        meta.pop("managedFields", None)
        meta["resourceVersion"] = live_meta["resourceVersion"]
        self._defaults(rt, merged)
        if rt.kind in _GENERATION_KINDS or rt.custom or rt.kind == crd.KIND:
            generation = int(live_meta.get("generation") or 1)
            if self._spec_changed(merged, live):
                generation += 1
            meta["generation"] = generation
        merged = await self.admission.mutate(
            "UPDATE", rt, merged, live, ctx, subresource=subresource
        )
        self._defaults(rt, merged)
        current = self.store.get(
            rt.key, live_meta.get("namespace", "") if rt.namespaced else "", name
        )
        if current is None:
            raise not_found(rt.plural, name, rt.group)
        if current["metadata"]["resourceVersion"] != live_meta["resourceVersion"]:
            raise conflict(rt.plural, name, rt.group)
        self._check_valid(rt, merged, live)
        await self.admission.validate("UPDATE", rt, merged, live, ctx, subresource=subresource)
        if _strip_rv(merged) == _strip_rv(live):
            return live
        claimed: list[str] = []
        ports: list[int] = []
        if rt.kind == "Service":
            self._allocate_service(merged, live, claimed, ports)
        if ctx.dry_run:
            for ip in claimed:
                self.ips.release(ip)
            for port in ports:
                self.node_ports.release(port)
            return merged
        if rt.kind == "Service":
            self._release_service(live, keep=merged)
        if rt.kind == crd.KIND and subresource != "status":
            merged["status"] = crd.status(merged, self.now())
        stored = self.store.replace(rt.key, merged)
        if rt.kind == crd.KIND and not stored["metadata"].get("deletionTimestamp"):
            self.kinds.serve(name, crd.kinds_of(stored))
        if stored["metadata"].get("deletionTimestamp") and not stored["metadata"].get("finalizers"):
            pending_pod = rt.kind == "Pod" and self._pod_needs_grace(stored, None)
            if not pending_pod:
                return self._remove(rt, stored)
        return stored

    @staticmethod
    def _spec_changed(new: Obj, old: Obj) -> bool:
        skip = ("metadata", "status", "kind", "apiVersion")
        return {k: v for k, v in new.items() if k not in skip} != {
            k: v for k, v in old.items() if k not in skip
        }

    # --- patch -----------------------------------------------------------------------------

    async def patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        content_type: str,
        raw: bytes,
        *,
        ctx: Ctx,
        subresource: str = "",
        force: bool = False,
    ) -> tuple[int, Obj]:
        ct = content_type.split(";", maxsplit=1)[0].strip().lower()
        if ct == "application/apply-patch+yaml":
            try:
                body = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise bad_request(f"error decoding YAML: {exc}") from None
        else:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise bad_request(f"error decoding patch: {exc}") from None
        if ct not in (
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml",
        ):
            raise ApiError(
                415, "UnsupportedMediaType", f'the server does not support the patch type "{ct}"'
            )
        if ct == "application/strategic-merge-patch+json" and rt.custom:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                "include: application/json-patch+json, application/merge-patch+json, "
                "application/apply-patch+yaml",
            )
        if ct == "application/apply-patch+yaml" and not ctx.field_manager:
            raise bad_request("PATCH request with apply type must specify a fieldManager")
        schema = schemas.kind_schema(rt.group, rt.version, rt.kind)
        for _ in range(5):
            current = self.store.get(rt.key, namespace if rt.namespaced else "", name)
            if current is None:
                if ct == "application/apply-patch+yaml" and not subresource:
                    if isinstance(body, dict):
                        body.setdefault("metadata", {})["name"] = name
                    return 201, await self.create(rt, namespace, body, ctx)
                raise not_found(rt.plural, name, rt.group)
            base = self.scale_of(rt, current) if subresource == "scale" else current
            if ct == "application/json-patch+json":
                patched = patch.json_patch(base, body)
            elif ct == "application/merge-patch+json":
                patched = patch.merge_patch(base, body)
            else:
                patched = patch.strategic_merge_patch(
                    base, body, None if subresource == "scale" else schema
                )
            if not isinstance(patched, dict):
                raise bad_request("the patch did not result in an object")
            if subresource == "scale":
                return 200, await self._write_scale(rt, current, patched, ctx)
            patched_meta = patched.get("metadata") or {}
            if patched_meta.get("name", name) != name:
                raise invalid(
                    rt.kind,
                    name,
                    rt.group,
                    [
                        errors.invalid_value(
                            "metadata.name", patched_meta.get("name"), "field is immutable"
                        )
                    ],
                )
            expect = patched_meta.get("resourceVersion")
            explicit = expect is not None and expect != current["metadata"]["resourceVersion"]
            new = self._decode(rt, patched, namespace, ctx)
            try:
                return 200, await self._update(
                    rt,
                    current,
                    new,
                    ctx,
                    subresource=subresource,
                    expect_rv=expect if explicit else None,
                )
            except ApiError as exc:
                if exc.reason != "Conflict" or explicit:
                    raise
        raise conflict(rt.plural, name, rt.group)

    # --- scale -----------------------------------------------------------------------------

    def scale_of(self, rt: ResourceType, obj: Obj) -> Obj:
        meta = obj["metadata"]
        if rt.scale is not None:
            spec_replicas = crd.get_path(obj, rt.scale.spec_replicas)
            status_replicas = crd.get_path(obj, rt.scale.status_replicas)
            selector = crd.get_path(obj, rt.scale.label_selector) if rt.scale.label_selector else ""
        else:
            spec_replicas = (obj.get("spec") or {}).get("replicas", 0)
            status_replicas = (obj.get("status") or {}).get("replicas", 0)
            selector = label_selector_text((obj.get("spec") or {}).get("selector"))
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": spec_replicas or 0},
            "status": {"replicas": status_replicas or 0, "selector": selector or ""},
        }

    async def update_scale(
        self, rt: ResourceType, namespace: str, name: str, body: Any, ctx: Ctx
    ) -> Obj:
        live = self.live(rt, namespace, name)
        if not isinstance(body, dict):
            raise bad_request("the body of the request was not a Scale object")
        return await self._write_scale(rt, live, body, ctx)

    async def _write_scale(self, rt: ResourceType, live: Obj, scale: Obj, ctx: Ctx) -> Obj:
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise invalid(
                "Scale",
                live["metadata"]["name"],
                "autoscaling",
                [
                    errors.invalid_value(
                        "spec.replicas", replicas, "must be greater than or equal to 0"
                    )
                ],
            )
        expect = (scale.get("metadata") or {}).get("resourceVersion")
        if expect and expect != live["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, live["metadata"]["name"], rt.group)
        new = copy.deepcopy(live)
        if rt.scale is not None:
            crd.set_path(new, rt.scale.spec_replicas, replicas)
        else:
            new["spec"]["replicas"] = replicas
        stored = await self._update(rt, live, new, ctx, subresource="", expect_rv=None)
        return self.scale_of(rt, stored)

    # --- delete ----------------------------------------------------------------------------

    async def delete(
        self, rt: ResourceType, namespace: str, name: str, options: Obj, ctx: Ctx
    ) -> Obj:
        live = self.live(rt, namespace, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != live["metadata"].get("uid"):
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rt.group_resource} "{name}": Precondition '
                f"failed: UID in precondition: {pre['uid']}, UID in object meta: "
                f"{live['metadata'].get('uid')}",
            )
        if (
            pre.get("resourceVersion")
            and pre["resourceVersion"] != live["metadata"]["resourceVersion"]
        ):
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rt.group_resource} "{name}": Precondition '
                f"failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {live['metadata']['resourceVersion']}",
            )
        propagation = options.get("propagationPolicy")
        if propagation is None:
            orphan = options.get("orphanDependents")
            propagation = "Orphan" if orphan else "Background"
        if propagation not in ("Orphan", "Background", "Foreground"):
            raise invalid(
                "DeleteOptions",
                "",
                "",
                [
                    errors.unsupported(
                        "propagationPolicy",
                        propagation,
                        ["Foreground", "Background", "Orphan", "nil"],
                    )
                ],
            )
        grace = options.get("gracePeriodSeconds")
        if grace is not None and not isinstance(grace, int):
            raise bad_request("gracePeriodSeconds must be an integer")
        await self.admission.validate("DELETE", rt, None, live, ctx, subresource="")
        if ctx.dry_run:
            return live
        return self.delete_now(rt, live, propagation, grace)

    def _pod_needs_grace(self, pod: Obj, grace: int | None) -> bool:
        spec = pod.get("spec") or {}
        phase = (pod.get("status") or {}).get("phase")
        if grace is None:
            grace = int(spec.get("terminationGracePeriodSeconds") or 0)
        return bool(grace > 0 and spec.get("nodeName") and phase not in ("Succeeded", "Failed"))

    def delete_now(
        self, rt: ResourceType, live: Obj, propagation: str = "Background", grace: int | None = None
    ) -> Obj:
        """Delete (synchronously: no admission) with the given policy; returns the object."""
        meta = live["metadata"]
        if rt.kind == "Namespace":
            return self._delete_namespace(live)
        if rt.kind == "Pod":
            spec = live.get("spec") or {}
            wanted = int(
                grace if grace is not None else spec.get("terminationGracePeriodSeconds") or 0
            )
            if self._pod_needs_grace(live, wanted):
                current = meta.get("deletionGracePeriodSeconds")
                if current is not None and current <= wanted:
                    return live
                new = copy.deepcopy(live)
                new["metadata"]["deletionTimestamp"] = _iso(self.clock() + wanted)
                new["metadata"]["deletionGracePeriodSeconds"] = wanted
                return self.store.replace(rt.key, new)
        uid = meta.get("uid", "")
        if propagation == "Orphan":
            for dep_key, dep in self.store.dependents(uid):
                new = copy.deepcopy(dep)
                new["metadata"]["ownerReferences"] = [
                    r for r in new["metadata"].get("ownerReferences") or [] if r.get("uid") != uid
                ]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self.store.replace(dep_key, new)
        finalizers = list(meta.get("finalizers") or [])
        if propagation == "Foreground" and self.store.dependents(uid):
            new = copy.deepcopy(live)
            if "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
            new["metadata"]["finalizers"] = finalizers
            new["metadata"].setdefault("deletionTimestamp", self.now())
            new["metadata"].setdefault("deletionGracePeriodSeconds", 0)
            self.store.replace(rt.key, new)
            for dep_key, dep in self.store.dependents(uid):
                self._collect(dep_key, dep, uid)
            self._finish_foreground(uid)
            return self.store.get(rt.key, meta.get("namespace", ""), meta["name"]) or new
        if finalizers:
            if meta.get("deletionTimestamp"):
                return live
            new = copy.deepcopy(live)
            new["metadata"]["deletionTimestamp"] = self.now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            return self.store.replace(rt.key, new)
        return self._remove(rt, live)

    def _remove(self, rt: ResourceType, live: Obj) -> Obj:
        meta = live["metadata"]
        if rt.kind == crd.KIND:
            self._drop_custom_kinds(meta["name"])
        gone = self.store.remove(
            rt.key, meta.get("namespace", "") if rt.namespaced else "", meta["name"]
        )
        if rt.kind == "Service":
            self._release_service(live)
        uid = meta.get("uid", "")
        for dep_key, dep in self.store.dependents(uid):
            self._collect(dep_key, dep, uid)
        for ref in meta.get("ownerReferences") or []:
            self._finish_foreground(ref.get("uid", ""))
        ns = meta.get("namespace")
        if ns and rt.namespaced:
            self._finish_namespace(ns)
        return gone

    def _drop_custom_kinds(self, crd_name: str) -> None:
        """A CRD goes: its objects go first (finalizers are not waited for), then its kinds."""
        kinds = self.kinds.of_crd(crd_name)
        for key in {rt.key for rt in kinds}:
            for obj in self.store.objects(key):
                meta = obj["metadata"]
                if self.store.get(key, meta.get("namespace", ""), meta["name"]) is obj:
                    self._remove(kinds[0], obj)
        self.kinds.withdraw(crd_name)

    def _collect(self, dep_key: str, dep: Obj, owner_uid: str) -> None:
        """Garbage-collect a dependent of a deleted owner: delete it, or drop the dead reference."""
        refs = dep["metadata"].get("ownerReferences") or []
        alive = [
            r for r in refs if r.get("uid") != owner_uid and self._owner_alive(r.get("uid", ""))
        ]
        if alive:
            new = copy.deepcopy(dep)
            new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
            self.store.replace(dep_key, new)
            return
        if dep["metadata"].get("deletionTimestamp") and dep_key != "/pods":
            return
        self.delete_now(self._rt_of(dep_key), dep, "Background", None)

    def _owner_alive(self, uid: str) -> bool:
        found = self.store.by_uid(uid)
        return found is not None and not found[1]["metadata"].get("deletionTimestamp")

    def _finish_foreground(self, uid: str) -> None:
        found = self.store.by_uid(uid)
        if found is None:
            return
        key, owner = found
        meta = owner["metadata"]
        if "foregroundDeletion" not in (meta.get("finalizers") or []) or self.store.dependents(uid):
            return
        new = copy.deepcopy(owner)
        new["metadata"]["finalizers"] = [f for f in meta["finalizers"] if f != "foregroundDeletion"]
        if new["metadata"]["finalizers"]:
            self.store.replace(key, new)
        else:
            del new["metadata"]["finalizers"]
            self._remove(self._rt_of(key), self.store.replace(key, new))

    def _delete_namespace(self, live: Obj) -> Obj:
        name = live["metadata"]["name"]
        if name in SYSTEM_NAMESPACES:
            raise ApiError(
                403,
                "Forbidden",
                f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                details={"name": name, "kind": "namespaces"},
            )
        if not live["metadata"].get("deletionTimestamp"):
            new = copy.deepcopy(live)
            new["metadata"]["deletionTimestamp"] = self.now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new.setdefault("status", {})["phase"] = "Terminating"
            live = self.store.replace("/namespaces", new)
        for rt in self.kinds.all():
            if rt.namespaced:
                for obj in self.store.objects(rt.key, name):
                    if self.store.get(rt.key, name, obj["metadata"]["name"]) is obj:
                        self.delete_now(rt, obj, "Background", None)
        self._finish_namespace(name)
        return self.store.get("/namespaces", "", name) or live

    def _finish_namespace(self, namespace: str) -> None:
        ns = self.store.get("/namespaces", "", namespace)
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        for rt in self.kinds.all():
            if rt.namespaced and self.store.objects(rt.key, namespace):
                return
        self.store.remove("/namespaces", "", namespace)

    async def delete_collection(
        self,
        rt: ResourceType,
        namespace: str | None,
        *,
        labels: LabelSelector,
        fields: FieldSelector,
        options: Obj,
        ctx: Ctx,
    ) -> list[Obj]:
        objs, _ = self.list_objects(rt, namespace, labels=labels, fields=fields)
        out = []
        for obj in objs:
            try:
                out.append(
                    await self.delete(
                        rt,
                        obj["metadata"].get("namespace", ""),
                        obj["metadata"]["name"],
                        options,
                        ctx,
                    )
                )
            except ApiError as exc:
                if exc.code != 404:
                    raise
        return out

    # --- pods/eviction, pods/binding, serviceaccounts/token --------------------------------

    async def evict(self, namespace: str, name: str, body: Any, ctx: Ctx) -> Obj:
        rt = by_kind("", "Pod")
        assert rt is not None
        pod = self.live(rt, namespace, name)
        options = (body or {}).get("deleteOptions") or {} if isinstance(body, dict) else {}
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Running" and not pod["metadata"].get("deletionTimestamp"):
            labels = pod["metadata"].get("labels") or {}
            budgets = [
                b
                for b in self.store.objects("policy/poddisruptionbudgets", namespace)
                if (sel := from_label_selector_object((b.get("spec") or {}).get("selector")))
                is not None
                and matches_labels(sel, labels)
            ]
            if len(budgets) > 1:
                raise ApiError(
                    500,
                    "InternalError",
                    "This pod has more than one PodDisruptionBudget, which the eviction "
                    "subresource does not support.",
                )
            if budgets:
                budget = budgets[0]
                status = budget.get("status") or {}
                if int(status.get("disruptionsAllowed") or 0) <= 0:
                    msg = (
                        f"The disruption budget {budget['metadata']['name']} needs "
                        f"{status.get('desiredHealthy', 0)} healthy pods and has "
                        f"{status.get('currentHealthy', 0)} currently"
                    )
                    raise ApiError(
                        429,
                        "TooManyRequests",
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                        details={"causes": [{"reason": "DisruptionBudget", "message": msg}]},
                    )
                if not ctx.dry_run:
                    new = copy.deepcopy(budget)
                    st = new.setdefault("status", {})
                    st["disruptionsAllowed"] = int(st.get("disruptionsAllowed") or 0) - 1
                    st.setdefault("disruptedPods", {})[name] = self.now()
                    self.store.replace("policy/poddisruptionbudgets", new)
        await self.delete(rt, namespace, name, options, ctx)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }

    async def bind(self, namespace: str, name: str, body: Any, ctx: Ctx) -> Obj:
        rt = by_kind("", "Pod")
        assert rt is not None
        pod = self.live(rt, namespace, name)
        node = ((body or {}).get("target") or {}).get("name") if isinstance(body, dict) else None
        if not node:
            raise invalid("Binding", name, "", [required("target.name")])
        if (pod.get("spec") or {}).get("nodeName"):
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on pods/binding "{name}": pod {name} is already '
                f'assigned to node "{pod["spec"]["nodeName"]}"',
            )
        if not ctx.dry_run:
            new = copy.deepcopy(pod)
            new["spec"]["nodeName"] = node
            conditions = [
                c
                for c in new.setdefault("status", {}).get("conditions") or []
                if c.get("type") != "PodScheduled"
            ]
            conditions.append(
                {
                    "type": "PodScheduled",
                    "status": "True",
                    "lastTransitionTime": self.now(),
                    "lastProbeTime": None,
                }
            )
            new["status"]["conditions"] = conditions
            self.store.replace(rt.key, new)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }

    def token_request(self, namespace: str, name: str, body: Any) -> Obj:
        rt = by_kind("", "ServiceAccount")
        assert rt is not None
        account = self.live(rt, namespace, name)
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
        token, expires = self.authn.issue_service_account_token(
            namespace, name, account["metadata"]["uid"], seconds
        )
        spec.setdefault("audiences", ["https://kubernetes.default.svc.cluster.local"])
        spec["expirationSeconds"] = seconds
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": self.now()},
            "spec": spec,
            "status": {"token": token, "expirationTimestamp": _iso(expires)},
        }

    def self_subject_access_review(self, body: Any, user: User) -> Obj:
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
                        "exactly one of nonResourceAttributes or resourceAttributes must be "
                        "specified",
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
            attrs = Attributes(
                verb=non.get("verb", ""), path=non.get("path", ""), is_resource=False
            )
        allowed = self.authz.authorize(user, attrs)
        status: Obj = {"allowed": allowed}
        if allowed:
            status["reason"] = "allowed by RBAC" if not user.is_admin else "system:masters"
        return {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
