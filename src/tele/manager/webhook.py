"""The agent injector's HTTPS endpoint: TLS material kept in a Secret, the webhook
configuration's caBundle patched to match, and AdmissionReview requests answered.

The CA and serving certificate are made once (tele.certs) and stored in the Secret named by the
Helm chart, so every manager replica and restart serves the same certificate; a Secret whose
certificate no longer covers the Service's names, or is about to expire, is replaced. What the
webhook does to a pod is a `Mutator`'s: the manager's is `AgentInjector`, which injects the
traffic agent into the pods of workloads that should have one and lets every other pod pass.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import h11
import trio
from cryptography import x509

from tele import jsonlimits
from tele.certs import CertificateAuthority, KeyPair, server_context
from tele.contracts import agentconfig
from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient
from tele.manager.engage import AgentSettings
from tele.manager.view import ClusterView

log = logging.getLogger(__name__)

SERVICE_NAME = "agent-injector"
WEBHOOK_PATH = "/traffic-agent"
MAX_BODY = 3 * 1024 * 1024  # the API server never sends more (its own request limit)
RENEW_BEFORE = datetime.timedelta(days=30)
MAX_CONNECTIONS_PER_PEER = 32
"""Webhook connections one address may hold at once (the API server reuses a few)."""

Review = dict[str, Any]
Mutator = Callable[[Review], Awaitable[Review]]
"""Takes the AdmissionReview's `request`, returns its `response` (uid is filled in here)."""


async def allow_all(request: Review) -> Review:
    return {"allowed": True}


@dataclass(frozen=True)
class AgentInjector:
    """The manager's `Mutator`: injects the traffic agent into a pod when its workload should
    have one (its pod template says `inject-traffic-agent: enabled`, or a client engaged it:
    `agent_workloads`), configured from the cluster view; other pods pass unchanged. Never
    refuses a pod."""

    view: ClusterView
    agent_workloads: Collection[tuple[str, str, str]]
    replaced_containers: Callable[[tuple[str, str, str]], frozenset[str]]
    """The containers a workload's pods must be made without now (active replaces)."""
    settings: AgentSettings

    async def __call__(self, request: Review) -> Review:
        if request.get("operation") != "CREATE" or (request.get("kind") or {}).get("kind") != "Pod":
            return await allow_all(request)
        pod = request.get("object") or {}
        namespace = str(
            request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or ""
        )
        if not self.view.is_managed(namespace):
            return await allow_all(request)
        workload = self.view.workload_of(pod, namespace)
        if workload is None:
            return await allow_all(request)
        key = (str(workload.get("kind")), namespace, str(workload["metadata"]["name"]))
        template = (workload.get("spec") or {}).get("template") or {}
        policy = agentconfig.injection_policy(template)
        on_demand = self.settings.inject_policy != "WhenEnabled" and key in self.agent_workloads
        if policy == "disabled" or (policy != "enabled" and not on_demand):
            return await allow_all(request)
        if agentconfig.manually_injected(template) or agentconfig.manually_injected(pod):
            return await allow_all(request)  # its owner put the agent in (tele genyaml)
        try:
            config = self.settings.config(
                workload,
                [s for (ns, _), s in self.view.services.items() if ns == namespace],
                self.replaced_containers(key),
                # A client engaged it (a replace or ingest needs no Service), or the template
                # asks for the agent: either way it gets one.
                require_service=False,
            )
        except agentconfig.NotInterceptable as exc:
            log.info("no agent for %s/%s: %s", namespace, key[2], exc)
            return await allow_all(request)
        patch = agentconfig.pod_patch(pod, config)
        if not patch:
            return await allow_all(request)
        log.info("injecting the traffic agent into a pod of %s %s/%s", key[0], namespace, key[2])
        return {
            "allowed": True,
            "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
        }


@dataclass(frozen=True)
class WebhookTLS:
    ca_pem: bytes
    pair: KeyPair


