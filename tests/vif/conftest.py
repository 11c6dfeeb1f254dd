"""Two network namespaces per test: a "laptop" where the VIF runs and a "cluster" with echo
servers, joined only by tele's tunnel (an h2 link over a socketpair to `cluster_side.py`).

Everything happens inside namespaces named `tele-vif-<random>`, deleted in finalizers (also
when the test fails); the host namespace never gets a device, route or resolver change.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tele.rpc.client import Client, open_client
from tele.vif.routing import parse_networks
from tele.vif.service import VifInfo, VifSettings, serve_vif

HERE = Path(__file__).parent
POD_ADDRESS = "10.244.1.5"
CLUSTER_SUBNETS = ["10.244.0.0/16", "10.96.0.0/16"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Namespaces:
    laptop: str
    cluster: str


@pytest.fixture
def netns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Namespaces]:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        pytest.skip("needs root and /dev/net/tun to create network namespaces")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the undo journal
    tag = secrets.token_hex(4)
    spaces = Namespaces(f"tele-vif-{tag}", f"tele-vif-{tag}-c")
    created: list[str] = []
    try:
        for name in (spaces.laptop, spaces.cluster):
            _ip("netns", "add", name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", spaces.cluster, "addr", "add", f"{POD_ADDRESS}/32", "dev", "lo")
        yield spaces
    finally:
        for name in created:
            subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, timeout=10, check=False
            )
        etc = Path("/etc/netns") / spaces.laptop
        if etc.exists():
            for child in etc.iterdir():
                child.unlink()
            etc.rmdir()


@dataclass
class Tele:
    """The laptop side: the VIF's info and an RPC client on the link to the cluster side."""

    vif: VifInfo
    client: Client
    netns: Namespaces


@pytest.fixture
async def cluster_link(netns: Namespaces) -> AsyncIterator[Client]:
    """An RPC/tunnel client link to `cluster_side.py` running in the cluster namespace."""
    ours, theirs = trio.socket.socketpair()
    process = await trio.lowlevel.open_process(
        [
            "ip", "netns", "exec", netns.cluster, sys.executable, str(HERE / "cluster_side.py"),
            str(theirs.fileno()), POD_ADDRESS,
        ],
        pass_fds=[theirs.fileno()],
    )  # fmt: skip
    theirs.close()
    try:
        async with open_client(trio.SocketStream(ours)) as client:
            yield client
    finally:
        process.kill()
        with trio.move_on_after(5):
            await process.wait()


@pytest.fixture
async def tele(
    nursery: trio.Nursery, netns: Namespaces, cluster_link: Client
) -> AsyncIterator[Tele]:
    from tele.rpc.tunnel import dial

    async def dialer(destination):  # type: ignore[no-untyped-def]
        return await dial(cluster_link.link, destination, session="test")

    settings = VifSettings(cluster_subnets=CLUSTER_SUBNETS, netns=netns.laptop, device="tele0")
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[VifInfo] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_vif(settings, dialer, task_status=task_status)

    info: VifInfo = await nursery.start(run)
    assert info.subnets == parse_networks(CLUSTER_SUBNETS)[::-1]
    yield Tele(info, cluster_link, netns)
    scope.cancel()


async def run_in(netns: str, code: str, *, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet inside `netns`; returns the completed process (text output)."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            ["ip", "netns", "exec", netns, sys.executable, "-c", code],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )
