"""Kubeconfig users with client certificates, checked over TLS inside the tunnel (issue 15
item 1, beyond Telepresence), as Kubernetes' aggregated API servers check them.

A daemon whose kubeconfig user has no bearer token opens its link to the manager as TLS with
the user's client certificate (inside the port-forward, so it still needs `create
pods/portforward` on the manager's pod); one with a token speaks h2 directly. The manager tells
them apart by the first byte (a TLS handshake record is 0x16; h2's preface starts "PRI"). It
verifies a presented certificate against the cluster's client CA from the ConfigMap
`kube-system/extension-apiserver-authentication` (`client-ca-file`, read at start and every
CA_REFRESH seconds; the chart binds the manager to the `extension-apiserver-authentication-
reader` Role every cluster has) and takes the user from the certificate as the API server
does: the common name is the user, each organization a group. A certificate of another CA ends
the handshake. The daemon does not check the manager's certificate (made here, in memory): the
port-forward through the API server is what says it reached the manager, and a client
certificate proves its key only to the TLS session it is used in.
"""

from __future__ import annotations

import logging
import socket
import ssl
import tempfile
from pathlib import Path

import trio

from tele.certs import CertificateAuthority
from tele.k8s.client import ApiError, KubeClient
from tele.manager.auth import Principal

log = logging.getLogger(__name__)

CA_NAMESPACE = "kube-system"
CA_CONFIGMAP = "extension-apiserver-authentication"
CA_KEY = "client-ca-file"
CA_REFRESH = 600.0
HANDSHAKE_TIMEOUT = 10.0
TLS_RECORD = 0x16
AUTHENTICATED = "system:authenticated"


class LinkTLS:
    """The manager's TLS for links of client-certificate users."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        authority = CertificateAuthority.create("tele-traffic-manager links")
        self._pair = authority.issue("traffic-manager", ["traffic-manager"])
        self.client_ca = ""
        self.context = self._context("")

    def _context(self, client_ca: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert.write_bytes(self._pair.cert_pem)
            key.write_bytes(self._pair.key_pem)
            ctx.load_cert_chain(cert, key)
        if client_ca:
            ctx.load_verify_locations(cadata=client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL  # a token user may come over TLS without one
        return ctx

    async def load_client_ca(self) -> None:
        """Read the cluster's client CA (kept as it was if it cannot be read now)."""
        try:
            found = await self.kube.request(
                "GET", f"/api/v1/namespaces/{CA_NAMESPACE}/configmaps/{CA_CONFIGMAP}"
            )
        except ApiError as exc:
            log.warning(
                "cannot read %s/%s (client certificates cannot be verified): %s",
                CA_NAMESPACE,
                CA_CONFIGMAP,
                exc.message,
            )
            return
        data = (found.get("data") or {}) if isinstance(found, dict) else {}
        ca = str(data.get(CA_KEY) or "")
        if ca and ca != self.client_ca:
            try:
                self.context = self._context(ca)
            except ssl.SSLError as exc:
                log.warning("the cluster's client CA is not usable: %s", exc)
                return
            self.client_ca = ca
            log.info("client certificates are verified with the cluster's client CA")

    async def keep_loaded(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.load_client_ca()
        task_status.started()
        while True:
            await trio.sleep(CA_REFRESH)
            await self.load_client_ca()

    async def accept(self, stream: trio.SocketStream) -> tuple[trio.abc.Stream, Principal | None]:
        """The link's transport and, for a verified client certificate, who it names. Raises
        trio.TooSlowError, trio.BrokenResourceError or OSError for a peer to drop."""
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            first = await stream.socket.recv(1, socket.MSG_PEEK)
            if not first or first[0] != TLS_RECORD:
                return stream, None
            tls = trio.SSLStream(stream, self.context, server_side=True)
            await tls.do_handshake()
        return tls, principal_of(tls.getpeercert())


def principal_of(cert: object) -> Principal | None:
    """The user a verified client certificate names (CN; O as groups), as the API server."""
    if not isinstance(cert, dict) or not cert:
        return None
    names: list[str] = []
    groups: list[str] = []
    for rdn in cert.get("subject") or ():
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value))
            elif key == "organizationName":
                groups.append(str(value))
    if len(names) != 1 or not names[0]:
        return None
    return Principal(username=names[0], groups=(*groups, AUTHENTICATED))
