"""A trio-native Kubernetes REST client: CRUD, patches, paginated lists and watches.

Requests go over one HTTP/2 connection (httpx) with the kubeconfig's TLS material and
credentials (tele.k8s.config). Failures become `ApiError`s carrying the API server's Status
(reason, code, message); transport failures become `ApiUnreachable`. `informer()` lists and then
watches a collection, resuming after disconnects and relisting after 410 Gone: the way every
long-lived watcher in tele follows the cluster, never by polling.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import httpcore
import httpx
import trio

from tele import jsonlimits
from tele.errors import ConnectionFailed, TeleError
from tele.k8s.config import ClusterConnection, load_connection

log = logging.getLogger(__name__)

Obj = dict[str, Any]
PatchType = Literal["merge", "json", "strategic", "apply"]
_PATCH_CONTENT_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "apply": "application/apply-patch+yaml",
}


class ApiError(TeleError):
    """The API server refused a request; `status` is its Status object."""

    exit_code = 3

    def __init__(self, code: int, reason: str, message: str, status: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.status = status or {}

    @property
    def not_found(self) -> bool:
        return self.code == 404

    @property
    def conflict(self) -> bool:
        return self.code == 409

    @property
    def gone(self) -> bool:
        return self.code == 410


class ApiUnreachable(ConnectionFailed):
    """The API server could not be reached or broke off."""


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str = ""
    ) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


def _r(group: str, version: str, plural: str, kind: str, namespaced: bool = True) -> Resource:
    return Resource(group, version, plural, kind, namespaced)


NAMESPACES = _r("", "v1", "namespaces", "Namespace", namespaced=False)
PODS = _r("", "v1", "pods", "Pod")
SERVICES = _r("", "v1", "services", "Service")
ENDPOINTS = _r("", "v1", "endpoints", "Endpoints")
CONFIGMAPS = _r("", "v1", "configmaps", "ConfigMap")
SECRETS = _r("", "v1", "secrets", "Secret")
SERVICEACCOUNTS = _r("", "v1", "serviceaccounts", "ServiceAccount")
EVENTS = _r("", "v1", "events", "Event")
DEPLOYMENTS = _r("apps", "v1", "deployments", "Deployment")
REPLICASETS = _r("apps", "v1", "replicasets", "ReplicaSet")
STATEFULSETS = _r("apps", "v1", "statefulsets", "StatefulSet")
ENDPOINTSLICES = _r("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
MUTATING_WEBHOOKS = _r(
    "admissionregistration.k8s.io",
    "v1",
    "mutatingwebhookconfigurations",
    "MutatingWebhookConfiguration",
    namespaced=False,
)
VALIDATING_WEBHOOKS = _r(
    "admissionregistration.k8s.io",
    "v1",
    "validatingwebhookconfigurations",
    "ValidatingWebhookConfiguration",
    namespaced=False,
)
PDBS = _r("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
ROLES = _r("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLEBINDINGS = _r("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
CLUSTERROLES = _r("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False)
CLUSTERROLEBINDINGS = _r(
    "rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False
)
ROLLOUTS = _r("argoproj.io", "v1alpha1", "rollouts", "Rollout")

KNOWN: dict[tuple[str, str], Resource] = {
    (r.api_version, r.kind): r
    for r in (
        NAMESPACES,
        PODS,
        SERVICES,
        ENDPOINTS,
        CONFIGMAPS,
        SECRETS,
        SERVICEACCOUNTS,
        EVENTS,
        DEPLOYMENTS,
        REPLICASETS,
        STATEFULSETS,
        ENDPOINTSLICES,
        MUTATING_WEBHOOKS,
        VALIDATING_WEBHOOKS,
        PDBS,
        ROLES,
        ROLEBINDINGS,
        CLUSTERROLES,
        CLUSTERROLEBINDINGS,
        ROLLOUTS,
    )
}


def resource_for(obj: Mapping[str, Any]) -> Resource:
    """The Resource of a manifest, from its apiVersion and kind."""
    key = (str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
    try:
        return KNOWN[key]
    except KeyError:
        raise TeleError(
            f"tele does not know the kind {key[1]!r} of apiVersion {key[0]!r}"
        ) from None


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "RELISTED"]
    object: Obj

    @property
    def name(self) -> str:
        return str(self.object.get("metadata", {}).get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.object.get("metadata", {}).get("namespace", ""))


class KubeClient:
    """REST calls against one cluster as one user. Build it with `open_kube_client()`."""

    def __init__(
        self,
        connection: ClusterConnection,
        http: httpx.AsyncClient,
        watch_http: httpx.AsyncClient | None = None,
    ) -> None:
        self.connection = connection
        self._http = http
        self._watch_http = watch_http or http
        self._auth: list[tuple[bytes, bytes]] | None = None
        self._auth_expires = -math.inf
        # kubeconfig `tls-server-name`: the name to verify instead of the URL's host.
        self._extensions: dict[str, Any] = (
            {"sni_hostname": connection.tls_server_name} if connection.tls_server_name else {}
        )

    # --- plumbing -----------------------------------------------------------------------------

    async def _headers(self, refresh: bool = False) -> list[tuple[bytes, bytes]]:
        now = trio.current_time()
        if refresh or self._auth is None or now >= self._auth_expires:
            # The kubernetes package refreshes exec-plugin tokens itself; asking it costs a
            # thread hop, so its answer is reused for a while (and re-asked after a 401).
            self._auth = await self.connection.auth_headers()
            self._auth_expires = now + 30
        return self._auth

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        text: bool = False,
    ) -> Any:
        """One request; the decoded JSON answer (with `text`, the body as text: pods/log), or
        ApiError/ApiUnreachable."""
        content = None
        if body is not None:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
        for attempt in (0, 1):
            accept = b"text/plain, */*" if text else b"application/json"
            headers = [(b"Accept", accept), *await self._headers(refresh=attempt > 0)]
            if content is not None:
                headers.append((b"Content-Type", content_type.encode()))
            try:
                response = await self._http.request(
                    method,
                    self.connection.server + path,
                    params=dict(params or {}),
                    content=content,
                    headers=headers,
                    extensions=self._extensions,
                )
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from None
            if response.status_code == 401 and attempt == 0:
                continue
            if text and response.status_code < 400:
                return response.text
            return self._decode(response)
        raise AssertionError("unreachable")

    def _unreachable(self, exc: BaseException) -> ApiUnreachable:
        return ApiUnreachable(
            f"Cannot reach the Kubernetes API server at {self.connection.server}: "
            f"{str(exc).rstrip('.') or type(exc).__name__}."
        )

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        try:
            data = response.json() if response.content else None
        except ValueError:
            data = None
        if response.status_code >= 400:
            raise _api_error(response.status_code, data, response.text)
        return data

    # --- verbs -----------------------------------------------------------------------------------

    async def get(self, resource: Resource, name: str, namespace: str | None = None) -> Obj:
        result: Obj = await self.request("GET", resource.path(namespace, name))
        return result

    async def get_or_none(
        self, resource: Resource, name: str, namespace: str | None = None
    ) -> Obj | None:
        try:
            return await self.get(resource, name, namespace)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
    ) -> tuple[list[Obj], str]:
        """All items (following `continue`) and the list's resourceVersion."""
        items: list[Obj] = []
        params: dict[str, str | int] = {"limit": page_size}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        while True:
            page: Obj = await self.request("GET", resource.path(namespace), params=params)
            items.extend(page.get("items") or [])
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                return items, str(metadata.get("resourceVersion", ""))
            params["continue"] = token

    async def create(self, resource: Resource, body: Obj, namespace: str | None = None) -> Obj:
        namespace = namespace or body.get("metadata", {}).get("namespace")
        result: Obj = await self.request("POST", resource.path(namespace), body=body)
        return result

    async def replace(self, resource: Resource, body: Obj) -> Obj:
        meta = body.get("metadata", {})
        result: Obj = await self.request(
            "PUT", resource.path(meta.get("namespace"), meta["name"]), body=body
        )
        return result

    async def patch(
        self,
        resource: Resource,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        patch_type: PatchType = "merge",
        field_manager: str = "tele",
        subresource: str = "",
        force: bool = False,
    ) -> Obj:
        params: dict[str, str | int] = {"fieldManager": field_manager}
        if patch_type == "apply" and force:
            params["force"] = "true"
        result: Obj = await self.request(
            "PATCH",
            resource.path(namespace, name, subresource),
            params=params,
            body=patch,
            content_type=_PATCH_CONTENT_TYPES[patch_type],
        )
        return result

    async def delete(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        propagation: str = "Background",
        grace_period: int | None = None,
        missing_ok: bool = True,
    ) -> Obj | None:
        options: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        options["propagationPolicy"] = propagation
        if grace_period is not None:
            options["gracePeriodSeconds"] = grace_period
        try:
            result: Obj = await self.request("DELETE", resource.path(namespace, name), body=options)
        except ApiError as exc:
            if exc.not_found and missing_ok:
                return None
            raise
        return result

    async def evict(self, name: str, namespace: str) -> None:
        """Evict a pod (honouring disruption budgets: a refusal is ApiError 429)."""
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        await self.request("POST", PODS.path(namespace, name, "eviction"), body=body)

    # --- watches ---------------------------------------------------------------------------------

    async def watch(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
    ) -> AsyncGenerator[WatchEvent]:
        """One watch request: events until the server ends it. An ERROR event raises ApiError.

        Iterate it inside `contextlib.aclosing(...)` so the request ends with the loop.
        """
        params: dict[str, str | int] = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": timeout_seconds,
        }
        if resource_version:
            params["resourceVersion"] = resource_version
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        url = self.connection.server + resource.path(namespace)
        for attempt in (0, 1):
            # A 401 is asked once more with the credentials read again (a rotated token).
            headers = [(b"Accept", b"application/json"), *await self._headers(attempt > 0)]
            try:
                async with self._watch_http.stream(
                    "GET",
                    url,
                    params=params,
                    headers=headers,
                    timeout=httpx.Timeout(10, read=None),
                    extensions=self._extensions,
                ) as response:
                    if response.status_code == 401 and attempt == 0:
                        await response.aread()
                        continue
                    if response.status_code >= 400:
                        await response.aread()
                        self._decode(response)
                    error: ApiError | None = None
                    chunks = cast(AsyncGenerator[bytes], response.aiter_bytes())
                    async with aclosing(_watch_lines(chunks)) as lines:
                        async for line in lines:
                            if error is not None or not line.strip():
                                continue  # after an ERROR the server ends the response: drain it
                            try:
                                jsonlimits.check_depth(line)
                                event = json.loads(line)
                                if not isinstance(event, dict) or "type" not in event:
                                    raise ValueError("not a watch event")
                            except (ValueError, RecursionError):
                                error = ApiError(
                                    500, "", "the API server sent a malformed watch event"
                                )
                                continue
                            if event.get("type") == "ERROR":
                                status = event.get("object")
                                status = status if isinstance(status, dict) else {}
                                code = status.get("code")
                                code = code if isinstance(code, int) and 100 <= code < 600 else 500
                                error = _api_error(code, status, line.decode("utf-8", "replace"))
                                continue
                            if not isinstance(event.get("object"), dict):
                                error = ApiError(
                                    500, "", "the API server sent a malformed watch event"
                                )
                                continue
                            yield WatchEvent(event["type"], event["object"])
                    if error is not None:
                        raise error
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from None
            return

    async def informer(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        retry_delay: float = 1.0,
        max_retry_delay: float = 30.0,
    ) -> AsyncGenerator[WatchEvent]:
        """Follow a collection forever: a RELISTED event carrying `{"items": [...]}` for each
        (re)list, then ADDED/MODIFIED/DELETED. Resumes a broken watch from the last
        resourceVersion; relists after 410 Gone; backs off while the server is unreachable."""
        delay = retry_delay
        version: str | None = None
        while True:
            try:
                if version is None:
                    items, version = await self.list(
                        resource,
                        namespace,
                        label_selector=label_selector,
                        field_selector=field_selector,
                    )
                    yield WatchEvent("RELISTED", {"items": items})
                watch = self.watch(
                    resource,
                    namespace,
                    resource_version=version,
                    label_selector=label_selector,
                    field_selector=field_selector,
                )
                async with aclosing(watch) as events:
                    async for event in events:
                        delay = retry_delay
                        rv = event.object.get("metadata", {}).get("resourceVersion")
                        if rv:
                            version = str(rv)
                        if event.type != "BOOKMARK":
                            yield event
            except ApiError as exc:
                if not exc.gone:
                    raise
                log.info("watch of %s expired (410 Gone), relisting", resource.plural)
                version = None
            except ApiUnreachable as exc:
                log.warning(
                    "watch of %s broke off (%s), retrying in %.1fs", resource.plural, exc, delay
                )
                await trio.sleep(delay)
                delay = min(delay * 2, max_retry_delay)


