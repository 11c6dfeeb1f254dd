"""The HTTP face of the API server: an ASGI application speaking Kubernetes' REST dialect.

It authenticates bearer tokens, authorizes with RBAC, routes `/api` and `/apis` paths to the
`rest.Api`, negotiates Table output for `kubectl get`, streams watches as newline-delimited JSON,
and serves discovery and OpenAPI. Every failure becomes a `Status` body; an unexpected exception
in one request is logged and answered with 500 without touching any other request.
"""

from __future__ import annotations

import functools
import logging
import math
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from . import crd, discovery, payloads, protobuf, schemas, subresources
from .auth import User
from .context import RequestContext
from .errors import StatusError, bad_request, gone, method_not_allowed
from .kinds import RESOURCES, ResourceType, by_plural
from .rbac import Attributes
from .rest import Api
from .selectors import (
    matches_fields,
    matches_labels,
    parse_field_selector,
    parse_label_selector,
)
from .store import ApiObject, Event, TooOld
from .table import table

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024
MAX_DRAIN = 32 * 1024 * 1024
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]

_encoder = msgspec.json.Encoder()
_PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version", "/version/"})
CLIENT_CERTIFICATE_USER = "tele.client_certificate_user"
"""Scope key: the user of the connection's verified client certificate (set by `server`)."""
_WATCH_QUEUE = 4096
_REVIEWS = frozenset(
    {
        "SelfSubjectAccessReview",
        "SelfSubjectRulesReview",
        "SubjectAccessReview",
        "TokenReview",
        "SelfSubjectReview",
    }
)
"""Kinds whose create is a question answered in `status`, never stored."""
_LINE_CACHE = 256


class Disconnected(Exception):
    """The client went away while we were reading its request."""


@dataclass
class Request:
    """One parsed request; handed to subresource handlers registered by later parts."""

    scope: dict[str, Any]
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    user: User | None = None
    resource_type: ResourceType | None = None
    namespace: str = ""
    name: str = ""
    subresource: str = ""
    api: Api | None = None
    warnings: list[str] = field(default_factory=list)


SubresourceHandler = Callable[[Request, ASGIReceive, ASGISend], Awaitable[None]]


def _json_body(code: int, obj: Any) -> tuple[int, bytes]:
    return code, _encoder.encode(obj)


