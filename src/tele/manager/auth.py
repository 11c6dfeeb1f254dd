"""Who is calling: every caller of the manager proves an identity the Kubernetes way.

A link (one h2 connection) starts unauthenticated: it may ask the version and AUTHENTICATE,
nothing else, with at most UNAUTHENTICATED_STREAMS streams at once. AUTHENTICATE carries a bearer
token, checked with a TokenReview (authentication.k8s.io/v1): a client's is what its kubeconfig
resolves to (reviewed for the API server's own audiences), an agent's is its pod's projected
ServiceAccount token, reviewed for AGENT_AUDIENCE. The identity the review returns is the link's
from then on (`CALLER.principal`), and every session made on it is bound to that identity
(`owner`): no other identity can use its id.

Modes (Helm `security.authentication.mode`): `enforcing` refuses what is not proven,
`permissive` logs what it would refuse and serves anyway, `disabled` checks nothing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from tele.contracts.agentconfig import AGENT_TOKEN_AUDIENCE
from tele.k8s.client import ApiError, ApiUnreachable, KubeClient
from tele.rpc import manager_api as api
from tele.rpc.errors import Code, RpcError
from tele.rpc.server import CALLER, CallerConnection

log = logging.getLogger(__name__)
audit = logging.getLogger("tele.audit")

MODES = ("enforcing", "permissive", "disabled")
UNAUTHENTICATED_STREAMS = 4
"""Streams an unauthenticated link may have open at once (the version call and AUTHENTICATE)."""
CACHE_SECONDS = 30.0
"""How long a review's answer is reused for the same token (a hash of it is kept, not it)."""
CACHE_LIMIT = 4096
OPEN_PATHS = frozenset({api.VERSION.path, api.AUTHENTICATE.path})
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
MAX_TOKEN = 16384
RECHECK_SECONDS = 60.0
"""How often the token of every authenticated link is reviewed again (and at its `exp`): a
revoked token (deleted ServiceAccount, deleted pod, removed user) is noticed this late."""
RECHECK_TICK = 5.0
REVOKED_GRACE = 15.0
"""After a link's credential failed its review: how long the identity's sessions wait for a
link of the same identity with a valid credential (a rotated token) before they end."""
PREFETCH_LIMIT = 32
"""Reviews asked ahead for one engagement at most (a template naming more is judged anyway)."""
DECISION_SECONDS = 10.0
"""How long a SubjectAccessReview's answer is reused (RBAC changes take effect this late)."""
WORKLOAD_RESOURCES = {
    "Deployment": ("apps", "deployments"),
    "ReplicaSet": ("apps", "replicasets"),
    "StatefulSet": ("apps", "statefulsets"),
    "Rollout": ("argoproj.io", "rollouts"),
}


def audit_line(event: str, **fields: object) -> None:
    """One structured line (JSON after "audit ") per arrival, engagement and denial."""
    who = caller()
    record = {"event": event, "user": who.username if who else "", **fields}
    if who is not None and "groups" not in record:
        record["groups"] = list(who.groups)
    audit.info("audit %s", json.dumps(record, sort_keys=True, default=str))


NO_TOKEN = (
    "The traffic manager serves only authenticated callers: present a bearer token or a client "
    "certificate of the cluster's client CA (tele does so from the kubeconfig)"
)