def _api_error(code: int, data: Any, text: str) -> ApiError:
    if isinstance(data, dict) and data.get("kind") == "Status":
        return ApiError(
            code,
            str(data.get("reason") or ""),
            str(data.get("message") or f"the API server answered {code}"),
            data,
        )
    snippet = text.strip().splitlines()[0][:200] if text.strip() else ""
    return ApiError(code, "", f"the API server answered {code}: {snippet}".rstrip(": "))


@asynccontextmanager
async def open_kube_client(
    kubeconfig: str | None = None,
    context: str | None = None,
    *,
    connection: ClusterConnection | None = None,
    timeout: float = 30.0,
) -> AsyncIterator[KubeClient]:
    """A client for the kubeconfig's context (or a given connection) for the block's duration."""
    connection = connection or await load_connection(kubeconfig, context)
    # Contexts of their own: httpx sets ALPN on what it is given.
    verify: Any = connection.new_ssl_context() or False
    watch_verify: Any = connection.new_ssl_context() or False
    # Requests share one HTTP/2 connection. Watches get HTTP/1.1 connections of their own:
    # httpcore's HTTP/2 reads the socket from whichever stream's task holds its read lock, and
    # a response could wait on a long-lived watch's next event (seen here as 60 s stalls).
    requests = _transport(
        verify=verify,
        http2=True,
        limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
    )
    watches = _transport(
        verify=watch_verify,
        http2=False,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=10),
    )
    async with (
        httpx.AsyncClient(transport=requests, timeout=httpx.Timeout(timeout)) as http,
        httpx.AsyncClient(transport=watches, timeout=httpx.Timeout(timeout)) as watch_http,
    ):
        yield KubeClient(connection, http, watch_http)


