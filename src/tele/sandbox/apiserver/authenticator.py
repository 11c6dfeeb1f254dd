"""The API server's bearer-token authenticator chain: static tokens (the admin's, the token
file's), then service-account JWTs; used for requests and by TokenReview alike.

Static tokens know no audience: like kube-apiserver's audience-agnostic authenticators, they
authenticate only for the API server's own audiences (a TokenReview asking for another audience
fails for them). Client certificates are checked by the TLS layer (`server.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .auth import AUTHENTICATED, MASTERS, TokenFile, User
from .serviceaccount import InvalidToken, ServiceAccountTokens, signing_key_from
from .store import Store


class Authenticator:
    """Maps a bearer token to a user, or a reason it does not authenticate."""

    def __init__(
        self,
        store: Store,
        admin_token: str,
        signing_key: bytes | None = None,
        *,
        clock: Callable[[], float],
        token_file: Path | None = None,
    ) -> None:
        self._store = store
        self.admin_token = admin_token
        self.service_accounts = ServiceAccountTokens(store, clock, signing_key_from(signing_key))
        self._static: dict[str, User] = {
            admin_token: User("kubernetes-admin", (MASTERS, AUTHENTICATED)),
        }
        self.token_file = TokenFile(token_file) if token_file is not None else None

    def add_static(self, token: str, user: User) -> None:
        self._static[token] = user

    def _static_user(self, token: str) -> User | None:
        user = self._static.get(token)
        if user is None and self.token_file is not None:
            user = self.token_file.lookup(token)
        return user

    def review(self, token: str, audiences: Sequence[str] | None = None) -> tuple[User, list[str]]:
        """The user and the audiences it was authenticated for; InvalidToken if none."""
        api_audiences = self.service_accounts.api_audiences
        static = self._static_user(token)
        if static is not None:
            matched = [a for a in (audiences or api_audiences) if a in api_audiences]
            if not matched:
                raise InvalidToken("token audiences is invalid for the target audiences")
            return static, matched
        if token.count(".") == 2:
            verified = self.service_accounts.verify(token, audiences)
            return verified.user, verified.audiences
        raise InvalidToken("invalid bearer token")

    def authenticate(self, token: str) -> User | None:
        try:
            return self.review(token)[0]
        except InvalidToken:
            return None