def service_names(
    namespace: str, cluster_domain: str = "cluster.local", service: str = SERVICE_NAME
) -> list[str]:
    base = f"{service}.{namespace}"
    return [service, base, f"{base}.svc", f"{base}.svc.{cluster_domain}"]


def _usable(secret: dict[str, Any], names: list[str]) -> WebhookTLS | None:
    data = secret.get("data") or {}
    try:
        ca_pem, cert_pem, key_pem = (
            base64.b64decode(data[k]) for k in ("ca.crt", "tls.crt", "tls.key")
        )
        cert = x509.load_pem_x509_certificate(cert_pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (KeyError, ValueError, x509.ExtensionNotFound):
        return None
    covered = {*sans.get_values_for_type(x509.DNSName)}
    covered |= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    if not set(names) <= covered:
        return None
    if cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE:
        return None
    return WebhookTLS(ca_pem, KeyPair(cert_pem, key_pem))


async def ensure_tls(
    kube: KubeClient,
    namespace: str,
    secret_name: str,
    extra_names: tuple[str, ...] = (),
    service: str = SERVICE_NAME,
) -> WebhookTLS:
    """The webhook's TLS material from its Secret, made (or remade) when missing or unusable.

    `service` is the webhook's Service (Helm `agentInjector.name`): the certificate covers its
    names. `extra_names` (DNS names or IPs) are for a webhook reached by `clientConfig.url`."""
    names = [*service_names(namespace, service=service), *extra_names]
    for _ in range(3):
        secret = await kube.get_or_none(k8s.SECRETS, secret_name, namespace)
        if secret is not None:
            tls = _usable(secret, names)
            if tls is not None:
                return tls
        ca = await trio.to_thread.run_sync(CertificateAuthority.create, f"{SERVICE_NAME}-ca")
        pair = await trio.to_thread.run_sync(ca.issue, f"{service}.{namespace}.svc", names)
        metadata: dict[str, str] = {"name": secret_name, "namespace": namespace}
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": metadata,
            "data": {
                "ca.crt": base64.b64encode(ca.cert_pem).decode(),
                "tls.crt": base64.b64encode(pair.cert_pem).decode(),
                "tls.key": base64.b64encode(pair.key_pem).decode(),
            },
        }
        try:
            if secret is None:
                await kube.create(k8s.SECRETS, body)
            else:
                metadata["resourceVersion"] = secret["metadata"]["resourceVersion"]
                await kube.replace(k8s.SECRETS, body)
        except ApiError as exc:
            if exc.code in (409,):  # another replica won the race: use what it stored
                continue
            raise
        log.info("made the agent injector's certificate (Secret %s/%s)", namespace, secret_name)
        return WebhookTLS(ca.cert_pem, pair)
    raise ApiError(409, "Conflict", f"the Secret {namespace}/{secret_name} keeps changing")


async def patch_ca_bundle(kube: KubeClient, webhook_name: str, ca_pem: bytes) -> bool:
    """Point every webhook of the configuration at our CA; False if it does not exist."""
    config = await kube.get_or_none(k8s.MUTATING_WEBHOOKS, webhook_name)
    if config is None:
        log.warning("MutatingWebhookConfiguration %s not found: no agent injection", webhook_name)
        return False
    bundle = base64.b64encode(ca_pem).decode()
    patch = [
        {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle}
        for i, hook in enumerate(config.get("webhooks") or [])
        if (hook.get("clientConfig") or {}).get("caBundle") != bundle
    ]
    if patch:
        await kube.patch(k8s.MUTATING_WEBHOOKS, webhook_name, patch, patch_type="json")
        log.info("patched the caBundle of %s", webhook_name)
    return True


