"""Service-account tokens: JWTs signed by the API server, as TokenRequest and projected
`serviceAccountToken` volumes hand them out, and their verification.

A token is an ES256 JWT with Kubernetes' claims (`iss`, `aud`, `exp`, `iat`, `nbf`, `sub`,
`jti` and `kubernetes.io: {namespace, serviceaccount{name, uid}, pod{name, uid}, node{name,
uid}}`). It is valid while it has not expired, its audience is one the verifier accepts, its
service account is the one it names (same uid), and — when bound to a pod — that pod exists
with the same uid. The kubelet calls `projected_token` for its volumes, which re-mints a token
at 80 % of its life (or after 24 h), as the real kubelet rotates them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from tele.jsonlimits import TooDeep, check_depth

from .auth import User, with_authenticated
from .store import ApiObject, Store

ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
"""The API server's issuer, also its own audience (`--api-audiences` defaults to it)."""
API_AUDIENCES: Final = (ISSUER,)
MIN_EXPIRATION: Final = 600
DEFAULT_EXPIRATION: Final = 3600
_MAX_TOKEN = 16 * 1024
_ROTATE_AT: Final = 0.8
_ROTATE_AFTER: Final = 24 * 3600
POD_NAME_KEY: Final = "authentication.kubernetes.io/pod-name"
POD_UID_KEY: Final = "authentication.kubernetes.io/pod-uid"
NODE_NAME_KEY: Final = "authentication.kubernetes.io/node-name"
CREDENTIAL_ID_KEY: Final = "authentication.kubernetes.io/credential-id"
_CURVE_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signing_key_from(seed: bytes | None) -> ec.EllipticCurvePrivateKey:
    """The P-256 key for a seed (the same key across restarts of one sandbox), or a new one."""
    if seed is None:
        return ec.generate_private_key(ec.SECP256R1())
    scalar = int.from_bytes(hashlib.sha256(b"tele-sandbox-sa-key\0" + seed).digest()) % (
        _CURVE_ORDER - 1
    )
    return ec.derive_private_key(scalar + 1, ec.SECP256R1())


class InvalidToken(Exception):
    """A token that does not authenticate, with the reason a TokenReview reports."""


@dataclass(frozen=True)
class Verified:
    user: User
    audiences: list[str]


