"""Authentication as kube-apiserver does it: who a request comes from.

Three authenticators, tried in Kubernetes' order: the client certificate the TLS handshake
verified against the cluster CA (user = CN, groups = O), static bearer tokens (the admin's, and
those of the token file `tele sandbox kubeconfig --token` appends to, as `--token-auth-file`),
and service-account JWTs (ES256, signed with a key the API server keeps; `serviceaccount`
issues them). A service-account token stops working when it expires, when its account is
deleted or recreated, and — bound to a pod — when that pod is gone.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

AUTHENTICATED = "system:authenticated"
MASTERS = "system:masters"


@dataclass(frozen=True)
class User:
    """An authenticated identity: user.Info of Kubernetes."""

    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)

    @property
    def is_admin(self) -> bool:
        return MASTERS in self.groups

    def info(self) -> dict[str, Any]:
        """The `user` of a TokenReview status."""
        out: dict[str, Any] = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            out["uid"] = self.uid
        if self.extra:
            out["extra"] = {k: list(v) for k, v in self.extra.items()}
        return out


def with_authenticated(name: str, groups: tuple[str, ...] | list[str], **kw: Any) -> User:
    """A user whose groups include `system:authenticated`, as every authenticator adds."""
    groups = tuple(groups)
    if AUTHENTICATED not in groups:
        groups = (*groups, AUTHENTICATED)
    return User(name, groups, **kw)


def user_of_certificate(der: bytes) -> User | None:
    """The user a (verified) client certificate names: CN the user, each O a group."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    subject = cert.subject
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    groups = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return with_authenticated(str(names[0].value), groups)


class TokenFile:
    """Static tokens from a CSV file (`token,user,uid,"group1,group2"`), re-read when it changes.

    The format of kube-apiserver's `--token-auth-file`; `tele sandbox kubeconfig --token`
    appends to it while the sandbox runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}

    def lookup(self, token: str) -> User | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._users = self._read()
            self._stamp = stamp
        return self._users.get(token)

    def _read(self) -> dict[str, User]:
        users: dict[str, User] = {}
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("token file %s unreadable: %s", self.path, exc)
            return users
        for row in csv.reader(io.StringIO(text)):
            if len(row) < 3 or not row[0] or not row[1]:
                continue
            groups = [g for g in (row[3].split(",") if len(row) > 3 else []) if g]
            users[row[0]] = with_authenticated(row[1], groups, uid=row[2])
        return users

    def append(self, token: str, user: str, uid: str, groups: list[str]) -> None:
        """Add a line (the file is created private)."""
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow([token, user, uid, ",".join(groups)])
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, out.getvalue().encode())
        finally:
            os.close(fd)
