"""The session's network task (VIF + DNS together) and the undo journal after a crash."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tele.dns.service import SystemSetup
from tele.net.tunnel import Destination
from tele.rpc import manager_api as mapi
from tele.rpc.client import Client
from tele.rpc.h2link import H2Stream
from tele.rpc.tunnel import dial, open_now
from tele.vif import journal
from tele.vif.connect import NetworkOptions, NetworkStatus, serve_network

from .conftest import CLUSTER_SUBNETS, UPSTREAM_NAMES, Namespaces, run_in, upstream_stub


@dataclass
class FakePool:
    client: Client

    async def dial(
        self,
        destination: Destination,
        *,
        session: str,
        dial_id: str | None = None,
        wait: float = 0,
    ) -> H2Stream:
        return await dial(self.client.link, destination, session=session)

    def open_now(
        self, destination: Destination, *, session: str, dial_id: str | None = None
    ) -> H2Stream | None:
        return open_now(self.client.link, destination, session=session)


@dataclass
class Session:
    """A cluster session as the network sees it, on the link to the cluster side."""

    rpc: Client
    namespace: str = "default"
    cluster: mapi.ClusterInfo | None = field(
        default_factory=lambda: mapi.ClusterInfo(
            manager_namespace="ambassador",
            manager_version="test",
            pod_subnets=CLUSTER_SUBNETS[:1],
            service_subnets=CLUSTER_SUBNETS[1:],
            managed_namespaces=["default"],
        )
    )

    @property
    def pool(self) -> FakePool:
        return FakePool(self.rpc)

    def session_id(self) -> str:
        return "test"

    async def client(self) -> Client:
        return self.rpc


def laptop_resolv_conf(netns: Namespaces, text: str) -> Path:
    etc = Path("/etc/netns") / netns.laptop
    etc.mkdir(parents=True, exist_ok=True)
    path = etc / "resolv.conf"
    path.write_text(text)
    return path


async def test_session_network_reaches_the_cluster_by_name(
    netns: Namespaces, cluster_link: Client, nursery: trio.Nursery
) -> None:
    resolv = laptop_resolv_conf(netns, "nameserver 127.0.0.2\n")
    options = NetworkOptions(
        enabled=True,
        netns=netns.laptop,
        dns_setup=SystemSetup.RESOLV_CONF,
        resolv_conf=resolv,
    )
    status: NetworkStatus = await nursery.start(serve_network, options, Session(cluster_link))
    assert status.vif.device == "tele0"
    code = """
import socket
with socket.create_connection(("echo", 7000), timeout=5) as s:
    s.sendall(b"session")
    s.shutdown(socket.SHUT_WR)
    print(s.recv(100).decode())
"""
    result = await run_in(netns.laptop, code)
    assert result.stdout.strip() == "session", result.stderr
    assert status.resolver is not None and status.resolver.counters.cluster >= 1
    summary = status.summary()
    assert summary["subnets"] == ["10.96.0.0/16", "10.244.0.0/16", "fd00:244::/64"]
    assert summary["tcp_connections"] == 1
    assert summary["dns"]["local_ip"] == "198.18.0.53"  # type: ignore[index]


CRASHING_DAEMON = """
import functools, sys, trio
from pathlib import Path
from tele.dns.names import NameRules
from tele.dns.service import DnsSettings, SystemSetup, serve_dns
from tele.vif.privileges import LocalPrivileges
from tele.vif.service import VifSettings, serve_vif

async def never(destination):
    raise AssertionError

async def lookup(name, qtype):
    raise AssertionError

async def main(netns, resolv):
    async with trio.open_nursery() as nursery:
        vif = await nursery.start(
            serve_vif, VifSettings(cluster_subnets=["10.244.0.0/16"], netns=netns), never
        )
        dns = DnsSettings(
            address=str(vif.address), device=vif.device, rules=NameRules(), netns=netns,
            setup=SystemSetup.RESOLV_CONF, resolv_conf=Path(resolv),
        )
        await nursery.start(
            functools.partial(serve_dns, dns, lookup, privileges=LocalPrivileges())
        )
        print("ready", flush=True)

