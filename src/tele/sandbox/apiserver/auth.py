"""Authentication: the admin bearer token and signed service-account tokens.

Service-account tokens are HMAC-signed by the server's key and name the account and its uid; a
token stops working when its account is deleted (or recreated with a new uid) or it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .store import Store

_SA_PREFIX = "tele-sa."


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)

    @property
    def is_admin(self) -> bool:
        return "system:masters" in self.groups

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            out["uid"] = self.uid
        return out


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    """Maps a bearer token to a user, or None when the token is not valid."""

    def __init__(self, store: Store, admin_token: str, signing_key: bytes | None = None) -> None:
        self._store = store
        self.admin_token = admin_token
        self._key = signing_key or secrets.token_bytes(32)
        self._static: dict[str, User] = {
            admin_token: User("kubernetes-admin", ("system:masters", "system:authenticated")),
        }

    def add_static(self, token: str, user: User) -> None:
        self._static[token] = user

    def issue_service_account_token(
        self, namespace: str, name: str, uid: str, expiration_seconds: int = 3600 * 24 * 365
    ) -> tuple[str, int]:
        """A token for the account and the unix time it expires."""
        expires = int(time.time()) + expiration_seconds
        claims = _b64(
            json.dumps({"ns": namespace, "name": name, "uid": uid, "exp": expires}).encode()
        )
        sig = _b64(hmac.new(self._key, claims.encode(), hashlib.sha256).digest())
        return f"{_SA_PREFIX}{claims}.{sig}", expires

    def authenticate(self, token: str) -> User | None:
        user = self._static.get(token)
        if user is not None:
            return user
        if not token.startswith(_SA_PREFIX):
            return None
        claims_text, _, sig = token[len(_SA_PREFIX) :].partition(".")
        expected = _b64(hmac.new(self._key, claims_text.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(sig, expected):
            return None
        try:
            claims = json.loads(_unb64(claims_text))
        except (ValueError, UnicodeDecodeError):
            return None
        if claims.get("exp", 0) < time.time():
            return None
        account = self._store.get("/serviceaccounts", claims["ns"], claims["name"])
        if account is None or account["metadata"].get("uid") != claims.get("uid"):
            return None
        ns = claims["ns"]
        return User(
            f"system:serviceaccount:{ns}:{claims['name']}",
            ("system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"),
            uid=claims["uid"],
        )