class WebhookServer:
    """HTTPS (HTTP/1.1) server for AdmissionReview POSTs on `path` (Helm
    `agentInjector.webhook.servicePath`, the path the API server is told to call)."""

    def __init__(
        self, tls: WebhookTLS, mutator: Mutator = allow_all, *, path: str = WEBHOOK_PATH
    ) -> None:
        self.context: ssl.SSLContext = server_context(tls.pair, alpn=["http/1.1"])
        self.mutator = mutator
        self.path = path
        self.reviews = 0
        self.max_per_peer = MAX_CONNECTIONS_PER_PEER
        self._open: dict[str, int] = {}

    async def serve(
        self,
        port: int,
        host: str | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        ssl_listeners = [trio.SSLListener(listener, self.context) for listener in listeners]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connection, ssl_listeners)
            task_status.started(listeners[0].socket.getsockname()[1])

    async def _connection(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        """One client connection; whatever goes wrong ends this connection only. A peer
        address holds at most `max_per_peer` connections: a pod that opens many and sends
        nothing cannot crowd out the API server's calls."""
        try:
            peer = str(stream.transport_stream.socket.getpeername()[0])
        except (OSError, IndexError, TypeError):
            peer = "?"
        if self._open.get(peer, 0) >= self.max_per_peer:
            log.warning(
                "webhook: refused a connection from %s (it holds %d)", peer, self.max_per_peer
            )
            await trio.aclose_forcefully(stream)
            return
        self._open[peer] = self._open.get(peer, 0) + 1
        try:
            with trio.fail_after(30):
                await self._serve(stream)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            h11.ProtocolError,
            ssl.SSLError,
            OSError,
        ) as exc:
            log.debug("webhook connection ended: %s", exc)
        except Exception:
            log.exception("webhook connection failed; closed")
        finally:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while True:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(bytes(data))
                    continue
                if isinstance(event, h11.Request):
                    request = event
                    length = dict(event.headers).get(b"content-length", b"0")
                    if int(length) > MAX_BODY:  # h11 checked it is a number
                        reply = _review_error(413, f"request larger than {MAX_BODY} bytes")
                        await self._send(stream, conn, 413, reply)
                        return
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        reply = _review_error(413, f"request larger than {MAX_BODY} bytes")
                        await self._send(stream, conn, 413, reply)
                        return
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
            assert request is not None
            try:
                status, reply = await self._answer(request, bytes(body))
            except Exception:  # a bug: this request fails, the webhook keeps serving
                log.exception("webhook: answering a request failed")
                status, reply = 500, _review_error(500, "tele agent injector failed; see its log")
            await self._send(stream, conn, status, reply)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _answer(self, request: h11.Request, body: bytes) -> tuple[int, dict[str, Any]]:
        path = request.target.decode("latin-1").split("?", 1)[0]
        if request.method != b"POST" or path != self.path:
            return 404, {"error": f"no webhook at {request.method.decode()} {path}"}
        try:
            jsonlimits.check_depth(body)
            review = json.loads(body)
            admission = review["request"]
            uid = admission["uid"]
            if not isinstance(uid, str) or not isinstance(admission, dict):
                raise TypeError("request.uid is not a string")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("webhook: a bad AdmissionReview (%s): %s", type(exc).__name__, exc)
            return 400, _review_error(400, "expected an AdmissionReview with a request")
        self.reviews += 1
        try:
            response = await self.mutator(admission)
        except Exception:
            # failurePolicy decides what the API server does; say why in our log.
            log.exception("agent injector failed on %s", admission.get("name") or "a pod")
            response = {"allowed": True, "warnings": ["tele agent injector failed; see its log"]}
        version = review.get("apiVersion")
        return 200, {
            "apiVersion": version if isinstance(version, str) else "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {**response, "uid": uid},
        }

    @staticmethod
    async def _send(
        stream: trio.SSLStream[trio.SocketStream],
        conn: h11.Connection,
        status: int,
        reply: dict[str, Any],
    ) -> None:
        payload = json.dumps(reply).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
        data = conn.send(h11.Response(status_code=status, headers=headers))
        data += conn.send(h11.Data(data=payload)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)


def _review_error(code: int, message: str, uid: str = "") -> dict[str, Any]:
    """An AdmissionReview that refuses with `code` (sent with the same HTTP status): what the
    API server reads as a failed call, then applying the webhook's failurePolicy."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": uid,
            "allowed": False,
            "status": {"code": code, "message": message},
        },
    }