class ApiApp:
    """ASGI callable. `bookmark_interval` is how often idle watches get a BOOKMARK."""

    def __init__(
        self, api: Api, *, server_address: str = "127.0.0.1:6443", bookmark_interval: float = 60.0
    ) -> None:
        self.api = api
        self.server_address = server_address
        self.bookmark_interval = bookmark_interval
        # (resource, subresource) -> handler, e.g. ("pods", "log"); filled in by the node part.
        self.subresource_handlers: dict[tuple[str, str], SubresourceHandler] = {}
        # Recently encoded watch lines by (event type, object identity); stored objects are
        # never mutated, and the object is kept so its id cannot be reused while cached.
        self._lines: OrderedDict[tuple[str, int], tuple[ApiObject, bytes]] = OrderedDict()
        # Aggregated discovery and custom OpenAPI documents, valid for one KindRegistry
        # generation (CRDs change what is served).
        self._derived: dict[tuple[object, ...], Any] = {}
        self._derived_generation = -1

    def _cached(self, key: tuple[object, ...], make: Callable[[], Any]) -> Any:
        if self._derived_generation != self.api.kinds.generation:
            self._derived = {}
            self._derived_generation = self.api.kinds.generation
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    # --- ASGI entry ------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind == "websocket":
            try:
                await self._websocket(scope, receive, send)
            except Exception:
                # The handler's own failure: this connection ends, the server goes on.
                log.exception("internal error serving websocket %s", scope.get("path"))
            return
        if kind != "http":
            return
        started = False

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        method, path = scope.get("method", "?"), scope.get("path", "?")
        req: Request | None = None
        try:
            req = self._parse(scope)
            await self._handle(req, receive, tracked_send)
        except Disconnected:
            return
        except StatusError as exc:
            if started:  # a watch's stream already answered 200: nothing left to say
                log.warning("%s %s failed after its response started: %s", method, path, exc)
                return
            await self._send_failure(send, exc, req.warnings if req else None)
        except Exception:
            # The request boundary: whatever went wrong ends this request alone, with its
            # traceback in the log and a Status for the client; the server keeps serving.
            log.exception("internal error serving %s %s", method, path)
            if started:
                return
            internal = StatusError(
                500,
                "InternalError",
                "an error on the server has prevented the request from succeeding",
            )
            await self._send_failure(send, internal, None)

    async def _send_failure(
        self, send: ASGISend, error: StatusError, warnings: list[str] | None
    ) -> None:
        try:
            await self._send(send, error.code, error.status(), warnings)
        except Exception as exc:  # the client is gone; its request ends here all the same
            log.debug("could not send the %d answer: %r", error.code, exc)

    def _parse(self, scope: dict[str, Any]) -> Request:
        raw_query = scope.get("query_string", b"").decode("latin-1")
        query = {
            k: v[-1] for k, v in urllib.parse.parse_qs(raw_query, keep_blank_values=True).items()
        }
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        path = scope.get("path", "/")
        if len(path) > 1:
            path = path.rstrip("/")
        return Request(scope, scope.get("method", "GET"), path, query, headers, api=self.api)

    async def _send(
        self,
        send: ASGISend,
        code: int,
        obj: Any,
        warnings: list[str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        body = obj if isinstance(obj, bytes) else _encoder.encode(obj)
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-cache, private"),
        ]
        for text in warnings or []:
            headers.append((b"warning", ('299 - "' + text.replace('"', '\\"') + '"').encode()))
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _authenticate(self, req: Request) -> User | None:
        """The client certificate's user (verified by TLS), else the bearer token's."""
        certified = req.scope.get(CLIENT_CERTIFICATE_USER)
        if isinstance(certified, User):
            return certified
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.api.authn.authenticate(token.strip())

    # --- routing ---------------------------------------------------------------------------

    async def _handle(self, req: Request, receive: ASGIReceive, send: ASGISend) -> None:
        req.user = self._authenticate(req)
        if req.user is None and req.path not in _PUBLIC_PATHS:
            raise StatusError(401, "Unauthorized", "Unauthorized")
        path = req.path
        if path in ("/healthz", "/livez", "/readyz"):
            await self._send(send, 200, b"ok", content_type="text/plain; charset=utf-8")
            return
        if path in ("/version", "/version/"):
            await self._send(send, 200, discovery.KUBE_VERSION)
            return
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if parts[0] in ("api", "apis") and len(parts) >= 1:
            await self._api_path(req, parts, receive, send)
            return
        if parts[0] == "openapi":
            self._authorize_path(req)
            await self._openapi(req, parts, send)
            return
        self._authorize_path(req)
        raise StatusError(404, "NotFound", "the server could not find the requested resource")

    def _authorize_path(self, req: Request) -> None:
        assert req.user is not None
        verb = {
            "GET": "get",
            "HEAD": "get",
            "POST": "post",
            "PUT": "put",
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(req.method, req.method.lower())
        attrs = Attributes(verb=verb, path=req.path, is_resource=False)
        if not self.api.authz.authorize(req.user, attrs):
            raise StatusError(403, "Forbidden", f"forbidden: {attrs.forbidden_text(req.user)}")

    async def _api_path(
        self, req: Request, parts: list[str], receive: ASGIReceive, send: ASGISend
    ) -> None:
        if parts[0] == "api":
            group = ""
            rest = parts[1:]
            if not rest:
                self._authorize_path(req)
                await self._discovery_root(req, send, core=True)
                return
            version, rest = rest[0], rest[1:]
        else:
            rest = parts[1:]
            if not rest:
                self._authorize_path(req)
                await self._discovery_root(req, send, core=False)
                return
            group = rest[0]
            if len(rest) == 1:
                self._authorize_path(req)
                doc = discovery.api_group(group, self.api.kinds.all())
                if doc is None:
                    raise StatusError(
                        404, "NotFound", "the server could not find the requested resource"
                    )
                await self._send(send, 200, doc)
                return
            version, rest = rest[1], rest[2:]
        if not rest:
            self._authorize_path(req)
            resources = discovery.resource_list(group, version, self.api.kinds.all())
            if resources is None:
                raise StatusError(
                    404, "NotFound", "the server could not find the requested resource"
                )
            await self._send(send, 200, resources)
            return
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if len(rest) > 3:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        resource_type = self.api.kinds.by_plural(group, version, plural)
        if resource_type is None:
            if not any(g == group and v == version for g, v in self.api.kinds.group_versions()):
                raise StatusError(
                    404, "NotFound", "the server could not find the requested resource"
                )
            raise StatusError(
                404,
                "NotFound",
                "the server could not find the requested resource (get "
                f"{plural}{'.' + group if group else ''})",
            )
        if namespace and not resource_type.namespaced:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        if sub and sub not in resource_type.subresources:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        req.resource_type, req.namespace, req.name, req.subresource = (
            resource_type,
            namespace,
            name,
            sub,
        )
        await self._resource(req, receive, send)

    async def _discovery_root(self, req: Request, send: ASGISend, *, core: bool) -> None:
        accept = req.headers.get("accept", "")
        for clause in accept.split(","):
            params = {
                k.strip(): v.strip()
                for k, _, v in (p.partition("=") for p in clause.split(";")[1:])
            }
            if (
                params.get("g") == "apidiscovery.k8s.io"
                and params.get("as") == "APIGroupDiscoveryList"
            ):
                version = params.get("v", "")
                if version in ("v2", "v2beta1"):
                    ct = (
                        f"application/json;g=apidiscovery.k8s.io;v={version};"
                        "as=APIGroupDiscoveryList"
                    )
                    doc = self._cached(
                        ("aggregated", core, version),
                        functools.partial(
                            discovery.aggregated, core, version, self.api.kinds.all()
                        ),
                    )
                    await self._send(send, 200, doc, content_type=ct)
                    return
        if core:
            await self._send(send, 200, discovery.core_versions(self.server_address))
        else:
            await self._send(send, 200, discovery.group_list(self.api.kinds.all()))

    # --- OpenAPI ---------------------------------------------------------------------------

    def _all_openapi_docs(self) -> dict[str, tuple[bytes, str]]:
        """Built-in documents (made once) and those of the custom group/versions served now."""
        custom = self.api.kinds.custom()

        def make() -> dict[str, tuple[bytes, str]]:
            docs = dict(self._openapi_docs)
            for group, version in dict.fromkeys(
                (resource_type.group, resource_type.version) for resource_type in custom
            ):
                kinds = [
                    resource_type
                    for resource_type in custom
                    if (resource_type.group, resource_type.version) == (group, version)
                ]
                doc = crd.openapi_v3_document(kinds)
                docs[f"apis/{group}/{version}"] = (
                    _encoder.encode(doc),
                    schemas.document_hash(doc),
                )
            return docs

        docs: dict[str, tuple[bytes, str]] = self._cached(("openapi",), make)
        return docs

    @functools.cached_property
    def _openapi_docs(self) -> dict[str, tuple[bytes, str]]:
        docs: dict[str, tuple[bytes, str]] = {}
        for group, version in dict.fromkeys(
            (resource_type.group, resource_type.version) for resource_type in RESOURCES
        ):
            rts = [
                (resource_type.plural, resource_type.kind, resource_type.namespaced)
                for resource_type in RESOURCES
                if resource_type.group == group and resource_type.version == version
            ]
            doc = schemas.openapi_v3_document(group, version, rts)
            key = f"api/{version}" if not group else f"apis/{group}/{version}"
            body = _encoder.encode(doc)
            docs[key] = (body, schemas.document_hash(doc))
        return docs

    async def _openapi(self, req: Request, parts: list[str], send: ASGISend) -> None:
        if parts == ["openapi", "v2"]:
            # An empty protobuf message is a valid (empty) OpenAPI v2 document: kubectl then
            # relies on v3 and on server-side field validation.
            await self._send(send, 200, b"", content_type="application/octet-stream")
            return
        if parts == ["openapi", "v3"]:
            docs = await trio.to_thread.run_sync(self._all_openapi_docs)
            paths = {
                key: {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest}"}
                for key, (_, digest) in docs.items()
            }
            await self._send(send, 200, {"paths": paths})
            return
        if parts[:2] == ["openapi", "v3"]:
            docs = await trio.to_thread.run_sync(self._all_openapi_docs)
            found = docs.get("/".join(parts[2:]))
            if found is not None:
                await self._send(send, 200, found[0])
                return
        raise StatusError(404, "NotFound", "the server could not find the requested resource")

    # --- resources -------------------------------------------------------------------------

    def _ctx(self, req: Request) -> RequestContext:
        assert req.user is not None
        q = req.query
        dry_run = q.get("dryRun", "")
        if dry_run not in ("", "All"):
            raise bad_request(f'dryRun: Unsupported value: "{dry_run}": supported values: "All"')
        validation = q.get("fieldValidation", "") or "Warn"
        if validation not in ("Strict", "Warn", "Ignore"):
            raise bad_request(
                f'fieldValidation: Unsupported value: "{validation}": supported values: '
                '"Ignore", "Strict", "Warn"'
            )
        return RequestContext(
            req.user, dry_run == "All", validation, q.get("fieldManager", ""), req.warnings
        )

    def _delete_ctx(self, req: Request, options: ApiObject) -> RequestContext:
        """DeleteOptions may carry dryRun in the body instead of the query."""
        ctx = self._ctx(req)
        if "All" in (options.get("dryRun") or []):
            ctx.dry_run = True
        return ctx

    def _verb(self, req: Request) -> str:
        m = req.method
        if m in ("GET", "HEAD"):
            if req.name:
                return "get"
            return "watch" if req.query.get("watch") in ("true", "1") else "list"
        if m == "POST":
            return "create"
        if m in ("PUT", "PATCH") and not req.name:
            raise method_not_allowed()
        if m == "PUT":
            return "update"
        if m == "PATCH":
            return "patch"
        if m == "DELETE":
            return "delete" if req.name else "deletecollection"
        raise method_not_allowed()

    async def _resource(self, req: Request, receive: ASGIReceive, send: ASGISend) -> None:
        resource_type = req.resource_type
        assert resource_type is not None and req.user is not None
        if req.method == "POST" and req.name and not req.subresource:
            raise method_not_allowed()
        verb = self._verb(req)
        if resource_type.kind in _REVIEWS:
            if verb != "create":
                raise method_not_allowed()
        elif verb not in resource_type.verbs and not req.subresource:
            raise method_not_allowed()
        attrs = Attributes(
            verb=verb,
            api_group=resource_type.group,
            resource=resource_type.plural,
            subresource=req.subresource,
            namespace=req.namespace,
            name=req.name,
        )
        if not self.api.authz.authorize(req.user, attrs):
            target = (
                f'{resource_type.group_resource} "{req.name}"'
                if req.name
                else resource_type.group_resource
            )
            raise StatusError(
                403,
                "Forbidden",
                f"{target} is forbidden: {attrs.forbidden_text(req.user)}",
                details={
                    "name": req.name,
                    "group": resource_type.group,
                    "kind": resource_type.plural,
                }
                if req.name
                else {"group": resource_type.group, "kind": resource_type.plural},
            )
        handler = (
            self.subresource_handlers.get((resource_type.plural, req.subresource))
            if req.subresource
            else None
        )
        if handler is not None:
            await handler(req, receive, send)
            return
        if req.subresource:
            await self._subresource(req, verb, receive, send)
            return
        if verb == "list":
            await self._list(req, send)
        elif verb == "watch":
            await self._watch(req, receive, send)
        elif verb == "get":
            await self._respond_object(
                req, send, 200, self.api.get(resource_type, req.namespace, req.name)
            )
        elif verb == "create":
            body = await self._read_json(req, receive)
            if resource_type.kind in _REVIEWS:
                await self._send(send, 201, self.api.review(resource_type.kind, body, req.user))
                return
            if not resource_type.namespaced:
                req.namespace = ""
            obj = await self.api.create(resource_type, req.namespace, body, self._ctx(req))
            await self._respond_object(req, send, 201, obj)
        elif verb == "update":
            await self._update(req, receive, send)
        elif verb == "patch":
            await self._patch(req, receive, send)
        elif verb == "delete":
            options = await self._delete_options(req, receive)
            obj = await self.api.delete(
                resource_type, req.namespace, req.name, options, self._delete_ctx(req, options)
            )
            await self._respond_object(req, send, 200, obj)
        elif verb == "deletecollection":
            options = await self._delete_options(req, receive)
            labels, fields = self._selectors(req)
            objs = await self.api.delete_collection(
                resource_type,
                req.namespace if resource_type.namespaced else None,
                labels=labels,
                fields=fields,
                options=options,
                ctx=self._delete_ctx(req, options),
            )
            await self._send(
                send,
                200,
                {
                    "kind": f"{resource_type.kind}List",
                    "apiVersion": resource_type.api_version,
                    "metadata": {},
                    "items": objs,
                },
                req.warnings,
            )

    async def _update(
        self, req: Request, receive: ASGIReceive, send: ASGISend, *, subresource: str = ""
    ) -> None:
        """PUT of an object (or of its `subresource`): the stored object, 200."""
        assert req.resource_type is not None
        body = await self._read_json(req, receive)
        obj = await self.api.update(
            req.resource_type,
            req.namespace,
            req.name,
            body,
            self._ctx(req),
            subresource=subresource,
        )
        await self._respond_object(req, send, 200, obj)

    async def _patch(
        self, req: Request, receive: ASGIReceive, send: ASGISend, *, subresource: str = ""
    ) -> None:
        """PATCH of an object (or of its `subresource`: always 200 then); an apply patch of an
        object that does not exist creates it (201), `?force=true` takes its fields over."""
        assert req.resource_type is not None
        raw = await self._read_body(req, receive)
        code, obj = await self.api.patch(
            req.resource_type,
            req.namespace,
            req.name,
            req.headers.get("content-type", ""),
            raw,
            ctx=self._ctx(req),
            subresource=subresource,
            force=not subresource and req.query.get("force") == "true",
        )
        await self._respond_object(req, send, code, obj)

    async def _subresource(
        self, req: Request, verb: str, receive: ASGIReceive, send: ASGISend
    ) -> None:
        resource_type, sub = req.resource_type, req.subresource
        assert resource_type is not None
        if sub == "status":
            if verb == "get":
                await self._respond_object(
                    req, send, 200, self.api.get(resource_type, req.namespace, req.name)
                )
            elif verb == "update":
                await self._update(req, receive, send, subresource="status")
            elif verb == "patch":
                await self._patch(req, receive, send, subresource="status")
            else:
                raise method_not_allowed()
        elif sub == "scale":
            if verb == "get":
                await self._send(
                    send,
                    200,
                    subresources.scale_of(
                        resource_type, self.api.get(resource_type, req.namespace, req.name)
                    ),
                )
            elif verb == "update":
                body = await self._read_json(req, receive)
                await self._send(
                    send,
                    200,
                    await self.api.update_scale(
                        resource_type, req.namespace, req.name, body, self._ctx(req)
                    ),
                    req.warnings,
                )
            elif verb == "patch":
                raw = await self._read_body(req, receive)
                _, obj = await self.api.patch(
                    resource_type,
                    req.namespace,
                    req.name,
                    req.headers.get("content-type", ""),
                    raw,
                    ctx=self._ctx(req),
                    subresource="scale",
                )
                await self._send(send, 200, obj, req.warnings)
            else:
                raise method_not_allowed()
        elif sub == "eviction" and verb == "create":
            body = await self._read_json(req, receive)
            await self._send(
                send, 201, await self.api.evict(req.namespace, req.name, body, self._ctx(req))
            )
        elif sub == "binding" and verb == "create":
            body = await self._read_json(req, receive)
            await self._send(
                send, 201, await self.api.bind(req.namespace, req.name, body, self._ctx(req))
            )
        elif sub == "token" and verb == "create":
            body = await self._read_json(req, receive)
            await self._send(send, 201, self.api.token_request(req.namespace, req.name, body))
        elif resource_type.plural == "pods" and sub in ("log", "exec", "attach", "portforward"):
            pod = self.api.get(resource_type, req.namespace, req.name)
            if not (pod.get("spec") or {}).get("nodeName"):
                raise bad_request(f"pod {req.name} does not have a host assigned")
            handler = self.subresource_handlers.get((resource_type.plural, sub))
            if handler is not None and verb == "get":
                await handler(req, receive, send)
                return
            raise bad_request(
                f"{sub} is not available for pod {req.name}: the sandbox node is not running"
            )
        else:
            raise method_not_allowed()

    async def _websocket(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        """Websocket upgrades (exec, attach, portforward) go to handlers the node registers,
        once authenticated and authorized (`create` on the subresource) as any request."""
        req = self._parse(scope)
        req.user = self._authenticate(req)
        if req.user is None:
            await self._deny_upgrade(scope, send, StatusError(401, "Unauthorized", "Unauthorized"))
            return
        parts = req.path.strip("/").split("/")
        handler = None
        if len(parts) == 7 and parts[:2] == ["api", "v1"] and parts[2] == "namespaces":
            resource_type = by_plural("", "v1", parts[4])
            if resource_type is not None:
                req.resource_type, req.namespace, req.name, req.subresource = (
                    resource_type,
                    parts[3],
                    parts[5],
                    parts[6],
                )
                attrs = Attributes(
                    verb="create",
                    resource=resource_type.plural,
                    subresource=parts[6],
                    namespace=parts[3],
                    name=parts[5],
                )
                if not self.api.authz.authorize(req.user, attrs):
                    forbidden = StatusError(
                        403,
                        "Forbidden",
                        f'{resource_type.plural} "{parts[5]}" is forbidden: '
                        f"{attrs.forbidden_text(req.user)}",
                        details={"name": parts[5], "kind": resource_type.plural},
                    )
                    await self._deny_upgrade(scope, send, forbidden)
                    return
                handler = self.subresource_handlers.get((resource_type.plural, parts[6]))
        if handler is None:
            await send({"type": "websocket.close", "code": 1008})
            return
        await handler(req, receive, send)

    async def _deny_upgrade(
        self, scope: dict[str, Any], send: ASGISend, error: StatusError
    ) -> None:
        """Refuse an upgrade with the HTTP answer and Status body the real API server gives
        (ASGI's websocket denial response), or a close where the server cannot send one."""
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        body = _encoder.encode(error.status())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send(
            {"type": "websocket.http.response.start", "status": error.code, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})

    # --- bodies ----------------------------------------------------------------------------

    async def _read_body(self, req: Request, receive: ASGIReceive) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected()
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > MAX_BODY:
                # Read (and drop) the rest so the client gets its answer on a healthy
                # connection; past the drain limit the connection is given up.
                with trio.move_on_after(10):
                    while message.get("more_body") and total < MAX_DRAIN:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            raise Disconnected()
                        total += len(message.get("body", b""))
                raise StatusError(
                    413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_BODY}"
                )
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _read_json(self, req: Request, receive: ASGIReceive) -> Any:
        body = await self._decode_body(req, await self._read_body(req, receive))
        payloads.check_type_meta(body)
        return body

    async def _decode_body(self, req: Request, raw: bytes) -> Any:
        ct = req.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ct in ("application/yaml", "application/x-yaml", "text/yaml"):
            return await payloads.decode_yaml_off_loop(raw)
        if ct == "application/vnd.kubernetes.protobuf":
            return protobuf.decode(raw)
        if ct not in ("application/json", "", "*/*"):
            raise StatusError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                f'include: application/json, application/yaml; got "{ct}"',
            )
        return payloads.decode_json(raw)

    async def _delete_options(self, req: Request, receive: ASGIReceive) -> ApiObject:
        raw = await self._read_body(req, receive)
        options: ApiObject = {}
        ct = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if raw and ct == "application/vnd.kubernetes.protobuf":
            options = protobuf.decode(raw)
            options.pop("apiVersion", None)
            options.pop("kind", None)
        elif raw.strip():
            decoded = payloads.decode_json(raw)
            if not isinstance(decoded, dict):
                raise bad_request("the body of the request was not a DeleteOptions object")
            options = decoded
        q = req.query
        if "propagationPolicy" in q:
            options["propagationPolicy"] = q["propagationPolicy"]
        if "gracePeriodSeconds" in q:
            try:
                options["gracePeriodSeconds"] = int(q["gracePeriodSeconds"])
            except ValueError:
                raise bad_request(
                    f'gracePeriodSeconds: invalid value "{q["gracePeriodSeconds"]}"'
                ) from None
        if "orphanDependents" in q:
            options["orphanDependents"] = q["orphanDependents"] == "true"
        return options

    # --- output ----------------------------------------------------------------------------

    def _wants_table(self, req: Request) -> bool:
        accept = req.headers.get("accept", "")
        for clause in accept.split(","):
            params = {
                k.strip(): v.strip()
                for k, _, v in (p.partition("=") for p in clause.split(";")[1:])
            }
            if params.get("as") == "Table" and params.get("g") == "meta.k8s.io":
                return True
        return False

    async def _respond_object(
        self, req: Request, send: ASGISend, code: int, obj: ApiObject
    ) -> None:
        if self._wants_table(req) and req.resource_type is not None:
            meta = {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
            await self._send(send, code, self._table(req.resource_type, [obj], meta), req.warnings)
            return
        await self._send(send, code, obj, req.warnings)

    def _table(
        self, resource_type: ResourceType, objs: list[ApiObject], meta: ApiObject
    ) -> ApiObject:
        printer = resource_type.printer_columns if resource_type.custom else None
        return table(resource_type.kind, objs, meta, self.api.clock(), printer=printer)

    def _selectors(self, req: Request) -> tuple[Any, Any]:
        resource_type = req.resource_type
        assert resource_type is not None
        labels = parse_label_selector(req.query.get("labelSelector", ""))
        fields = parse_field_selector(
            req.query.get("fieldSelector", ""), resource_type.supports_field
        )
        return labels, fields

    async def _list(self, req: Request, send: ASGISend) -> None:
        resource_type = req.resource_type
        assert resource_type is not None
        labels, fields = self._selectors(req)
        try:
            limit = int(req.query.get("limit") or 0)
        except ValueError:
            raise bad_request(f'limit: invalid value "{req.query.get("limit")}"') from None
        namespace = req.namespace if resource_type.namespaced and req.namespace else None
        objs, meta = self.api.list_objects(
            resource_type,
            namespace,
            labels=labels,
            fields=fields,
            limit=max(limit, 0),
            continue_token=req.query.get("continue", ""),
        )
        if self._wants_table(req):
            body = self._table(resource_type, objs, meta)
        else:
            body = {
                "kind": f"{resource_type.kind}List",
                "apiVersion": resource_type.api_version,
                "metadata": meta,
                "items": objs,
            }
        await self._send(send, 200, body, req.warnings)

    # --- watch -----------------------------------------------------------------------------

    async def _watch(self, req: Request, receive: ASGIReceive, send: ASGISend) -> None:
        resource_type = req.resource_type
        assert resource_type is not None
        labels, fields = self._selectors(req)
        store = self.api.store
        namespace = req.namespace if resource_type.namespaced and req.namespace else None
        rv_text = req.query.get("resourceVersion", "")
        try:
            timeout = float(req.query.get("timeoutSeconds") or 0)
        except ValueError:
            raise bad_request("timeoutSeconds: invalid value") from None
        bookmarks = req.query.get("allowWatchBookmarks") == "true"
        as_table = self._wants_table(req)
        if rv_text not in ("", "0") and not rv_text.isdigit():
            raise bad_request(
                f'resourceVersion: Invalid value: "{rv_text}": must be a valid resource version'
            )
        if req.name:
            fields = (*fields, ("metadata.name", "=", req.name))

        send_ch, recv_ch = trio.open_memory_channel[Event | None](_WATCH_QUEUE)

        def listener(event: Event) -> None:
            if namespace is not None and event.obj["metadata"].get("namespace") != namespace:
                return
            try:
                send_ch.send_nowait(event)
            except trio.WouldBlock:
                # A reader this far behind is closed; it re-watches from its last version.
                unsubscribe()
                send_ch.close()
            except trio.ClosedResourceError:
                pass

        unsubscribe = store.subscribe(resource_type.key, listener)
        try:
            initial: list[tuple[str, ApiObject]] = []
            last_rv = store.resource_version
            too_old: TooOld | None = None
            if rv_text in ("", "0"):
                for obj in store.objects(resource_type.key, namespace):
                    if matches_labels(labels, obj["metadata"].get("labels")) and matches_fields(
                        fields, obj
                    ):
                        initial.append(("ADDED", obj))
            else:
                try:
                    for event in store.events_since(resource_type.key, int(rv_text)):
                        if (
                            namespace is not None
                            and event.obj["metadata"].get("namespace") != namespace
                        ):
                            continue
                        translated = _translate(event, labels, fields)
                        if translated is not None:
                            initial.append(translated)
                except TooOld as exc:
                    too_old = exc
            headers = [
                (b"content-type", b"application/json"),
                (b"cache-control", b"no-cache, private"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            # Headers go out now, not with the first event: a quiet watch is still established.
            await send({"type": "http.response.body", "body": b"", "more_body": True})
            if too_old is not None:
                status = gone(str(too_old)).status()
                await self._chunk(send, {"type": "ERROR", "object": status})
                await send({"type": "http.response.body", "body": b""})
                return
            for kind, obj in initial:
                await self._chunk(send, self._event(resource_type, kind, obj, as_table))
            deadline = trio.current_time() + timeout if timeout > 0 else math.inf
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
                with trio.move_on_at(deadline):
                    await self._stream(
                        resource_type,
                        recv_ch,
                        send,
                        labels=labels,
                        fields=fields,
                        last_rv=last_rv,
                        bookmarks=bookmarks,
                        as_table=as_table,
                    )
                nursery.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b""})
        finally:
            unsubscribe()

    async def _stream(
        self,
        resource_type: ResourceType,
        recv_ch: trio.MemoryReceiveChannel[Event | None],
        send: ASGISend,
        *,
        labels: Any,
        fields: Any,
        last_rv: int,
        bookmarks: bool,
        as_table: bool,
    ) -> None:
        while True:
            event: Event | None = None
            with trio.move_on_after(self.bookmark_interval):
                try:
                    event = await recv_ch.receive()
                except trio.EndOfChannel:
                    return
            if event is None:
                if bookmarks:
                    rv = str(self.api.store.resource_version)
                    await self._chunk(
                        send,
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": resource_type.kind,
                                "apiVersion": resource_type.api_version,
                                "metadata": {"resourceVersion": rv, "creationTimestamp": None},
                            },
                        },
                    )
                continue
            if event.rv <= last_rv:
                continue
            translated = _translate(event, labels, fields)
            if translated is not None:
                await self._send_line(
                    send, self._encoded(resource_type, translated[0], translated[1], as_table)
                )

    def _event(
        self, resource_type: ResourceType, kind: str, obj: ApiObject, as_table: bool
    ) -> ApiObject:
        if as_table:
            meta = {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
            return {"type": kind, "object": self._table(resource_type, [obj], meta)}
        return {"type": kind, "object": obj}

    def _encoded(
        self, resource_type: ResourceType, kind: str, obj: ApiObject, as_table: bool
    ) -> bytes:
        """One watch line; plain events are encoded once and shared by every watcher."""
        if as_table:
            return _encoder.encode(self._event(resource_type, kind, obj, as_table)) + b"\n"
        key = (kind, id(obj))
        cached = self._lines.get(key)
        if cached is not None and cached[0] is obj:
            return cached[1]
        line = _encoder.encode({"type": kind, "object": obj}) + b"\n"
        self._lines[key] = (obj, line)
        if len(self._lines) > _LINE_CACHE:
            self._lines.popitem(last=False)
        return line

    async def _send_line(self, send: ASGISend, line: bytes) -> None:
        await send({"type": "http.response.body", "body": line, "more_body": True})

    async def _chunk(self, send: ASGISend, event: ApiObject) -> None:
        await send(
            {
                "type": "http.response.body",
                "body": _encoder.encode(event) + b"\n",
                "more_body": True,
            }
        )


def _translate(event: Event, labels: Any, fields: Any) -> tuple[str, ApiObject] | None:
    """Map a store event onto what a selector-filtered watch sees (moves in/out of the set)."""

    def ok(obj: ApiObject | None) -> bool:
        return (
            obj is not None
            and matches_labels(labels, obj["metadata"].get("labels"))
            and matches_fields(fields, obj)
        )

    if not labels and not fields:
        return event.type, event.obj
    if event.type == "ADDED":
        return ("ADDED", event.obj) if ok(event.obj) else None
    if event.type == "DELETED":
        return ("DELETED", event.obj) if ok(event.old) else None
    now, before = ok(event.obj), ok(event.old)
    if now and before:
        return "MODIFIED", event.obj
    if now:
        return "ADDED", event.obj
    if before:
        return "DELETED", event.obj
    return None


async def cancel_on_disconnect(receive: ASGIReceive, scope: trio.CancelScope) -> None:
    """Cancel `scope` once the HTTP client is gone (a streamed answer: a watch, a followed
    log)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
