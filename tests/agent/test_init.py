"""agent-init: the nftables redirect of numeric target ports, idempotent, in a private netns."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import msgspec
import pytest

from tele.agent.init import redirects, ruleset
from tele.contracts.agentconfig import Intercept
from tests.agent.servers import settings_for


def numeric_settings() -> object:
    settings = settings_for(8080)
    container = settings.config.containers[0]
    numeric = msgspec.structs.replace(
        container.intercepts[0], target_port_numeric=True, container_port_name=""
    )
    extra = Intercept(
        service_name="echo",
        service_uid="u",
        service_port=81,
        target_port_numeric=True,
        container_port=8081,
        agent_port=9901,
    )
    named = msgspec.structs.replace(container.intercepts[0], service_port=82, agent_port=9902)
    udp = msgspec.structs.replace(extra, protocol="UDP", container_port=53, agent_port=9903)
    containers = [msgspec.structs.replace(container, intercepts=[numeric, extra, named, udp])]
    config = msgspec.structs.replace(settings.config, containers=containers)
    return msgspec.structs.replace(settings, config=config)


def test_numeric_tcp_and_udp_ports_are_redirected_named_ones_are_not() -> None:
    assert redirects(numeric_settings()) == [  # type: ignore[arg-type]
        (8080, 9900, "tcp"),
        (8081, 9901, "tcp"),
        (53, 9903, "udp"),
    ]
    script = ruleset([(8080, 9900, "tcp"), (53, 9903, "udp")])
    assert "hook prerouting" in script and "tcp dport 8080 redirect to :9900" in script
    assert "udp dport 53 redirect to :9903" in script
    assert "output" not in script  # the agent's own dials to the app must not loop back


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth: `caller` 10.77.0.1, `pod` 10.77.0.2."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft to create network namespaces")
    tag = secrets.token_hex(3)
    caller, pod = f"tele-ai-{tag}-c", f"tele-ai-{tag}-p"
    created: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        for name in (caller, pod):
            ip("netns", "add", name)
            created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", caller, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", pod)
        for name, dev, address in ((caller, "v0", "10.77.0.1"), (pod, "v1", "10.77.0.2")):
            ip("-n", name, "addr", "add", f"{address}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
        yield caller, pod
    finally:
        for name in created:
            subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, timeout=10, check=False
            )


SERVER = """
import socket, sys
s = socket.create_server(("0.0.0.0", 9900))
print("ready", flush=True)
c, _ = s.accept()
c.sendall(b"agent port got it")
c.close()
"""

CLIENT = """
import socket
c = socket.create_connection(("10.77.0.2", 8080), timeout=5)
print(c.recv(100).decode())
"""


@pytest.mark.netns
def test_agent_init_redirects_the_container_port_and_is_idempotent(
    netns_pair: tuple[str, str],
) -> None:
    caller, pod = netns_pair
    settings = numeric_settings()
    env = {
        **os.environ,
        "_TEL_AGENT_CONFIG": json.dumps(msgspec.to_builtins(settings.config)),  # type: ignore[attr-defined]
    }
    run_init = ["ip", "netns", "exec", pod, sys.executable, "-m", "tele.agent", "agent-init"]
    for _ in range(2):
        done = subprocess.run(run_init, env=env, capture_output=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
    listed = subprocess.run(
        ["ip", "netns", "exec", pod, "nft", "list", "table", "inet", "tele_agent_init"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert listed.count("redirect to :9900") == 1 and listed.count("redirect to :9901") == 1

    with subprocess.Popen(
        ["ip", "netns", "exec", pod, sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            assert server.stdout is not None and server.stdout.readline() == "ready\n"
            answer = subprocess.run(
                ["ip", "netns", "exec", caller, sys.executable, "-c", CLIENT],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            assert answer.strip() == "agent port got it"
        finally:
            server.kill()
            server.wait(timeout=10)


def test_agent_init_without_nft_rights_says_so_in_one_sentence() -> None:
    env = {
        **os.environ,
        "_TEL_AGENT_CONFIG": json.dumps(msgspec.to_builtins(numeric_settings().config)),  # type: ignore[attr-defined]
        "PATH": "/nonexistent",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tele.agent", "agent-init"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "cannot run nft" in done.stderr
