"""TLS termination in the http mechanism: callers' TLS ends at the agent, the app gets TLS again,
an engaged client gets plaintext (--http-plaintext); tcp engagements pass TLS through."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

from tele.agent.engagements import StaticEngagements
from tele.agent.errors import AgentConfigError
from tele.agent.forward import serve
from tele.agent.tls import TlsTermination
from tele.rpc.agent_api import Engagement
from tests.agent.servers import AGENT_PORT, HttpClient, settings_for, start_http_server

NAME = "echo.default.svc.cluster.local"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def workload_cert(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    cert = ca.issue_cert(NAME)
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    yield cert_path, key_path


async def test_http_engagement_over_tls(ca: trustme.CA, workload_cert: tuple[Path, Path]) -> None:
    app_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAME).configure_cert(app_tls)
    caller_tls = ssl.create_default_context()
    ca.configure_trust(caller_tls)
    termination = TlsTermination.from_files(*workload_cert)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app", tls=app_tls)
            handler = await start_http_server(nursery, "handler")  # plaintext
            engagement = Engagement(
                id="e1",
                container="echo",
                agent_port=AGENT_PORT,
                mechanism="http",
                headers=[("x-user", "me")],
            )
            source = StaticEngagements([engagement], handlers={"e1": ("127.0.0.1", handler.port)})
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            agent = partial(serve, listeners={AGENT_PORT: [listener]}, tls=termination)
            await nursery.start(agent, settings_for(app.port), source)
            port = listener.socket.getsockname()[1]
            async with HttpClient.connect(port, tls=caller_tls, server_hostname=NAME) as c:
                served = [
                    (await c.request(f"/{i}", h))[1]["x-served-by"]
                    for i, h in enumerate([[], [("x-user", "me")], []])
                ]
            nursery.cancel_scope.cancel()
    assert served == ["app", "handler", "app"]
    assert app.requests == [("GET", "/0"), ("GET", "/2")]
    assert handler.requests == [("GET", "/1")]


def test_unusable_certificate_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("not a certificate")
    with pytest.raises(AgentConfigError, match=r"^the terminating TLS certificate .* cannot be"):
        TlsTermination.from_files(tmp_path / "tls.crt", tmp_path / "tls.key")