class ServiceAccountTokens:
    """Issues and verifies the service-account JWTs of one cluster."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str = ISSUER,
        api_audiences: Sequence[str] = API_AUDIENCES,
    ) -> None:
        self._store = store
        self._clock = clock
        self._key = key
        self._public = key.public_key()
        der = self._public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = _b64(hashlib.sha256(der).digest())
        self.issuer = issuer
        self.api_audiences = list(api_audiences)
        # (pod uid, volume path, audience) -> (token, issued at, expires at)
        self._projected: dict[tuple[str, str, str], tuple[str, int, int]] = {}

    @property
    def public_key_pem(self) -> bytes:
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # --- issuing ---------------------------------------------------------------------------

    def issue(
        self,
        account: ApiObject,
        *,
        seconds: int = DEFAULT_EXPIRATION,
        audiences: Sequence[str] | None = None,
        pod: ApiObject | None = None,
    ) -> tuple[str, int]:
        """A token for `account` (bound to `pod` if given) and the unix time it expires."""
        meta = account["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        now = int(self._clock())
        expires = now + seconds
        private: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": meta.get("uid", "")},
        }
        if pod is not None:
            pod_meta = pod["metadata"]
            private["pod"] = {"name": pod_meta["name"], "uid": pod_meta.get("uid", "")}
            node_name = (pod.get("spec") or {}).get("nodeName")
            node = self._store.get("/nodes", "", node_name) if node_name else None
            if node is not None:
                private["node"] = {"name": node_name, "uid": node["metadata"].get("uid", "")}
        claims = {
            "aud": list(audiences or self.api_audiences),
            "exp": expires,
            "iat": now,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": private,
            "nbf": now,
            "sub": f"system:serviceaccount:{namespace}:{name}",
        }
        return self._sign(claims), expires

    def _sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": "ES256", "kid": self.key_id}
        signing_input = (
            _b64(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64(json.dumps(claims, separators=(",", ":")).encode())
        )
        r, s = decode_dss_signature(
            self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def projected_token(self, pod: ApiObject, source: ApiObject) -> str:
        """The token file of a projected `serviceAccountToken` source of `pod`: the one minted
        before while it is younger than 80 % of its life (and 24 h), else a new pod-bound one."""
        meta = pod["metadata"]
        account_name = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        account = self._store.get("/serviceaccounts", meta["namespace"], account_name)
        if account is None:
            raise InvalidToken(f'serviceaccounts "{account_name}" not found')
        audience = str(source.get("audience") or "")
        seconds = max(int(source.get("expirationSeconds") or DEFAULT_EXPIRATION), MIN_EXPIRATION)
        key = (meta.get("uid", ""), str(source.get("path") or "token"), audience)
        now = int(self._clock())
        cached = self._projected.get(key)
        if cached is not None:
            token, issued, expires = cached
            if now < issued + min((expires - issued) * _ROTATE_AT, _ROTATE_AFTER):
                return token
        token, expires = self.issue(
            account, seconds=seconds, audiences=[audience] if audience else None, pod=pod
        )
        self._projected[key] = (token, now, expires)
        self._forget_gone_pods()
        return token

    def next_rotation(self, pod: ApiObject) -> float | None:
        """When (unix time) the first projected token of `pod` is due to be re-minted."""
        uid = pod["metadata"].get("uid", "")
        due = [
            issued + min((expires - issued) * _ROTATE_AT, _ROTATE_AFTER)
            for (pod_uid, _, _), (_, issued, expires) in self._projected.items()
            if pod_uid == uid
        ]
        return min(due) if due else None

    def _forget_gone_pods(self) -> None:
        live = {p["metadata"].get("uid") for p in self._store.objects("/pods")}
        for key in [k for k in self._projected if k[0] not in live]:
            del self._projected[key]

    # --- verifying -------------------------------------------------------------------------

    def verify(self, token: str, audiences: Sequence[str] | None = None) -> Verified:
        """The user a token authenticates for `audiences` (default: the API server's own)."""
        claims = self._verified_claims(token)
        if claims.get("iss") != self.issuer:
            raise InvalidToken("invalid bearer token, token issuer is not trusted")
        now = self._clock()
        if not isinstance(claims.get("exp"), int) or claims["exp"] < now:
            raise InvalidToken("invalid bearer token, token has expired")
        if isinstance(claims.get("nbf"), int) and claims["nbf"] > now + 60:
            raise InvalidToken("invalid bearer token, token is not valid yet")
        token_audiences = claims.get("aud")
        if isinstance(token_audiences, str):
            token_audiences = [token_audiences]
        if not isinstance(token_audiences, list):
            token_audiences = []
        wanted = list(audiences) if audiences else self.api_audiences
        matched = [a for a in wanted if a in token_audiences]
        if not matched:
            raise InvalidToken(
                "invalid bearer token, token audiences "
                f"{json.dumps(token_audiences)} is invalid for the target audiences "
                f"{json.dumps(wanted)}"
            )
        private = claims.get("kubernetes.io")
        if not isinstance(private, dict):
            raise InvalidToken("invalid bearer token, token lacks the kubernetes.io claims")
        namespace = str(private.get("namespace") or "")
        sa = private.get("serviceaccount") or {}
        name, sa_uid = str(sa.get("name") or ""), str(sa.get("uid") or "")
        account = self._store.get("/serviceaccounts", namespace, name)
        if account is None:
            raise InvalidToken(
                f'invalid bearer token, serviceaccounts "{name}" not found in {namespace}'
            )
        if account["metadata"].get("uid") != sa_uid:
            raise InvalidToken(
                f"invalid bearer token, service account UID ({sa_uid}) does not match "
                f"the service account's ({account['metadata'].get('uid')})"
            )
        if account["metadata"].get("deletionTimestamp"):
            raise InvalidToken(f"invalid bearer token, service account {name} has been deleted")
        extra: dict[str, list[str]] = {}
        bound = private.get("pod")
        if isinstance(bound, dict):
            pod_name, pod_uid = str(bound.get("name") or ""), str(bound.get("uid") or "")
            pod = self._store.get("/pods", namespace, pod_name)
            if pod is None or pod["metadata"].get("uid") != pod_uid:
                raise InvalidToken(
                    f'invalid bearer token, pod "{pod_name}" ({pod_uid}) bound to the token '
                    "is not found"
                )
            if pod["metadata"].get("deletionTimestamp"):
                raise InvalidToken(
                    f'invalid bearer token, pod "{pod_name}" bound to the token is being deleted'
                )
            extra[POD_NAME_KEY] = [pod_name]
            extra[POD_UID_KEY] = [pod_uid]
        node = private.get("node")
        if isinstance(node, dict) and node.get("name"):
            extra[NODE_NAME_KEY] = [str(node["name"])]
        if claims.get("jti"):
            extra[CREDENTIAL_ID_KEY] = [f"JTI={claims['jti']}"]
        user = with_authenticated(
            f"system:serviceaccount:{namespace}:{name}",
            ("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
            uid=sa_uid,
            extra=extra,
        )
        return Verified(user, matched)

    def _verified_claims(self, token: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(token) > _MAX_TOKEN or len(parts) != 3:
            raise InvalidToken("invalid bearer token")
        try:
            header_raw, claims_raw, signature = (_unb64(p) for p in parts)
            check_depth(header_raw, 4)
            header = json.loads(header_raw)
        except (ValueError, TooDeep):
            raise InvalidToken("invalid bearer token") from None
        if not isinstance(header, dict) or header.get("alg") != "ES256" or len(signature) != 64:
            raise InvalidToken("invalid bearer token")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self._public.verify(der, f"{parts[0]}.{parts[1]}".encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise InvalidToken("invalid bearer token") from None
        claims = json.loads(claims_raw)  # ours: signed by our key
        if not isinstance(claims, dict):
            raise InvalidToken("invalid bearer token")
        return claims
