"""The manager's tunnel policy (issue 15 item 5), attacked through its real port with tele's
own client code: an authenticated session cannot have the manager dial its loopback, link-local
or cloud metadata addresses, nor an agent's SFTP port; the session that engages the agent's
workload still reaches that port (its mounts). Each refusal is one audit line and a sentence
the daemon logs."""

from __future__ import annotations

import functools
import ipaddress
import json
import logging

import pytest
import trio

from tele.k8s.client import KubeClient
from tele.manager.tunnelpolicy import never_dialed
from tele.net.tunnel import Destination, Protocol, ResetReason
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.tunnel import TunnelError, dial
from tele.testing.waits import wait_for
from tests.manager.test_auth import IDENTITY, admin_token, link, start
from tests.manager.test_engage import create_workload
from tests.manager.test_manager import start_manager


def tcp(host: str, port: int) -> Destination:
    return Destination(Protocol.TCP, ipaddress.ip_address(host), port)


async def test_an_authenticated_session_cannot_have_the_manager_dial_its_own_host(
    nursery: trio.Nursery, kube: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    manager = await start(nursery, kube)
    port = manager.bound_port  # type: ignore[attr-defined]
    async with link(manager) as client:
        await client.call(api.AUTHENTICATE, api.AuthenticateRequest(token=await admin_token(kube)))
        session = (await client.call(api.ARRIVE, IDENTITY)).session_id
        attacks = {
            f"127.0.0.1:{port}": "loopback",
            f"127.1.2.3:{port}": "loopback",
            f"[::1]:{port}": "loopback",
            f"[::ffff:127.0.0.1]:{port}": "loopback",
            f"0.0.0.0:{port}": "loopback",
            "169.254.169.254:80": "metadata",
            "[fd00:ec2::254]:80": "metadata",
            "100.100.100.200:80": "metadata",
            "169.254.10.1:10250": "link-local",
            "[fe80::1]:22": "link-local",
        }
        with caplog.at_level(logging.INFO, logger="tele.audit"):
            for address, kind in attacks.items():
                destination = Destination.parse("tcp", address)
                with pytest.raises(TunnelError) as refused:
                    await dial(client.link, destination, session=session)
                assert refused.value.reason is ResetReason.POLICY, address
                message = str(refused.value)
                assert message.startswith(f"the traffic manager does not dial {destination}: ")
                assert kind in message, message
    lines = [
        json.loads(r.getMessage().split(" ", 1)[1])
        for r in caplog.records
        if r.name == "tele.audit" and "tunnel-denied" in r.getMessage()
    ]
    assert len(lines) == len(attacks)
    assert {line["user"] for line in lines} == {"kubernetes-admin"}
    assert lines[0]["destination"] == f"tcp/127.0.0.1:{port}"


def test_every_spelling_of_a_refused_address_is_refused() -> None:
    for text in ("127.0.0.1", "::1", "::ffff:169.254.169.254", "0.0.0.0", "::", "fe80::2"):
        assert never_dialed(ipaddress.ip_address(text)), text
    for text in ("10.244.0.7", "192.168.1.1", "fd00:ec2::253", "2001:db8::1", "100.100.100.201"):
        assert not never_dialed(ipaddress.ip_address(text)), text
    assert not never_dialed(ipaddress.ip_address("127.0.0.1"), allow_loopback=True)
    assert never_dialed(ipaddress.ip_address("169.254.169.254"), allow_loopback=True)


async def test_an_agents_sftp_port_is_only_for_the_session_that_engages_its_workload(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    # The manager runs on the host here, so the stand-in agent's "pod IP" is loopback (allowed
    # by allow_loopback_dials); the SFTP rule is judged on top of that.
    await create_workload(kube, [{"name": "web", "port": 80, "targetPort": "http"}])
    manager, client = await start_manager(nursery, kube)
    await wait_for(lambda: ("ReplicaSet", "default", "api-1") in manager.view.workloads)

    async def sftp(stream: trio.SocketStream) -> None:  # stands in for the agent's SFTP server
        await stream.send_all(b"SSH-less SFTP\n")

    listeners = await nursery.start(functools.partial(trio.serve_tcp, sftp, 0, host="127.0.0.1"))
    sftp_port = listeners[0].socket.getsockname()[1]
    agent_session = ""

    async def agent_arrives_when_asked() -> None:
        nonlocal agent_session
        await wait_for(lambda: ("Deployment", "default", "api") in manager.agent_workloads)
        info = await client.call(
            aapi.ARRIVE_AS_AGENT,
            aapi.AgentIdentity(
                pod_name="api-1-b",
                namespace="default",
                pod_ip="127.0.0.1",
                workload_name="api",
                workload_kind="Deployment",
                version="0.1.0",
                sftp_port=sftp_port,
            ),
        )
        agent_session = info.session_id

    holder = (await client.call(api.ARRIVE, IDENTITY)).session_id
    eve = (
        await client.call(api.ARRIVE, api.ClientIdentity(user="eve", host="pc", client_version="0"))
    ).session_id
    nursery.start_soon(agent_arrives_when_asked)
    info = await client.call(
        aapi.ENGAGE,
        aapi.EngageRequest(
            session_id=holder, namespace="default", workload="api", agent_timeout=10
        ),
    )
    assert agent_session and info.sftp_port == sftp_port and info.pod_ips == ["127.0.0.1"]

    # Another session (no engagement of that workload): refused, naming why.
    with pytest.raises(TunnelError) as refused:
        await dial(client.link, tcp("127.0.0.1", sftp_port), session=eve)
    assert refused.value.reason is ResetReason.POLICY
    assert "file server of the traffic agent of Deployment default/api" in str(refused.value)

    # The engaging session: its dial-back path to the SFTP port (the daemon's mounts) works.
    stream = await dial(client.link, tcp("127.0.0.1", sftp_port), session=holder)
    received = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            received += chunk
    assert received == b"SSH-less SFTP\n"
    stream.close()

    # Once it leaves, the port is closed to it too.
    await client.call(aapi.LEAVE, aapi.LeaveRequest(session_id=holder, name="api"))
    with pytest.raises(TunnelError, match="does not dial"):
        await dial(client.link, tcp("127.0.0.1", sftp_port), session=holder)
