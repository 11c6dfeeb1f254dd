"""Admission webhooks: mutating (in name order, JSONPatch applied) then validating, as Kubernetes
calls them.

Each matching webhook gets an `admission.k8s.io/v1` AdmissionReview over HTTPS verified with the
configuration's caBundle, within its timeoutSeconds. Rules, namespaceSelector and objectSelector
decide who is called; failurePolicy decides what a broken webhook means. Denials and failures carry
the API server's own wording (`admission webhook "x" denied the request: ...`,
`failed calling webhook "x": ...`).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from tele.jsonlimits import check_depth

from .certs import CertificateAuthority
from .context import RequestContext
from .errors import StatusError
from .kinds import ResourceType
from .patch import json_patch
from .payloads import MAX_DEPTH
from .rest import Api
from .selectors import from_label_selector_object, matches_labels

log = logging.getLogger(__name__)

ApiObject = dict[str, Any]
# (namespace, service name, port) -> (host, port) to dial for `clientConfig.service`.
ServiceResolver = Callable[[str, str, int], Awaitable[tuple[str, int]]]

_SKIPPED_KINDS = frozenset(
    {
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "SelfSubjectAccessReview",
        "SubjectAccessReview",
        "TokenReview",
        "SelfSubjectReview",
        "SelfSubjectRulesReview",
    }
)


@dataclass(frozen=True)
class _Request:
    """What is being admitted: operation, kind, new and old object, who asks, subresource."""

    op: str
    resource_type: ResourceType
    obj: ApiObject | None
    old: ApiObject | None
    ctx: RequestContext
    subresource: str


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    422: "Invalid",
    429: "TooManyRequests",
}


class WebhookFailure(Exception):
    """A webhook could not be called or answered nonsense (text after `failed calling webhook`)."""


def _rule_matches(rule: ApiObject, op: str, resource_type: ResourceType, subresource: str) -> bool:
    ops = rule.get("operations") or []
    if "*" not in ops and op not in ops:
        return False
    groups = rule.get("apiGroups") or []
    if "*" not in groups and resource_type.group not in groups:
        return False
    versions = rule.get("apiVersions") or []
    if "*" not in versions and resource_type.version not in versions:
        return False
    scope = rule.get("scope") or "*"
    if (scope == "Cluster" and resource_type.namespaced) or (
        scope == "Namespaced" and not resource_type.namespaced
    ):
        return False
    wanted = f"{resource_type.plural}/{subresource}" if subresource else resource_type.plural
    for pattern in rule.get("resources") or []:
        if pattern in ("*/*", wanted):
            return True
        if pattern == "*" and not subresource:
            return True
        name, _, sub = pattern.partition("/")
        if sub == "*" and name == resource_type.plural and subresource:
            return True
        if name == "*" and sub and sub == subresource:
            return True
    return False


class WebhookAdmission:
    """The `context.Admission` implementation backed by the stored webhook configurations."""

    def __init__(
        self,
        api: Api,
        ca: CertificateAuthority | None = None,
        service_resolver: ServiceResolver | None = None,
    ) -> None:
        self.api = api
        self.ca = ca
        self.service_resolver = service_resolver

    # --- matching --------------------------------------------------------------------------

    def _matches(self, hook: ApiObject, req: _Request) -> bool:
        op, resource_type, obj, old, subresource = (
            req.op,
            req.resource_type,
            req.obj,
            req.old,
            req.subresource,
        )
        if not any(
            _rule_matches(r, op, resource_type, subresource) for r in hook.get("rules") or []
        ):
            return False
        object_sel = from_label_selector_object(hook.get("objectSelector") or {})
        if object_sel:
            labels_new = ((obj or {}).get("metadata") or {}).get("labels")
            labels_old = ((old or {}).get("metadata") or {}).get("labels")
            if not (
                (obj is not None and matches_labels(object_sel, labels_new))
                or (old is not None and matches_labels(object_sel, labels_old))
            ):
                return False
        ns_sel = from_label_selector_object(hook.get("namespaceSelector") or {})
        if ns_sel:
            subject = obj or old or {}
            if resource_type.kind == "Namespace":
                labels = (subject.get("metadata") or {}).get("labels")
            elif resource_type.namespaced:
                ns = self.api.store.get(
                    "/namespaces", "", subject.get("metadata", {}).get("namespace", "")
                )
                labels = ((ns or {}).get("metadata") or {}).get("labels")
            else:
                return True
            if not matches_labels(ns_sel, labels):
                return False
        return True

    def _hooks(self, resource: str, req: _Request) -> list[ApiObject]:
        if req.resource_type.kind in _SKIPPED_KINDS:
            return []
        hooks = []
        for config in self.api.store.objects(resource):
            for hook in config.get("webhooks") or []:
                if self._matches(hook, req):
                    hooks.append(hook)
        return hooks

    # --- Admission interface ---------------------------------------------------------------

    async def mutate(
        self,
        op: str,
        resource_type: ResourceType,
        obj: ApiObject,
        old: ApiObject | None,
        ctx: RequestContext,
        *,
        subresource: str,
    ) -> ApiObject:
        resource = "admissionregistration.k8s.io/mutatingwebhookconfigurations"
        req = _Request(op, resource_type, obj, old, ctx, subresource)
        for hook in self._hooks(resource, req):
            response = await self._call(
                hook, _Request(op, resource_type, obj, old, ctx, subresource)
            )
            if response is None:
                continue
            if response.get("patch"):
                if response.get("patchType", "JSONPatch") != "JSONPatch":
                    raise self._failure(
                        hook, f"unsupported patch type {response.get('patchType')!r}"
                    )
                try:
                    raw_patch = base64.b64decode(response["patch"])
                    check_depth(raw_patch, MAX_DEPTH)
                    operations = json.loads(raw_patch)
                    patched = json_patch(obj, operations)
                except (ValueError, StatusError) as exc:
                    if hook.get("failurePolicy", "Fail") == "Ignore":
                        continue
                    raise StatusError(
                        500, "InternalError", f"Internal error occurred: JSON Patch: {exc}"
                    ) from None
                if isinstance(patched, dict):
                    obj = patched
        return obj

    async def validate(
        self,
        op: str,
        resource_type: ResourceType,
        obj: ApiObject | None,
        old: ApiObject | None,
        ctx: RequestContext,
        *,
        subresource: str,
    ) -> None:
        resource = "admissionregistration.k8s.io/validatingwebhookconfigurations"
        req = _Request(op, resource_type, obj, old, ctx, subresource)
        hooks = self._hooks(resource, req)
        if not hooks:
            return
        errors: list[BaseException] = []

        async def one(hook: ApiObject) -> None:
            try:
                await self._call(hook, req)
            except StatusError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for hook in hooks:
                nursery.start_soon(one, hook)
        if errors:
            raise errors[0]

    # --- calling ---------------------------------------------------------------------------

    def _failure(self, hook: ApiObject, text: str) -> StatusError:
        return StatusError(
            500,
            "InternalError",
            f'Internal error occurred: failed calling webhook "{hook.get("name")}": {text}',
        )

    async def _call(self, hook: ApiObject, req: _Request) -> ApiObject | None:
        """The webhook's `response`, None when ignored after a failure; raises on denial."""
        name = hook.get("name", "")
        try:
            response = await self._post(hook, self._review(req))
        except WebhookFailure as exc:
            if hook.get("failurePolicy", "Fail") == "Ignore":
                log.warning("webhook %s failed (ignored): %s", name, exc)
                return None
            raise self._failure(hook, str(exc)) from None
        for warning in response.get("warnings") or []:
            req.ctx.warnings.append(str(warning))
        if not response.get("allowed"):
            status = dict(response.get("status") or {})
            code = int(status.get("code") or 0)
            denied = f'admission webhook "{name}" denied the request'
            if status.get("message"):
                message = f"{denied}: {status['message']}"
            elif status.get("reason"):
                message = f"{denied}: {status['reason']}"
            else:
                message = f"{denied} without explanation"
            code = code if code >= 400 else 400
            reason = str(status.get("reason") or _REASONS.get(code, ""))
            raise StatusError(code, reason, message, details=status.get("details"))
        return response

    def _review(self, req: _Request) -> ApiObject:
        op, resource_type, obj, old, ctx, subresource = (
            req.op,
            req.resource_type,
            req.obj,
            req.old,
            req.ctx,
            req.subresource,
        )
        subject = obj or old or {}
        meta = subject.get("metadata") or {}
        gvk = {
            "group": resource_type.group,
            "version": resource_type.version,
            "kind": resource_type.kind,
        }
        gvr = {
            "group": resource_type.group,
            "version": resource_type.version,
            "resource": resource_type.plural,
        }
        option_kind = {
            "CREATE": "CreateOptions",
            "UPDATE": "UpdateOptions",
            "DELETE": "DeleteOptions",
        }.get(op, "CreateOptions")
        request: ApiObject = {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": meta.get("name", ""),
            "operation": op,
            "userInfo": ctx.user.info(),
            "object": obj,
            "oldObject": old,
            "dryRun": ctx.dry_run,
            "options": {"kind": option_kind, "apiVersion": "meta.k8s.io/v1"},
        }
        if ctx.field_manager and op != "DELETE":
            request["options"]["fieldManager"] = ctx.field_manager
        if subresource:
            request["subResource"] = subresource
            request["requestSubResource"] = subresource
        if resource_type.namespaced:
            request["namespace"] = meta.get("namespace", "")
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}

    async def _url(self, hook: ApiObject) -> tuple[str, str]:
        """(URL to connect to, URL as Kubernetes names it in errors)."""
        client = hook.get("clientConfig") or {}
        timeout = int(hook.get("timeoutSeconds") or 10)
        if client.get("url"):
            url = str(client["url"])
            return url, url
        service = client.get("service") or {}
        ns, svc = service.get("namespace", ""), service.get("name", "")
        port = int(service.get("port") or 443)
        path = service.get("path") or "/"
        shown = f"https://{svc}.{ns}.svc:{port}{path}?timeout={timeout}s"
        if self.service_resolver is None:
            raise WebhookFailure(
                f'failed to call webhook: Post "{shown}": service "{svc}" '
                f"in namespace {ns} is not reachable from the API server"
            )
        host, real_port = await self.service_resolver(ns, svc, port)
        return f"https://{host}:{real_port}{path}", shown

    def _ssl_context(self, hook: ApiObject) -> ssl.SSLContext:
        bundle = (hook.get("clientConfig") or {}).get("caBundle")
        if bundle:
            try:
                pem = base64.b64decode(bundle).decode()
                ctx = ssl.create_default_context(cadata=pem)
            except (ValueError, ssl.SSLError) as exc:
                raise WebhookFailure(f"failed to call webhook: invalid caBundle: {exc}") from None
        else:
            ctx = ssl.create_default_context()
        service = (hook.get("clientConfig") or {}).get("service")
        if service:
            # The certificate names the service DNS name, not the address we dial.
            ctx.check_hostname = False
        return ctx

    async def _post(self, hook: ApiObject, review: ApiObject) -> ApiObject:
        timeout = float(hook.get("timeoutSeconds") or 10)
        url, shown = await self._url(hook)
        ctx = self._ssl_context(hook)
        params = {"timeout": f"{int(timeout)}s"}
        try:
            with trio.fail_after(timeout):
                async with (
                    httpx.AsyncClient(verify=ctx, timeout=timeout) as client,
                    client.stream("POST", url, params=params, json=review) as resp,
                ):
                    content = await _read_bounded(resp)
        except trio.TooSlowError:
            raise WebhookFailure(
                f'failed to call webhook: Post "{shown}": context deadline exceeded'
            ) from None
        except httpx.HTTPError as exc:
            raise WebhookFailure(
                f'failed to call webhook: Post "{shown}": {exc or type(exc).__name__}'
            ) from None
        if resp.status_code != 200:
            raise WebhookFailure(
                f"received invalid webhook response: expected status 200, got {resp.status_code}"
            )
        if content is None:
            raise WebhookFailure(
                f"received invalid webhook response: larger than {_MAX_RESPONSE} bytes"
            )
        try:
            check_depth(content, MAX_DEPTH)
            body = json.loads(content)
        except ValueError as exc:  # TooDeep included
            raise WebhookFailure(f"received invalid webhook response: {exc}") from None
        response = body.get("response") if isinstance(body, dict) else None
        if (
            not isinstance(response, dict)
            or body.get("kind") != "AdmissionReview"
            or body.get("apiVersion") != "admission.k8s.io/v1"
        ):
            raise WebhookFailure(
                "received invalid webhook response: expected an admission.k8s.io/v1 AdmissionReview"
            )
        if response.get("uid") != review["request"]["uid"]:
            raise WebhookFailure(
                f'expected response.uid="{review["request"]["uid"]}", got "{response.get("uid")}"'
            )
        return response


_MAX_RESPONSE = 3 * 1024 * 1024
"""A webhook's AdmissionReview answer is read up to this size (a hostile or broken webhook
could otherwise stream into the API server's memory for its whole timeout)."""


async def _read_bounded(resp: httpx.Response) -> bytes | None:
    """The response body, or None past `_MAX_RESPONSE`."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.aiter_bytes():
        total += len(chunk)
        if total > _MAX_RESPONSE:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
