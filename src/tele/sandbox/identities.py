"""Kubeconfigs for other identities than the admin, so that tests and users can try RBAC:
a user (client certificate signed by the sandbox CA, CN = user and O = groups, or a static
token in the instance's token file) or a service account (a TokenRequest's token).
"""

from __future__ import annotations

import base64
import datetime
import re
import secrets
import ssl
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tele.errors import UserError

from .apiserver.auth import TokenFile
from .apiserver.certs import CertificateAuthority, KeyPair
from .apiserver.kubeconfig import kubeconfig

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._@+=-]{0,252}")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def check_user(user: str, groups: Sequence[str]) -> None:
    for what, value in (("user", user), *(("group", g) for g in groups)):
        if not _NAME.fullmatch(value):
            raise UserError(
                f"The {what} name {value!r} is not usable: use letters, digits and :._@+=- "
                "(no spaces, no commas)."
            )


def client_certificate(
    ca: CertificateAuthority, user: str, groups: Sequence[str], days: int = 365
) -> KeyPair:
    """A client certificate for `user` in `groups`, signed by the cluster CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def user_kubeconfig(
    name: str,
    directory: Path,
    server: str,
    user: str,
    groups: Sequence[str],
    *,
    use_certificate: bool,
    token_file: Path,
) -> dict[str, Any]:
    """A kubeconfig for `user` in `groups` on the sandbox whose state is in `directory`."""
    check_user(user, groups)
    ca = CertificateAuthority.load(
        KeyPair((directory / "ca.crt").read_bytes(), (directory / "ca.key").read_bytes())
    )
    if use_certificate:
        pair = client_certificate(ca, user, groups)
        credentials = {
            "client-certificate-data": _b64(pair.cert_pem),
            "client-key-data": _b64(pair.key_pem),
        }
    else:
        token = secrets.token_urlsafe(32)
        TokenFile(token_file).append(token, user, str(uuid.uuid4()), list(groups))
        credentials = {"token": token}
    return kubeconfig(name, server, ca.cert_pem, "", user=user, credentials=credentials)


def service_account_kubeconfig(
    name: str, admin_kubeconfig: Path, account: str, seconds: int
) -> dict[str, Any]:
    """A kubeconfig with a token of service account `NAMESPACE/NAME` (a TokenRequest)."""
    namespace, _, sa_name = account.partition("/")
    if not _DNS_LABEL.fullmatch(namespace) or not _DNS_SUBDOMAIN.fullmatch(sa_name):
        raise UserError(
            f"--service-account wants NAMESPACE/NAME (lowercase DNS names); got {account!r}."
        )
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    ca_pem = base64.b64decode(cluster["certificate-authority-data"])
    admin_token = admin["users"][0]["user"]["token"]
    context = ssl.create_default_context(cadata=ca_pem.decode())
    url = f"{cluster['server']}/api/v1/namespaces/{namespace}/serviceaccounts/{sa_name}/token"
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": seconds},
    }
    try:
        with httpx.Client(verify=context, timeout=10) as client:
            resp = client.post(url, json=body, headers={"Authorization": f"Bearer {admin_token}"})
    except httpx.HTTPError as exc:
        raise UserError(f"The sandbox {name!r} did not answer: {exc}.") from None
    if resp.status_code == 404:
        raise UserError(
            f"The service account {account!r} does not exist; create it with "
            f"`kubectl -n {namespace} create serviceaccount {sa_name}`."
        )
    if resp.status_code != 201:
        message = resp.json().get("message", resp.text) if resp.content else resp.reason_phrase
        raise UserError(f"The sandbox refused the token request: {message}.")
    token = resp.json()["status"]["token"]
    user = f"system:serviceaccount:{namespace}:{sa_name}"
    return kubeconfig(
        name, cluster["server"], ca_pem, token, user=user.replace(":", "-"), namespace=namespace
    )
