"""TLS termination for the http mechanism: the agent decrypts callers' TLS with the workload's
certificate so that it can read each request, and re-encrypts towards the app.

Towards an engaged client the agent sends plaintext, which is Telepresence's `--http-plaintext`
behaviour; the client side re-originates TLS to its local handler when the handler expects it.
The protocol a caller negotiates (ALPN h2 or http/1.1) is the one offered to the app, so the two
sides of every connection speak the same HTTP version.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tele.agent.errors import AgentConfigError, UpstreamFailed

ALPN = ("h2", "http/1.1")


@dataclass(frozen=True)
class TlsTermination:
    server: ssl.SSLContext
    """Terminates callers' TLS with the workload's certificate."""
    to_app: dict[str, ssl.SSLContext] = field(default_factory=dict)
    """Per ALPN protocol ("" when none was negotiated), the context that originates TLS to the
    app; empty when the app itself speaks plaintext behind the agent."""

    @classmethod
    def from_files(
        cls, cert: Path, key: Path, *, app_tls: bool = True, app_ca: Path | None = None
    ) -> TlsTermination:
        """Contexts from PEM files; AgentConfigError (one sentence) when they are unusable.

        The app is dialled at 127.0.0.1 in the same pod, so its certificate (issued for the
        Service's names) is checked against `app_ca` when given and not by host name.
        """
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            server.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise AgentConfigError(
                f"the terminating TLS certificate {cert} cannot be loaded: {exc}."
            ) from None
        server.set_alpn_protocols(list(ALPN))
        to_app: dict[str, ssl.SSLContext] = {}
        if app_tls:
            for protocol in ("h2", "http/1.1", ""):
                context = ssl.create_default_context(cafile=str(app_ca) if app_ca else None)
                context.check_hostname = False
                if app_ca is None:
                    context.verify_mode = ssl.CERT_NONE
                if protocol:
                    context.set_alpn_protocols([protocol])
                to_app[protocol] = context
        return cls(server=server, to_app=to_app)

    async def accept(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        """The caller's side, handshake done; UpstreamFailed (about the caller) if it fails."""
        wrapped = trio.SSLStream(stream, self.server, server_side=True)
        try:
            await wrapped.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            raise UpstreamFailed(f"a caller's TLS handshake failed: {exc}.") from None
        return wrapped

    async def to_app_stream(self, stream: trio.abc.Stream, alpn: str | None) -> trio.abc.Stream:
        """Originate TLS on a fresh connection to the app (or leave it plaintext)."""
        context = self.to_app.get(alpn or "")
        if context is None:
            return stream
        wrapped = trio.SSLStream(stream, context, server_side=False)
        try:
            await wrapped.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            await stream.aclose()
            raise UpstreamFailed(f"the app's TLS handshake failed: {exc}.") from None
        return wrapped