trio.run(main, sys.argv[1], sys.argv[2])
"""


async def test_leftovers_of_a_killed_daemon_are_undone(netns: Namespaces) -> None:
    original = "# mine\nnameserver 127.0.0.2\nsearch example.test\n"
    resolv = laptop_resolv_conf(netns, original)
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, "-c", CRASHING_DAEMON, netns.laptop, str(resolv)],
                stdout=subprocess.PIPE,
                check=False,
                env=dict(os.environ),  # the test's XDG_STATE_HOME: its own undo journal
            )
        )
        assert process.stdout is not None
        with trio.fail_after(10):
            assert (await process.stdout.receive_some(100)).strip() == b"ready"
        assert "nameserver 198.18.0.53" in resolv.read_text()
        process.send_signal(signal.SIGKILL)
    assert {e.device or e.resolv_conf for e in journal.pending()} == {"tele0", str(resolv)}
    done = journal.recover()
    assert resolv.read_text() == original
    assert journal.pending() == []
    assert f"restored {resolv}" in done
    links = await run_in(netns.laptop, "import socket; print(socket.if_nameindex())")
    assert "tele0" not in links.stdout  # the device died with its descriptor


async def test_routes_follow_the_cluster_info(
    netns: Namespaces, cluster_link: Client, nursery: trio.Nursery
) -> None:
    resolv = laptop_resolv_conf(netns, "nameserver 127.0.0.2\n")
    options = NetworkOptions(
        enabled=True, netns=netns.laptop, dns_setup=SystemSetup.RESOLV_CONF, resolv_conf=resolv
    )
    session = Session(cluster_link)
    status: NetworkStatus = await nursery.start(serve_network, options, session)
    assert session.cluster is not None
    grown = mapi.ClusterInfo(
        manager_namespace="ambassador",
        manager_version="test",
        pod_subnets=["10.244.0.0/16", "10.250.0.0/16"],
        service_subnets=[],  # the Service subnet is gone (and the IPv6 one)
    )
    await status.follow(grown)
    routes = await run_in(netns.laptop, "import subprocess; subprocess.run(['ip', 'route'])")
    assert "10.250.0.0/16 dev tele0" in routes.stdout
    assert "10.244.0.0/16 dev tele0" in routes.stdout
    assert "10.96.0.0/16" not in routes.stdout
    assert status.summary()["subnets"] == ["10.244.0.0/16", "10.250.0.0/16"]
    assert {e.device: e.routes for e in journal.pending() if e.device} == {
        "tele0": ["10.244.0.0/16", "10.250.0.0/16"]
    }


@dataclass
class StuckPool:
    """A manager link whose tunnel dials never complete."""

    async def dial(
        self,
        destination: Destination,
        *,
        session: str,
        dial_id: str | None = None,
        wait: float = 0,
    ) -> H2Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def open_now(
        self, destination: Destination, *, session: str, dial_id: str | None = None
    ) -> H2Stream | None:
        return None  # it would wait: `dial`, which never completes


@dataclass
class StuckSession(Session):
    @property
    def pool(self) -> StuckPool:  # type: ignore[override]
        return StuckPool()


async def test_proxy_dial_bounds_a_connection_waiting_for_its_tunnel(
    netns: Namespaces, cluster_link: Client, nursery: trio.Nursery
) -> None:
    """Config timeouts.proxyDial (NetworkOptions.dial_timeout): an app's connection to a cluster
    address whose tunnel stream does not open fails after it, not after the app's own timeout."""
    from tele import config
    from tele.daemon.server import _network_options
    from tele.rpc import daemon_api

    cfg = config.Config(timeouts=config.Timeouts(proxy_dial=config.Duration(0.5)))
    options = _network_options(daemon_api.ConnectRequest(), cfg)
    assert options.dial_timeout == 0.5
    options.enabled, options.netns, options.dns = True, netns.laptop, False
    await nursery.start(serve_network, options, StuckSession(cluster_link))
    code = """
import errno, socket, time
start = time.monotonic()
try:
    socket.create_connection(("10.96.0.7", 7000), timeout=20)
    print("connected", end=" ")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, type(exc).__name__), end=" ")
print(round(time.monotonic() - start, 2))
"""
    result = await run_in(netns.laptop, code)
    outcome, seconds = result.stdout.split()
    assert outcome in ("ECONNREFUSED", "EHOSTUNREACH", "ETIMEDOUT"), result
    assert 0.4 <= float(seconds) < 3, result.stdout  # the default (5s) would be longer


async def test_dns_local_ip_is_the_nameserver_for_other_names(
    netns: Namespaces, cluster_link: Client, nursery: trio.Nursery
) -> None:
    """dns.localIP (config, kubeconfig extension `local-ip`, Helm client.dns.localIP): names
    outside the cluster go there, not to the system's nameserver (here one that never answers)."""
    from tele import config
    from tele.daemon.session import apply_network

    await nursery.start(upstream_stub, netns.laptop)  # answers example.test on 127.0.0.2
    resolv = laptop_resolv_conf(netns, "nameserver 127.0.0.9\noptions timeout:1 attempts:1\n")
    options = NetworkOptions(
        enabled=True, netns=netns.laptop, dns_setup=SystemSetup.RESOLV_CONF, resolv_conf=resolv
    )
    apply_network(options, config.network_from_extension({"dns": {"local-ip": "127.0.0.2"}}))
    assert options.dns_upstream == ["127.0.0.2"]
    status: NetworkStatus = await nursery.start(serve_network, options, Session(cluster_link))
    code = "import socket\nprint(socket.gethostbyname('example.test'))"
    result = await run_in(netns.laptop, code)
    assert result.stdout.strip() == UPSTREAM_NAMES["example.test"], result.stderr
    assert status.resolver is not None and status.resolver.counters.forwarded >= 1
