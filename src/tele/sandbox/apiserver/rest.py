"""REST semantics of the API: create, read, list, update, patch and delete.

This is where Kubernetes' rules for writes live: system metadata (uid, resourceVersion,
generation, timestamps), optimistic concurrency, the status and scale subresources, dry runs,
and the kinds that CustomResourceDefinitions add. Its parts live beside it: `bodies` (decoding,
defaults, validation), `service_addresses` (ClusterIPs, node ports), `deletion` (graceful
deletion, finalizers, garbage collection, namespaces), `subresources` (scale, eviction, binding),
`tokens` and `reviews`. It does no network I/O itself; admission webhooks are awaited through
the `Admission` interface.
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
from pathlib import Path
from typing import Any

from tele.jsonlimits import check_depth

from . import bodies, crd, errors, patch, payloads, reviews, schemas, subresources, tokens
from .auth import User
from .authenticator import Authenticator
from .context import Admission, NoAdmission, RequestContext, timestamp
from .deletion import SYSTEM_NAMESPACES, Deletion
from .errors import (
    StatusError,
    already_exists,
    bad_request,
    conflict,
    invalid,
    not_found,
)
from .kinds import KindRegistry, ResourceType, by_kind, kind_of
from .rbac import Authorizer, bootstrap_objects
from .selectors import (
    FieldSelector,
    LabelSelector,
    matches_fields,
    matches_labels,
)
from .service_addresses import ServiceAddresses
from .store import ApiObject, Store

log = logging.getLogger(__name__)

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_SYSTEM_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")
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


def _known(group: str, kind: str) -> ResourceType:
    found = by_kind(group, kind)
    assert found is not None, kind
    return found


_POD = _known("", "Pod")
_SERVICE_ACCOUNT = _known("", "ServiceAccount")


def _strip_rv(obj: ApiObject) -> ApiObject:
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
        token_file: Path | None = None,
    ) -> None:
        self.store = store or Store()
        self.kinds = KindRegistry()
        self.clock = clock
        self.services = ServiceAddresses(service_cidr)
        self.authn = Authenticator(
            self.store,
            admin_token or uuid.uuid4().hex,
            signing_key,
            clock=clock,
            token_file=token_file,
        )
        self.authz = Authorizer(self.store)
        self.admission: Admission = NoAdmission()
        self.ca_pem = ca_pem
        self.deletion = Deletion(self.store, self.kinds, self.services, clock)

    # --- bootstrap -------------------------------------------------------------------------

    def bootstrap(self) -> None:
        """The objects every cluster starts with: namespaces, API Service, default RBAC."""
        ctx = RequestContext(User("system:apiserver", ("system:masters",)))
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
                "clusterIP": str(self.services.ips.network.network_address + 1),
                "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
            },
        }
        self._create_now(kind_of("", "Service"), svc, ctx)
        if self.ca_pem:
            self._create_now(
                kind_of("", "ConfigMap"), self._extension_apiserver_authentication(), ctx
            )
        for obj in bootstrap_objects():
            resource_type = by_kind("rbac.authorization.k8s.io", obj["kind"])
            assert resource_type is not None
            self._create_now(resource_type, obj, ctx)

    def _extension_apiserver_authentication(self) -> ApiObject:
        """What aggregated API servers read to verify clients: the client CA (and the
        request-header settings of a front proxy, signed by the same CA here)."""
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
            "data": {
                "client-ca-file": self.ca_pem,
                "requestheader-client-ca-file": self.ca_pem,
                "requestheader-allowed-names": '["front-proxy-client"]',
                "requestheader-username-headers": '["X-Remote-User"]',
                "requestheader-group-headers": '["X-Remote-Group"]',
                "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
            },
        }

    def _create_now(
        self, resource_type: ResourceType, obj: ApiObject, ctx: RequestContext
    ) -> ApiObject:
        prepared = self._prepare_create(
            resource_type, copy.deepcopy(obj), obj["metadata"].get("namespace", ""), ctx
        )
        self._generate_name(prepared)
        bodies.check_valid(resource_type, prepared)
        return self._commit_create(resource_type, prepared, ctx)

    # --- helpers ---------------------------------------------------------------------------

    def now(self) -> str:
        return timestamp(self.clock())

    def _namespace_open(self, resource_type: ResourceType, namespace: str) -> None:
        if not resource_type.namespaced:
            return
        ns = self.store.get("/namespaces", "", namespace)
        if ns is None:
            raise not_found("namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise StatusError(
                403,
                "Forbidden",
                f'{resource_type.plural} "{{name}}" is forbidden: unable to create new content '
                f"in namespace {namespace} because it is being terminated",
            )

    def live(self, resource_type: ResourceType, namespace: str, name: str) -> ApiObject:
        obj = self.store.get(resource_type.key, namespace if resource_type.namespaced else "", name)
        if obj is None:
            raise not_found(resource_type.plural, name, resource_type.group)
        return obj

    # --- create ----------------------------------------------------------------------------

    @staticmethod
    def _generate_name(obj: ApiObject) -> None:
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                random.choice(_NAME_CHARS) for _ in range(5)
            )

    def _prepare_create(
        self, resource_type: ResourceType, body: Any, namespace: str, ctx: RequestContext
    ) -> ApiObject:
        # The decoded body is ours alone (freshly parsed, rebuilt by the schema walk): no copy.
        obj = bodies.decode(resource_type, body, namespace, ctx)
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
        if (
            resource_type.kind in _GENERATION_KINDS
            or resource_type.custom
            or resource_type.kind == crd.KIND
        ):
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if resource_type.custom and resource_type.has_status:
            obj.pop("status", None)  # only the status subresource writes it
        elif resource_type.has_status and resource_type.kind not in ("Namespace",):
            obj["status"] = self._initial_status(resource_type)
        bodies.apply_defaults(resource_type, obj)
        return obj

    def _initial_status(self, resource_type: ResourceType) -> ApiObject:
        if resource_type.kind == "Pod":
            return {"phase": "Pending", "qosClass": "BestEffort"}
        if resource_type.kind == "Service":
            return {"loadBalancer": {}}
        if resource_type.kind in ("ReplicaSet", "StatefulSet"):
            return {"replicas": 0, "availableReplicas": 0}
        if resource_type.kind == "PodDisruptionBudget":
            return {
                "disruptionsAllowed": 0,
                "currentHealthy": 0,
                "desiredHealthy": 0,
                "expectedPods": 0,
            }
        return {}

    async def create(
        self, resource_type: ResourceType, namespace: str, body: Any, ctx: RequestContext
    ) -> ApiObject:
        obj = self._prepare_create(resource_type, body, namespace, ctx)
        if resource_type.namespaced:
            self._namespace_open_named(resource_type, namespace, obj["metadata"].get("name", ""))
        obj = await self.admission.mutate("CREATE", resource_type, obj, None, ctx, subresource="")
        # Names from generateName are chosen after mutating admission, as the real server does.
        self._generate_name(obj)
        bodies.apply_defaults(resource_type, obj)
        bodies.check_valid(resource_type, obj)
        await self.admission.validate("CREATE", resource_type, obj, None, ctx, subresource="")
        return self._commit_create(resource_type, obj, ctx)

    def _namespace_open_named(self, resource_type: ResourceType, namespace: str, name: str) -> None:
        try:
            self._namespace_open(resource_type, namespace)
        except StatusError as exc:
            if exc.code == 403:
                exc.message = exc.message.replace("{name}", name)
            raise

    def _commit_create(
        self, resource_type: ResourceType, obj: ApiObject, ctx: RequestContext
    ) -> ApiObject:
        meta = obj["metadata"]
        ns = meta.get("namespace", "") if resource_type.namespaced else ""
        if self.store.get(resource_type.key, ns, meta["name"]) is not None:
            raise already_exists(resource_type.plural, meta["name"], resource_type.group)
        claimed: list[str] = []
        ports: list[int] = []
        if resource_type.kind == "Service":
            self.services.allocate(obj, None, claimed, ports)
        if resource_type.kind == crd.KIND:
            obj["status"] = crd.status(obj, self.now())
        if ctx.dry_run:
            self.services.undo(claimed, ports)
            return obj
        stored = self.store.create(resource_type.key, obj)
        self._after_create(resource_type, stored)
        return stored

    def _after_create(self, resource_type: ResourceType, obj: ApiObject) -> None:
        if resource_type.kind == crd.KIND:
            self.kinds.serve(obj["metadata"]["name"], crd.kinds_of(obj))
            return
        if resource_type.kind != "Namespace":
            return
        name = obj["metadata"]["name"]
        system = RequestContext(User("system:serviceaccount-controller", ("system:masters",)))
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

    # --- read ------------------------------------------------------------------------------

    def get(self, resource_type: ResourceType, namespace: str, name: str) -> ApiObject:
        return self.live(resource_type, namespace, name)

    def list_objects(
        self,
        resource_type: ResourceType,
        namespace: str | None,
        *,
        labels: LabelSelector = (),
        fields: FieldSelector = (),
        limit: int = 0,
        continue_token: str = "",
    ) -> tuple[list[ApiObject], ApiObject]:
        """Matching objects and the list metadata (resourceVersion, continue, remaining)."""
        start: tuple[str, str] | None = None
        if continue_token:
            try:
                raw = base64.urlsafe_b64decode(continue_token.encode())
                check_depth(raw, 2)
                data = json.loads(raw)
                start = (str(data["start"][0]), str(data["start"][1]))
            except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
                raise bad_request(f"continue key is not valid: {continue_token}") from None
        objs = self.store.objects(
            resource_type.key, namespace if resource_type.namespaced else None
        )
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
        meta: ApiObject = {"resourceVersion": str(self.store.resource_version)}
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
        resource_type: ResourceType,
        namespace: str,
        name: str,
        body: Any,
        ctx: RequestContext,
        *,
        subresource: str = "",
    ) -> ApiObject:
        live = self.live(resource_type, namespace, name)
        new = bodies.decode(resource_type, body, namespace, ctx)
        if new["metadata"].get("name") != name:
            raise bad_request(
                f"the name of the object ({new['metadata'].get('name')}) does not match the name "
                f"on the URL ({name})"
            )
        return await self._update(
            resource_type,
            live,
            new,
            ctx,
            subresource=subresource,
            expect_rv=new["metadata"].get("resourceVersion"),
        )

    async def _update(
        self,
        resource_type: ResourceType,
        live: ApiObject,
        new: ApiObject,
        ctx: RequestContext,
        *,
        subresource: str,
        expect_rv: str | None,
    ) -> ApiObject:
        name = live["metadata"]["name"]
        if expect_rv and expect_rv != live["metadata"]["resourceVersion"]:
            raise conflict(resource_type.plural, name, resource_type.group)
        new = copy.deepcopy(new)
        if subresource == "status":
            merged = {**copy.deepcopy(live), "status": new.get("status") or {}}
        else:
            merged = new
            if resource_type.has_status and "status" in live:
                merged["status"] = copy.deepcopy(live["status"])
            elif resource_type.has_status:
                merged.pop("status", None)
        meta = merged["metadata"]
        live_meta = live["metadata"]
        meta["name"] = name
        if resource_type.namespaced:
            meta["namespace"] = live_meta["namespace"]
        for key in _SYSTEM_META:
            if key in live_meta:
                meta[key] = live_meta[key]
            else:
                meta.pop(key, None)
        meta.pop("managedFields", None)
        meta["resourceVersion"] = live_meta["resourceVersion"]
        bodies.apply_defaults(resource_type, merged)
        if (
            resource_type.kind in _GENERATION_KINDS
            or resource_type.custom
            or resource_type.kind == crd.KIND
        ):
            generation = int(live_meta.get("generation") or 1)
            if self._spec_changed(merged, live):
                generation += 1
            meta["generation"] = generation
        merged = await self.admission.mutate(
            "UPDATE", resource_type, merged, live, ctx, subresource=subresource
        )
        bodies.apply_defaults(resource_type, merged)
        current = self.store.get(
            resource_type.key,
            live_meta.get("namespace", "") if resource_type.namespaced else "",
            name,
        )
        if current is None:
            raise not_found(resource_type.plural, name, resource_type.group)
        if current["metadata"]["resourceVersion"] != live_meta["resourceVersion"]:
            raise conflict(resource_type.plural, name, resource_type.group)
        bodies.check_valid(resource_type, merged, live)
        await self.admission.validate(
            "UPDATE", resource_type, merged, live, ctx, subresource=subresource
        )
        if _strip_rv(merged) == _strip_rv(live):
            return live
        claimed: list[str] = []
        ports: list[int] = []
        if resource_type.kind == "Service":
            self.services.allocate(merged, live, claimed, ports)
        if ctx.dry_run:
            self.services.undo(claimed, ports)
            return merged
        if resource_type.kind == "Service":
            self.services.release(live, keep=merged)
        if resource_type.kind == crd.KIND and subresource != "status":
            merged["status"] = crd.status(merged, self.now())
        stored = self.store.replace(resource_type.key, merged)
        if resource_type.kind == crd.KIND and not stored["metadata"].get("deletionTimestamp"):
            self.kinds.serve(name, crd.kinds_of(stored))
        if stored["metadata"].get("deletionTimestamp") and not stored["metadata"].get("finalizers"):
            pending_pod = resource_type.kind == "Pod" and self.deletion.pod_needs_grace(
                stored, None
            )
            if not pending_pod:
                return self.deletion.remove(resource_type, stored)
        return stored

    @staticmethod
    def _spec_changed(new: ApiObject, old: ApiObject) -> bool:
        skip = ("metadata", "status", "kind", "apiVersion")
        return {k: v for k, v in new.items() if k not in skip} != {
            k: v for k, v in old.items() if k not in skip
        }

    # --- patch -----------------------------------------------------------------------------

    async def patch(
        self,
        resource_type: ResourceType,
        namespace: str,
        name: str,
        content_type: str,
        raw: bytes,
        *,
        ctx: RequestContext,
        subresource: str = "",
        force: bool = False,
    ) -> tuple[int, ApiObject]:
        ct = content_type.split(";", maxsplit=1)[0].strip().lower()
        if ct == "application/apply-patch+yaml":
            body = await payloads.decode_yaml_off_loop(raw, "error decoding YAML")
        else:
            body = payloads.decode_json(raw, "error decoding patch")
        if ct not in (
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml",
        ):
            raise StatusError(
                415, "UnsupportedMediaType", f'the server does not support the patch type "{ct}"'
            )
        if ct == "application/strategic-merge-patch+json" and resource_type.custom:
            raise StatusError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                "include: application/json-patch+json, application/merge-patch+json, "
                "application/apply-patch+yaml",
            )
        if ct == "application/apply-patch+yaml" and not ctx.field_manager:
            raise bad_request("PATCH request with apply type must specify a fieldManager")
        schema = schemas.kind_schema(resource_type.group, resource_type.version, resource_type.kind)
        for _ in range(5):
            current = self.store.get(
                resource_type.key, namespace if resource_type.namespaced else "", name
            )
            if current is None:
                if ct == "application/apply-patch+yaml" and not subresource:
                    if isinstance(body, dict):
                        if body.get("metadata") is None:
                            body["metadata"] = {}
                        if isinstance(body["metadata"], dict):  # else refused by create
                            body["metadata"]["name"] = name
                    return 201, await self.create(resource_type, namespace, body, ctx)
                raise not_found(resource_type.plural, name, resource_type.group)
            base = (
                subresources.scale_of(resource_type, current) if subresource == "scale" else current
            )
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
                return 200, await self._write_scale(resource_type, current, patched, ctx)
            patched_meta = patched.get("metadata")
            if not isinstance(patched_meta, dict):
                patched_meta = {}  # bodies.decode refuses it below
            if patched_meta.get("name", name) != name:
                raise invalid(
                    resource_type.kind,
                    name,
                    resource_type.group,
                    [
                        errors.invalid_value(
                            "metadata.name", patched_meta.get("name"), "field is immutable"
                        )
                    ],
                )
            expect = patched_meta.get("resourceVersion")
            explicit = expect is not None and expect != current["metadata"]["resourceVersion"]
            new = bodies.decode(resource_type, patched, namespace, ctx)
            try:
                return 200, await self._update(
                    resource_type,
                    current,
                    new,
                    ctx,
                    subresource=subresource,
                    expect_rv=expect if explicit else None,
                )
            except StatusError as exc:
                if exc.reason != "Conflict" or explicit:
                    raise
        raise conflict(resource_type.plural, name, resource_type.group)

    # --- scale -----------------------------------------------------------------------------

    async def update_scale(
        self, resource_type: ResourceType, namespace: str, name: str, body: Any, ctx: RequestContext
    ) -> ApiObject:
        live = self.live(resource_type, namespace, name)
        if not isinstance(body, dict):
            raise bad_request("the body of the request was not a Scale object")
        return await self._write_scale(resource_type, live, body, ctx)

    async def _write_scale(
        self, resource_type: ResourceType, live: ApiObject, scale: ApiObject, ctx: RequestContext
    ) -> ApiObject:
        scale = bodies.decode_typed("autoscaling", "v1", "Scale", scale)
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
            raise conflict(resource_type.plural, live["metadata"]["name"], resource_type.group)
        new = copy.deepcopy(live)
        if resource_type.scale is not None:
            crd.set_path(new, resource_type.scale.spec_replicas, replicas)
        else:
            new["spec"]["replicas"] = replicas
        stored = await self._update(resource_type, live, new, ctx, subresource="", expect_rv=None)
        return subresources.scale_of(resource_type, stored)

    # --- delete ----------------------------------------------------------------------------

    async def delete(
        self,
        resource_type: ResourceType,
        namespace: str,
        name: str,
        options: ApiObject,
        ctx: RequestContext,
    ) -> ApiObject:
        live = self.live(resource_type, namespace, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != live["metadata"].get("uid"):
            raise StatusError(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {resource_type.group_resource} "
                f'"{name}": Precondition failed: UID in precondition: {pre["uid"]}, UID in object '
                f"meta: {live['metadata'].get('uid')}",
            )
        if (
            pre.get("resourceVersion")
            and pre["resourceVersion"] != live["metadata"]["resourceVersion"]
        ):
            raise StatusError(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {resource_type.group_resource} "
                f'"{name}": Precondition failed: ResourceVersion in precondition: '
                f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                f"{live['metadata']['resourceVersion']}",
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
        await self.admission.validate("DELETE", resource_type, None, live, ctx, subresource="")
        if ctx.dry_run:
            return live
        return self.deletion.delete_now(resource_type, live, propagation, grace)

    async def delete_collection(
        self,
        resource_type: ResourceType,
        namespace: str | None,
        *,
        labels: LabelSelector,
        fields: FieldSelector,
        options: ApiObject,
        ctx: RequestContext,
    ) -> list[ApiObject]:
        objs, _ = self.list_objects(resource_type, namespace, labels=labels, fields=fields)
        out = []
        for obj in objs:
            try:
                out.append(
                    await self.delete(
                        resource_type,
                        obj["metadata"].get("namespace", ""),
                        obj["metadata"]["name"],
                        options,
                        ctx,
                    )
                )
            except StatusError as exc:
                if exc.code != 404:
                    raise
        return out

    def delete_now(
        self,
        resource_type: ResourceType,
        live: ApiObject,
        propagation: str = "Background",
        grace: int | None = None,
    ) -> ApiObject:
        """Delete (synchronously: no admission) with the given policy; returns the object."""
        return self.deletion.delete_now(resource_type, live, propagation, grace)

    # --- pods/eviction, pods/binding, serviceaccounts/token, access reviews ----------------

    async def evict(self, namespace: str, name: str, body: Any, ctx: RequestContext) -> ApiObject:
        pod = self.live(_POD, namespace, name)
        body = bodies.decode_typed("policy", "v1", "Eviction", body)

        async def delete_pod(options: ApiObject) -> None:
            await self.delete(_POD, namespace, name, options, ctx)

        return await subresources.evict(self.store, pod, body, ctx, self.now(), delete_pod)

    async def bind(self, namespace: str, name: str, body: Any, ctx: RequestContext) -> ApiObject:
        pod = self.live(_POD, namespace, name)
        body = bodies.decode_typed("", "v1", "Binding", body)
        return subresources.bind(self.store, pod, body, ctx, self.now())

    def token_request(self, namespace: str, name: str, body: Any) -> ApiObject:
        account = self.live(_SERVICE_ACCOUNT, namespace, name)
        body = bodies.decode_typed("authentication.k8s.io", "v1", "TokenRequest", body)
        return tokens.token_request(
            self.authn.service_accounts, self.store, account, body, self.clock
        )

    def review(self, kind: str, body: Any, user: User) -> ApiObject:
        """A TokenReview, SubjectAccessReview or SelfSubjectAccessReview, answered."""
        authentication = kind in ("TokenReview", "SelfSubjectReview")
        group = "authentication.k8s.io" if authentication else "authorization.k8s.io"
        body = bodies.decode_typed(group, "v1", kind, body)
        if kind == "SelfSubjectReview":
            return reviews.self_subject_review(user)
        if kind == "TokenReview":
            return reviews.token_review(self.authn, body)
        if kind == "SelfSubjectRulesReview":
            return reviews.self_subject_rules_review(self.authz, body, user)
        if kind == "SubjectAccessReview":
            return reviews.subject_access_review(self.authz, body)
        return reviews.self_subject_access_review(self.authz, body, user)

    def self_subject_access_review(self, body: Any, user: User) -> ApiObject:
        return self.review("SelfSubjectAccessReview", body, user)