def _transport(**options: Any) -> httpx.AsyncHTTPTransport:
    """httpx's transport, with connections that close their socket when a TLS handshake is
    cancelled (see `_ClosingStream`)."""
    transport = httpx.AsyncHTTPTransport(**options)
    pool = transport._pool  # httpx offers no public way to give httpcore a network backend
    pool._network_backend = _ClosingBackend(pool._network_backend)
    return transport


class _ClosingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, its streams wrapped in `_ClosingStream`."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _ClosingStream(
            await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _ClosingStream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _ClosingStream(httpcore.AsyncNetworkStream):
    """A connection whose socket is closed when its TLS handshake fails *or is cancelled*:
    httpcore's trio backend closes it on Exception only, so a request cancelled during the
    handshake (a watch stopped as a manager or a test ends) left an open socket behind."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            return await self._inner.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._inner.aclose()
            raise

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


MAX_WATCH_EVENT = 16 * 1024 * 1024
"""Largest watch event line taken from an API server (objects are at most ~1.5 MiB in etcd):
a server that never ends a line cannot make the watcher hold gigabytes."""


async def _watch_lines(chunks: AsyncGenerator[bytes]) -> AsyncGenerator[bytes]:
    """The newline-delimited lines of a watch response, each at most MAX_WATCH_EVENT bytes."""
    buffer = bytearray()
    async with aclosing(chunks):
        async for chunk in chunks:
            searched = len(buffer)
            buffer += chunk
            start = 0
            while (end := buffer.find(b"\n", max(start, searched))) >= 0:
                yield bytes(buffer[start:end])
                start = end + 1
            del buffer[:start]
            if len(buffer) > MAX_WATCH_EVENT:
                raise ApiError(
                    500, "", f"the API server sent a watch event over {MAX_WATCH_EVENT} bytes"
                )
    if buffer:
        yield bytes(buffer)
