"""Only the traffic manager talks to an agent's file server (issue 15 item 4): mutual TLS with
the manager's CA. The real file server (tele.agent.files with its chrooted SFTP processes) and
the manager's real dialer (tele.manager.agentfiles) on loopback; the peer-address screen lets
everyone through here, so what refuses the attackers is the TLS alone."""

from __future__ import annotations

import os
import ssl
import struct
import tempfile
from collections.abc import AsyncIterator
from functools import partial
from ipaddress import ip_address
from pathlib import Path

import msgspec
import pytest
import trio

from tele.agent import sftp
from tele.agent.files import Export, FileServerKeys, serve_files
from tele.certs import CertificateAuthority
from tele.manager.agentfiles import FilesAuthority, FilesDialer
from tele.net.tunnel import Destination, Protocol
from tele.rpc import agent_api as aapi

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the file server chroots: needs root")

INIT = struct.pack(">IBI", 5, sftp.INIT, 3)
LOOPBACK = ip_address("127.0.0.1")


def _identity(port: int, keys: FileServerKeys) -> aapi.AgentIdentity:
    return aapi.AgentIdentity(
        pod_name="files-1",
        namespace="default",
        pod_ip="127.0.0.1",
        workload_name="files",
        workload_kind="Deployment",
        version="test",
        sftp_ports={"app": port},
        tls_public_key=keys.public_key_pem.decode(),
    )


class Agent:
    def __init__(self, keys: FileServerKeys, port: int, authority: FilesAuthority) -> None:
        self.keys, self.port, self.authority = keys, port, authority
        self.identity = _identity(port, keys)

    def arrive(self) -> None:
        """What the agent does with the manager's answer to its arrival."""
        self.keys.store(*self.authority.certify(self.identity))


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    root = tmp_path / "app"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_bytes(b"hello")
    keys = FileServerKeys(str(tmp_path / "tls"))
    export = Export(root=str(root), tls_dir=keys.directory)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_files, export, host="127.0.0.1"))
        yield Agent(keys, port, FilesAuthority())
        nursery.cancel_scope.cancel()


async def _version_from(stream: trio.abc.Stream) -> bytes:
    """Send SFTP INIT; what comes back until the VERSION reply or the end."""
    await stream.send_all(INIT)
    got = b""
    with trio.fail_after(20):
        while len(got) < 5:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            got += chunk
    return got


async def test_the_manager_reaches_the_agent_over_mutual_tls(agent: Agent) -> None:
    agent.arrive()
    dialer = FilesDialer(agent.authority, lambda: [agent.identity])
    async with trio.open_nursery() as nursery:
        dialer.nursery = nursery
        stream = await dialer.connect(Destination(Protocol.TCP, LOOPBACK, agent.port))
        async with stream:
            got = await _version_from(stream)
        assert got[4] == sftp.VERSION
        nursery.cancel_scope.cancel()


async def _plain(port: int) -> bytes:
    try:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            return await _version_from(stream)
    except trio.BrokenResourceError:
        return b""


async def _tls(port: int, ctx: ssl.SSLContext) -> bytes:
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(raw, ctx, server_hostname="127.0.0.1")
    try:
        async with stream:
            return await _version_from(stream)
    except trio.BrokenResourceError:
        return b""


def _client_context(ca_pem: str, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "c").write_bytes(cert_pem)
        Path(tmp, "k").write_bytes(key_pem)
        ctx.load_cert_chain(Path(tmp, "c"), Path(tmp, "k"))
    return ctx


async def test_no_one_but_the_manager_gets_a_byte(agent: Agent) -> None:
    agent.arrive()
    ca_pem = agent.authority.ca_pem
    # Plain SFTP, as the unconfined server took it before.
    assert await _plain(agent.port) == b""
    # TLS without a client certificate.
    assert await _tls(agent.port, ssl.create_default_context(cadata=ca_pem)) == b""
    # Another agent's certificate (same CA, but a server certificate) as the client's.
    stolen = FileServerKeys()
    other_agent = msgspec.structs.replace(
        agent.identity, tls_public_key=stolen.public_key_pem.decode()
    )
    cert, _ = agent.authority.certify(other_agent)
    key_pem = await trio.Path(stolen.directory, "key.pem").read_bytes()
    assert await _tls(agent.port, _client_context(ca_pem, cert.encode(), key_pem)) == b""
    # A client certificate with the manager's name from a CA of the attacker's.
    other = CertificateAuthority.create("attacker")
    forged = other.issue(aapi.FILES_CLIENT_NAME, [], client=True)
    ctx = _client_context(ca_pem, forged.cert_pem, forged.key_pem)
    assert await _tls(agent.port, ctx) == b""
    # A client certificate of the right CA with another name.
    named = agent.authority.ca.issue("not-the-manager", [], client=True)
    assert await _tls(agent.port, _client_context(ca_pem, named.cert_pem, named.key_pem)) == b""


async def test_an_agent_without_a_session_serves_no_one(agent: Agent) -> None:
    agent.arrive()
    agent.keys.forget()  # its session with the manager ended (lease expired)
    dialer = FilesDialer(agent.authority, lambda: [agent.identity])
    async with trio.open_nursery() as nursery:
        dialer.nursery = nursery
        with pytest.raises(OSError, match="TLS with the agent's file server"):
            await dialer.connect(Destination(Protocol.TCP, LOOPBACK, agent.port))
        nursery.cancel_scope.cancel()