@dataclass(frozen=True)
class Principal:
    """An identity a TokenReview vouched for."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)
    agent_audience: bool = False
    """The token was bound to AGENT_AUDIENCE (an agent's projected token)."""

    @property
    def key(self) -> str:
        """What sessions are bound to."""
        return f"{self.username}\x00{self.uid}"

    def pod(self) -> tuple[str, str] | None:
        """(pod name, pod uid) of a pod-bound ServiceAccount token, else None."""
        names = self.extra.get(POD_NAME) or ()
        uids = self.extra.get(POD_UID) or ()
        if len(names) == 1 and len(uids) == 1:
            return names[0], uids[0]
        return None

    def service_account_namespace(self) -> str | None:
        parts = self.username.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            return parts[2]
        return None


ANONYMOUS = Principal(username="")
"""Who an unauthenticated caller is where the mode lets it through."""


def caller() -> Principal | None:
    connection = CALLER.get()
    principal = connection.principal if connection is not None else None
    return principal if isinstance(principal, Principal) else None


@dataclass
class _Held:
    """What an authenticated link presented, to review it again."""

    token: str
    agent: bool
    due: float


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (seconds since the epoch), None if it is not one."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > MAX_TOKEN:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def review_failure(exc: ApiError | ApiUnreachable) -> str:
    """One sentence for a TokenReview the API server did not answer, naming whose fault it is:
    a 401 or 403 is about the traffic manager's own credentials, not the caller's token."""
    prefix = "The traffic manager cannot review tokens now"
    if isinstance(exc, ApiUnreachable):
        return f"{prefix}: {str(exc).rstrip('.')}."
    if exc.code == 401:
        return (
            f"{prefix}: the API server did not accept the traffic manager's own credentials "
            "(its service-account token has expired and was not replaced, or its service "
            f"account is gone; restarting the traffic-manager pod gets a new one): {exc.message}"
        )
    if exc.code == 403:
        return (
            f"{prefix}: the traffic manager's service account may not create tokenreviews "
            f"(its RBAC is missing; install it again with tele helm install): {exc.message}"
        )
    return f"{prefix}: {exc.message}"


class Authenticator:
    def __init__(
        self,
        kube: KubeClient,
        mode: str = "enforcing",
        *,
        clock: Any = trio.current_time,
        recheck_seconds: float = RECHECK_SECONDS,
        revoked_grace: float = REVOKED_GRACE,
    ) -> None:
        self.recheck_seconds = recheck_seconds
        self.revoked_grace = revoked_grace
        self.pending_revocations = 0
        """Identities whose link's credential failed, waiting out the grace."""
        if mode not in MODES:
            raise ValueError(f"authentication mode must be one of {', '.join(MODES)}")
        self.kube = kube
        self.mode = mode
        self._clock = clock
        self._cache: dict[tuple[bytes, bool], tuple[float, Principal | str]] = {}
        self._held: weakref.WeakKeyDictionary[CallerConnection, _Held] = weakref.WeakKeyDictionary()
        self._decisions: dict[tuple[str, tuple[str, ...]], tuple[float, bool, str]] = {}

    # --- the link gate --------------------------------------------------------------------------

    def gate(self, path: str) -> None:
        """Router gate: before authentication only OPEN_PATHS, a few streams at once."""
        connection = CALLER.get()
        if self.mode == "disabled" or connection is None:
            return
        if connection.principal is not None:
            return
        if connection.active_calls > UNAUTHENTICATED_STREAMS:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED, "too many streams on a link that has not authenticated"
            )
        if path in OPEN_PATHS:
            return
        message = NO_TOKEN
        if connection.auth_failure:
            message = (
                f"the traffic manager did not authenticate this caller: {connection.auth_failure}"
            )
        self.refuse(Code.UNAUTHENTICATED, message, path=path)

    def refuse(self, code: Code, message: str, **about: object) -> None:
        """Refuse (enforcing) or log that it would (permissive)."""
        audit_line("denied", mode=self.mode, reason=message, **about)
        if self.mode == "enforcing":
            raise RpcError(code, message)
        if self.mode == "permissive":
            log.warning("permissive: would refuse (%s): %s", about, message)

    def owner(self) -> str:
        """The owner key for a session made by the caller now."""
        who = caller()
        return who.key if who is not None else ANONYMOUS.key

    def check_owner(self, owner: str) -> None:
        """The caller may use a session owned by `owner`, or RpcError (the same answer as for
        an unknown session: a stolen id tells the thief nothing)."""
        if self.mode == "disabled" or owner == self.owner():
            return
        self.refuse(
            Code.NOT_FOUND,
            "the session has expired or is unknown; connect again",
            session_owner=owner.split("\x00", maxsplit=1)[0],
        )

    # --- AUTHENTICATE ---------------------------------------------------------------------------

    async def authenticate(self, request: api.AuthenticateRequest) -> api.AuthenticateReply:
        connection = CALLER.get()
        if not request.token or len(request.token) > MAX_TOKEN:
            raise RpcError(Code.INVALID_ARGUMENT, "no usable token")
        try:
            principal = await self.review(request.token, agent=request.agent)
        except RpcError as exc:
            if connection is not None:
                connection.auth_failure = exc.message
            raise
        if connection is not None:
            held = connection.principal
            if isinstance(held, Principal) and held.key != principal.key:
                raise RpcError(
                    Code.PERMISSION_DENIED,
                    "this link belongs to another identity; open a new one",
                )
            connection.principal = principal
            self._held[connection] = _Held(request.token, request.agent, self._due(request.token))
        return api.AuthenticateReply(username=principal.username, groups=list(principal.groups))

    def _due(self, token: str) -> float:
        """When to review `token` again: RECHECK_SECONDS from now, or just after it expires."""
        due: float = self._clock() + self.recheck_seconds
        expiry = token_expiry(token)
        if expiry is not None:
            due = min(due, self._clock() + max(expiry - time.time(), 0.0) + 1.0)
        return due

    # --- credentials that stop being valid ------------------------------------------------------

    async def watch_credentials(
        self,
        on_revoked: Callable[[Principal, str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Review every authenticated link's token again as it comes due (`recheck`); run in
        the manager's nursery."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await self.recheck(on_revoked, nursery)
                await trio.sleep(min(RECHECK_TICK, self.recheck_seconds))

    async def recheck(
        self, on_revoked: Callable[[Principal, str], None], nursery: trio.Nursery
    ) -> None:
        """Review the tokens that are due. A link whose token is no longer accepted (or now
        names someone else) is refused from now on and closed; if no link of that identity
        with a valid token shows up within REVOKED_GRACE, its sessions end (`on_revoked`)."""
        if self.mode == "disabled":
            return
        now = self._clock()
        for connection, held in list(self._held.items()):
            if connection.ended:
                self._held.pop(connection, None)
                continue
            if held.due > now:
                continue
            try:
                result = await self._token_review(held.token, held.agent)
            except RpcError:
                held.due = now + RECHECK_TICK  # the API server is unavailable: try again soon
                continue
            if self._held.get(connection) is not held:
                continue  # presented anew meanwhile
            principal = connection.principal
            if not isinstance(principal, Principal):
                continue
            if isinstance(result, Principal) and result.key == principal.key:
                held.due = self._due(held.token)
                continue
            reason = result if isinstance(result, str) else "the token names another identity now"
            self._revoke(connection, principal, reason)
            self.pending_revocations += 1
            nursery.start_soon(self._end_if_gone, principal, reason, on_revoked)

    def _revoke(self, connection: CallerConnection, principal: Principal, reason: str) -> None:
        self._held.pop(connection, None)
        self._cache = {k: v for k, v in self._cache.items() if v[1] != principal}
        record = {
            "event": "revoked",
            "user": principal.username,
            "groups": list(principal.groups),
            "reason": reason,
            "mode": self.mode,
        }
        audit.info("audit %s", json.dumps(record, sort_keys=True))
        if self.mode != "enforcing":
            log.warning("permissive: would close the link of %s: %s", principal.username, reason)
            return
        connection.auth_failure = (
            f"the credential this link presented is no longer valid ({reason})"
        )
        connection.principal = None
        connection.close("credential revoked")

    async def _end_if_gone(
        self, principal: Principal, reason: str, on_revoked: Callable[[Principal, str], None]
    ) -> None:
        try:
            await trio.sleep(self.revoked_grace)
        finally:
            self.pending_revocations -= 1
        renewed = any(
            isinstance(c.principal, Principal) and c.principal.key == principal.key
            for c in self._held
            if not c.ended
        )
        if not renewed and self.mode == "enforcing":
            on_revoked(principal, reason)

    async def review(self, token: str, *, agent: bool) -> Principal:
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        cached = self._cache.get((digest, agent))
        if cached is not None and cached[0] > now:
            result = cached[1]
        else:
            result = await self._token_review(token, agent)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= CACHE_LIMIT:
                    self._cache.clear()
            self._cache[(digest, agent)] = (now + CACHE_SECONDS, result)
        if isinstance(result, str):
            audit_line("denied", reason=result, agent=agent)
            raise RpcError(Code.UNAUTHENTICATED, result)
        return result

    async def _token_review(self, token: str, agent: bool) -> Principal | str:
        spec: dict[str, Any] = {"token": token}
        if agent:
            spec["audiences"] = [AGENT_TOKEN_AUDIENCE]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            reply = await self.kube.request(
                "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=body
            )
        except (ApiError, ApiUnreachable) as exc:
            message = review_failure(exc)
            log.error("%s", message)
            raise RpcError(Code.UNAVAILABLE, message) from None
        status = (reply.get("status") or {}) if isinstance(reply, dict) else {}
        if not status.get("authenticated"):
            return "the token was not accepted: " + str(status.get("error") or "unauthenticated")
        if agent and AGENT_TOKEN_AUDIENCE not in (status.get("audiences") or []):
            return f"the token is not bound to the audience {AGENT_TOKEN_AUDIENCE}"
        user = status.get("user") or {}
        extra = user.get("extra") or {}
        return Principal(
            username=str(user.get("username") or ""),
            uid=str(user.get("uid") or ""),
            groups=tuple(str(g) for g in user.get("groups") or []),
            extra={
                str(k): tuple(str(x) for x in v) for k, v in extra.items() if isinstance(v, list)
            },
            agent_audience=agent,
        )

    # --- authorization (RBAC, by SubjectAccessReview) -------------------------------------------

    async def authorize_engagement(
        self, kind: str, workload_kind: str, namespace: str, name: str
    ) -> None:
        """Engaging needs `create pods/portforward` in the namespace (as Telepresence 2.31);
        `replace` also `patch` on the workload. RpcError PERMISSION_DENIED, one sentence."""
        await self.require("create", "pods", namespace, subresource="portforward")
        if kind == "replace":
            group, resource = WORKLOAD_RESOURCES.get(workload_kind, ("apps", "deployments"))
            await self.require("patch", resource, namespace, group=group, name=name)

    async def require(
        self,
        verb: str,
        resource: str,
        namespace: str,
        *,
        group: str = "",
        subresource: str = "",
        name: str = "",
        purpose: str = "",
    ) -> None:
        if self.mode == "disabled":
            return
        who = caller()
        what = f"{resource}/{subresource}" if subresource else resource
        if group:
            what = f"{what}.{group}"
        if who is None:
            self.refuse(Code.UNAUTHENTICATED, NO_TOKEN, needed=f"{verb} {what}")
            return
        allowed, reason = await self._decide(
            who, (verb, group, resource, subresource, namespace, name)
        )
        if not allowed:
            self.refuse(
                Code.PERMISSION_DENIED,
                f"{who.username} may not {verb} {what} in namespace {namespace}"
                + (f" {purpose}" if purpose else "")
                + (f" ({reason})" if reason else ""),
                namespace=namespace,
                needed=f"{verb} {what}",
            )

    async def may(
        self, verb: str, resource: str, namespace: str, *, subresource: str = "", name: str = ""
    ) -> bool:
        """Whether the caller may (core API group), without refusing anything: what an
        engagement hands over (manager.withhold). Permissive logs what it would withhold."""
        if self.mode == "disabled":
            return True
        who = caller()
        allowed = False
        if who is not None:
            attributes = (verb, "", resource, subresource, namespace, name)
            allowed, _ = await self._decide(who, attributes)
        if not allowed and self.mode == "permissive":
            log.warning(
                "permissive: would withhold what needs %s %s/%s %s in namespace %s from %s",
                verb,
                resource,
                subresource,
                name,
                namespace,
                who.username if who else "an unauthenticated caller",
            )
            return True
        if not allowed:
            audit_line("withheld", needed=f"{verb} {resource}", name=name, namespace=namespace)
        return allowed

    async def prefetch(self, namespace: str, sources: Iterable[tuple[str, str, str, str]]) -> None:
        """Ask (verb, resource, subresource, name) reviews for the caller ahead of `may`, all at
        once, so that its answers are cached; failures are left for `may` to meet."""
        who = caller()
        if self.mode == "disabled" or who is None:
            return

        async def ask(source: tuple[str, str, str, str]) -> None:
            verb, resource, subresource, name = source
            with contextlib.suppress(RpcError):
                await self._decide(who, (verb, "", resource, subresource, namespace, name))

        async with trio.open_nursery() as nursery:
            for source in sorted(set(sources))[:PREFETCH_LIMIT]:
                nursery.start_soon(ask, source)

    async def may_list(self, workload_kind: str, namespace: str) -> bool:
        """Whether the caller may see `workload_kind`s in `namespace` (`list` on them): what
        `tele list` shows. Not enforcing: yes (permissive logs what it would hide)."""
        if self.mode == "disabled":
            return True
        who = caller()
        group, resource = WORKLOAD_RESOURCES.get(workload_kind, ("apps", "deployments"))
        allowed = False
        if who is not None:
            allowed, _ = await self._decide(who, ("list", group, resource, "", namespace, ""))
        if not allowed and self.mode == "permissive":
            log.warning(
                "permissive: would not list %s.%s in namespace %s to %s",
                resource,
                group,
                namespace,
                who.username if who else "an unauthenticated caller",
            )
            return True
        return allowed

    async def _decide(self, who: Principal, attributes: tuple[str, ...]) -> tuple[bool, str]:
        now = self._clock()
        cached = self._decisions.get((who.key, attributes))
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        allowed, reason = await self._access_review(who, attributes)
        if len(self._decisions) >= CACHE_LIMIT:
            self._decisions.clear()
        self._decisions[(who.key, attributes)] = (now + DECISION_SECONDS, allowed, reason)
        return allowed, reason

    async def _access_review(self, who: Principal, attributes: tuple[str, ...]) -> tuple[bool, str]:
        verb, group, resource, subresource, namespace, name = attributes
        resource_attributes = {
            k: v
            for k, v in {
                "verb": verb,
                "group": group,
                "resource": resource,
                "subresource": subresource,
                "namespace": namespace,
                "name": name,
            }.items()
            if v
        }
        spec: dict[str, Any] = {
            "user": who.username,
            "groups": list(who.groups),
            "resourceAttributes": resource_attributes,
        }
        if who.uid:
            spec["uid"] = who.uid
        if who.extra:
            spec["extra"] = {k: list(v) for k, v in who.extra.items()}
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": spec,
        }
        try:
            reply = await self.kube.request(
                "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=body
            )
        except ApiError as exc:
            log.warning("SubjectAccessReview failed: %s", exc.message)
            raise RpcError(
                Code.UNAVAILABLE,
                f"the traffic manager cannot check permissions now: {exc.message}",
            ) from None
        status = (reply.get("status") or {}) if isinstance(reply, dict) else {}
        return bool(status.get("allowed")), str(status.get("reason") or "")
