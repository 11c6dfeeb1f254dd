"""Mutual TLS between the traffic manager and the agents' file servers (issue 15 item 4).

The manager makes a CA of its own at start (in memory: never stored, never sent but its
certificate) and a client certificate for itself (common name FILES_CLIENT_NAME, clientAuth
only). An agent sends the public key of its file servers' TLS key when it arrives; once its
token made it that pod (server.vouch_for_agent), the manager answers with a certificate for
that key, for the pod's IP as the manager sees it (serverAuth only, AGENT_CERT_LIFETIME). The
agent's file servers then accept only a TLS client whose chain leads to that CA and whose
certificate is a client certificate named FILES_CLIENT_NAME: the manager, not another agent
(their certificates are server-only) nor anything else in the pod network.

When a session dials an agent's file server through the tunnel, `FilesDialer.connect` does the
TLS (checking the agent's certificate for the pod IP it dials) and hands the tunnel a plain
socket whose other end it relays through the TLS stream: the tunnel relays bytes as for any
destination, and the client's sshfs speaks plain SFTP. A new manager makes a new CA; agents
arrive again when their link breaks, so they get certificates of the new CA.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

import trio

from tele.certs import CertificateAuthority
from tele.net.tunnel import Destination
from tele.rpc import agent_api as aapi
from tele.rpc.errors import Code, RpcError
from tele.rpc.tunnel import connect_tcp

log = logging.getLogger(__name__)

AGENT_CERT_LIFETIME = datetime.timedelta(days=1)
"""An agent's file-server certificate; it gets a new one on every arrival."""
HANDSHAKE_TIMEOUT = 10.0
RELAY_SIZE = 65536


class FilesAuthority:
    """The manager's CA for agents' file servers, and the manager's client side of it."""

    def __init__(self) -> None:
        self.ca = CertificateAuthority.create("tele-traffic-manager files CA")
        self.ca_pem = self.ca.cert_pem.decode()
        client = self.ca.issue(aapi.FILES_CLIENT_NAME, [], client=True, days=3650)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert.write_bytes(client.cert_pem)
            key.write_bytes(client.key_pem)
            ctx.load_cert_chain(cert, key)
        self.client_context = ctx

    def certify(self, identity: aapi.AgentIdentity) -> tuple[str, str]:
        """(certificate, CA) for a vouched agent's file-server key; ("", "") if it sent none."""
        if not identity.tls_public_key:
            return "", ""
        try:
            cert = self.ca.certify(
                identity.tls_public_key.encode(),
                f"{identity.namespace}/{identity.pod_name}",
                [identity.pod_ip],
                lifetime=AGENT_CERT_LIFETIME,
            )
        except ValueError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, f"tls_public_key: {exc}") from None
        return cert.decode(), self.ca_pem


class FilesDialer:
    """The tunnel's connector: agents' file-server ports with mutual TLS, the rest plain."""

    def __init__(self, authority: FilesAuthority, agents: Callable[[], list[aapi.AgentIdentity]]):
        self.authority = authority
        self._agents = agents
        self.nursery: trio.Nursery | None = None
        """Where the relays run (the manager's; set when it serves)."""

    def agent_of(self, destination: Destination) -> aapi.AgentIdentity | None:
        """The agent whose file server `destination` is, if it speaks TLS."""
        ip, port = str(destination.ip), destination.port
        for identity in self._agents():
            if (
                identity.tls_public_key
                and identity.pod_ip == ip
                and port in identity.sftp_ports.values()
            ):
                return identity
        return None

    async def connect(self, destination: Destination) -> trio.SocketStream:
        identity = self.agent_of(destination)
        if identity is None:
            return await connect_tcp(destination)
        if self.nursery is None:
            raise OSError(errno.ECONNREFUSED, "the traffic manager is not serving")
        raw = await connect_tcp(destination)
        tls = trio.SSLStream(raw, self.authority.client_context, server_hostname=identity.pod_ip)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            await trio.aclose_forcefully(tls)
            cause = exc.__cause__ or exc
            log.warning("TLS with the file server at %s failed: %s", destination, cause)
            raise OSError(
                errno.ECONNREFUSED, f"TLS with the agent's file server: {cause}"
            ) from None
        ours, theirs = socket.socketpair()
        self.nursery.start_soon(
            _relay, tls, trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
        )
        return trio.SocketStream(trio.socket.from_stdlib_socket(ours))


async def _relay(tls: trio.SSLStream[trio.SocketStream], local: trio.SocketStream) -> None:
    """Bytes both ways until either side ends (TLS has no half-close: one end ends both)."""
    async with tls, local, trio.open_nursery() as nursery:

        async def up() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while chunk := await local.receive_some(RELAY_SIZE):
                    await tls.send_all(chunk)
            nursery.cancel_scope.cancel()

        async def down() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while chunk := await tls.receive_some(RELAY_SIZE):
                    await local.send_all(chunk)
            nursery.cancel_scope.cancel()

        nursery.start_soon(up)
        nursery.start_soon(down)
