"""Two network namespaces per test: a "laptop" where the VIF runs and a "cluster" with echo
servers, joined only by tele's tunnel (an h2 link over a socketpair to `cluster_side.py`).

Everything happens inside namespaces named `tele-vif-<random>`, deleted in finalizers (also
when the test fails); the host namespace never gets a device, route or resolver change.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from tele.dns.names import NameRules
from tele.dns.server import Resolver
from tele.dns.service import DnsSettings, SystemSetup, serve_dns
from tele.rpc import manager_api as mapi
from tele.rpc.client import Client, open_client
from tele.vif.netns import run_in_netns
from tele.vif.privileges import LocalPrivileges
from tele.vif.routing import parse_networks
from tele.vif.service import VifInfo, VifSettings, serve_vif

HERE = Path(__file__).parent
POD_ADDRESS = "10.244.1.5"
CLUSTER_SUBNETS = ["10.244.0.0/16", "10.96.0.0/16", "fd00:244::/64"]
POD_ADDRESS6 = "fd00:244::5"


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
        _ip("-n", spaces.cluster, "addr", "add", f"{POD_ADDRESS6}/128", "dev", "lo", "nodad")
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
    resolver: Resolver
    resolv_conf: Path
    original_resolv_conf: str
    dns_scope: trio.CancelScope
    dns_done: trio.Event


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


UPSTREAM = "127.0.0.2"
"""The laptop's "system" nameserver (a stub in the laptop namespace) for non-cluster names."""
UPSTREAM_NAMES = {"example.test": "192.0.2.7"}


def _stub_reply(data: bytes) -> bytes:
    query = DNSRecord.parse(data)
    reply = query.reply()
    address = UPSTREAM_NAMES.get(str(query.q.qname).rstrip("."))
    if address is None:
        reply.header.rcode = RCODE.NXDOMAIN
    elif query.q.qtype == QTYPE.A:
        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(address), ttl=30))
    return bytes(reply.pack())


async def upstream_stub(netns: str, *, task_status: trio.TaskStatus[None]) -> None:
    """A tiny nameserver on UPSTREAM:53 inside the laptop namespace."""

    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((UPSTREAM, 53))
        return sock

    with trio.socket.from_stdlib_socket(await run_in_netns(netns, bind)) as sock:
        task_status.started()
        while True:
            data, peer = await sock.recvfrom(65535)
            await sock.sendto(_stub_reply(data), peer)


@pytest.fixture
async def tele(
    nursery: trio.Nursery, netns: Namespaces, cluster_link: Client, tmp_path: Path
) -> AsyncIterator[Tele]:
    from tele.rpc.tunnel import dial, open_now

    async def dialer(destination):  # type: ignore[no-untyped-def]
        return await dial(cluster_link.link, destination, session="test")

    settings = VifSettings(cluster_subnets=CLUSTER_SUBNETS, netns=netns.laptop, device="tele0")
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[VifInfo] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            # As the daemon does: a destination just seen open gets its SYN answered early.
            early = functools.partial(open_now, cluster_link.link, session="test")
            await serve_vif(settings, dialer, early_opener=early, task_status=task_status)

    info: VifInfo = await nursery.start(run)
    assert info.subnets == parse_networks(["10.96.0.0/16", "10.244.0.0/16", "fd00:244::/64"])

    await nursery.start(upstream_stub, netns.laptop)
    etc = Path("/etc/netns") / netns.laptop  # `ip netns exec` mounts it on /etc/resolv.conf
    etc.mkdir(parents=True, exist_ok=True)
    resolv_conf = etc / "resolv.conf"
    original = f"# the laptop's own resolver\nnameserver {UPSTREAM}\noptions timeout:1\n"
    resolv_conf.write_text(original)

    async def lookup(name: str, qtype: str) -> mapi.LookupReply:
        request = mapi.LookupRequest(session_id="test", name=name, qtype=qtype)
        return await cluster_link.call(mapi.LOOKUP_DNS, request)

    dns = DnsSettings(
        address=str(info.address),
        device=info.device,
        rules=NameRules(namespace="default", namespaces=["default", "kube-system"]),
        lookup_timeout=2.0,
        netns=netns.laptop,
        setup=SystemSetup.RESOLV_CONF,
        resolv_conf=resolv_conf,
        resolv_backup=tmp_path / "resolv.conf.orig",
    )
    dns_scope = trio.CancelScope()
    dns_done = trio.Event()

    async def run_dns(*, task_status: trio.TaskStatus[Resolver] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with dns_scope:
                await serve_dns(dns, lookup, privileges=LocalPrivileges(), task_status=task_status)
        finally:
            dns_done.set()

    resolver: Resolver = await nursery.start(run_dns)
    yield Tele(info, cluster_link, netns, resolver, resolv_conf, original, dns_scope, dns_done)
    dns_scope.cancel()
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
