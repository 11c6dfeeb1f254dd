"""The VIF end to end: real programs in the laptop namespace reach the cluster namespace only
through the TUN device, tele's userspace TCP/IP and the tunnel."""

from __future__ import annotations

import subprocess

import pytest
import trio

from tele.vif import journal
from tele.vif.errors import RouteConflict
from tele.vif.service import VifSettings, serve_vif

from .conftest import CLUSTER_SUBNETS, POD_ADDRESS, POD_ADDRESS6, Namespaces, Tele, run_in

TRANSFER = """
import hashlib, os, socket, threading
block = os.urandom(1 << 20)
blocks = {size} >> 20
s = socket.create_connection(("{ip}", 7000), timeout=30)
sent = hashlib.sha256()
def send():
    for i in range(blocks):  # every MiB different, without holding the whole payload
        chunk = block[i % 4096:] + block[:i % 4096]
        sent.update(chunk)
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
sender = threading.Thread(target=send)
sender.start()
got = hashlib.sha256()
n = 0
while chunk := s.recv(1 << 20):
    got.update(chunk)
    n += len(chunk)
sender.join()
print(n, got.hexdigest() == sent.hexdigest())
"""


async def test_one_gib_each_way_arrives_intact(tele: Tele) -> None:
    # 1 GiB to the cluster's echo server and the same 1 GiB back, at once, sha256 both.
    size = 1 << 30
    result = await run_in(
        tele.netns.laptop, TRANSFER.format(size=size, ip=POD_ADDRESS), timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(size), "True"]
    assert tele.vif.counters.tcp_connections == 1


async def test_tcp_over_ipv6(tele: Tele) -> None:
    code = f"""
import socket
with socket.create_connection(("{POD_ADDRESS6}", 7000), timeout=5) as s:
    source = s.getsockname()[0]
    s.sendall(b"six" * 10000)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
print(got == b"six" * 10000, source)
"""
    result = await run_in(tele.netns.laptop, code)
    assert result.stdout.split() == ["True", "fd7e:1e00::53"], result.stderr


async def test_500_connections_open_at_once_all_complete(tele: Tele) -> None:
    code = f"""
import socket, threading, concurrent.futures as cf
barrier = threading.Barrier(100)
def five(t):
    socks = [socket.create_connection(("{POD_ADDRESS}", 7000), timeout=20) for _ in range(5)]
    barrier.wait(timeout=30)  # all 500 are open now
    ok = 0
    for i, s in enumerate(socks):
        msg = b"hello %d %d" % (t, i)
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(100):
            got += chunk
        ok += got == msg
        s.close()
    return ok
with cf.ThreadPoolExecutor(100) as pool:
    print(sum(pool.map(five, range(100))))
"""
    result = await run_in(tele.netns.laptop, code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "500"
    assert tele.vif.counters.tcp_connections == 500


async def test_the_app_sends_after_the_far_end_closed_its_side(tele: Tele) -> None:
    """The far end greets and half-closes first; the app reads to EOF, then sends and closes:
    its bytes still reach the far end (the VIF's relay goes on after the tunnel's EOF). Twice,
    the second connection accepted early (a destination just seen open)."""
    code = f"""
import socket
for n in range(2):
    with socket.create_connection(("{POD_ADDRESS}", 7002), timeout=5) as s:
        got = b""
        while chunk := s.recv(100):
            got += chunk
        s.sendall(b"after your eof %d" % n)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""
    with socket.create_connection(("{POD_ADDRESS}", 7003), timeout=10) as s:
        s.sendall(b"%d" % n)
        print(got.decode(), s.recv(100).decode())
"""
    result = await run_in(tele.netns.laptop, code)
    assert result.stdout.splitlines() == [
        "ready after your eof 0",
        "ready after your eof 1",
    ], result.stderr


async def test_closed_port_is_refused_at_once(tele: Tele) -> None:
    code = f"""
import socket, time
start = time.monotonic()
try:
    socket.create_connection(("{POD_ADDRESS}", 7999), timeout=5)
except OSError as exc:
    print(type(exc).__name__, exc.strerror, round(time.monotonic() - start, 3))
"""
    result = await run_in(tele.netns.laptop, code)
    name, *words, seconds = result.stdout.split()
    assert (name, " ".join(words)) == ("ConnectionRefusedError", "Connection refused")
    assert float(seconds) < 1.0


async def test_a_reset_by_the_server_reaches_the_app(tele: Tele) -> None:
    code = f"""
import socket
s = socket.create_connection(("{POD_ADDRESS}", 7001), timeout=5)
s.sendall(b"crash now")
try:
    print(s.recv(100))
except OSError as exc:
    print(type(exc).__name__)
"""
    result = await run_in(tele.netns.laptop, code)
    assert result.stdout.strip() == "ConnectionResetError", result.stderr


async def test_unreachable_address_fails_fast(tele: Tele) -> None:
    code = """
import socket, time
start = time.monotonic()
try:
    socket.create_connection(("10.244.9.9", 80), timeout=5)
except OSError as exc:
    print(type(exc).__name__, round(time.monotonic() - start, 3))
"""
    result = await run_in(tele.netns.laptop, code)
    name, seconds = result.stdout.split()
    assert name == "OSError"  # EHOSTUNREACH / ENETUNREACH, not a timeout
    assert float(seconds) < 1.0


async def test_udp_echo(tele: Tele) -> None:
    code = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect(("{POD_ADDRESS}", 7000))
for i in range(5):
    s.send(b"ping %d" % i)
    print(s.recv(100).decode())
"""
    result = await run_in(tele.netns.laptop, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"ping {i}" for i in range(5)]


async def test_ping_a_cluster_address(tele: Tele) -> None:
    code = f"""
import socket, struct
def csum(b):
    v = int.from_bytes(b, "big") % 0xFFFF
    return ~v & 0xFFFF
body = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"tele-ping!"
packet = body[:2] + csum(body).to_bytes(2, "big") + body[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(5)
s.sendto(packet, ("{POD_ADDRESS}", 0))
reply = s.recv(200)[20:]
print(reply[0], reply[4:8].hex(), reply[8:].decode())
"""
    result = await run_in(tele.netns.laptop, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "12340001", "tele-ping!"]


def _routes(netns: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, "route"], check=True, capture_output=True, text=True
    ).stdout


async def test_teardown_removes_routes_and_device(netns: Namespaces) -> None:
    before = _routes(netns.laptop)

    async def never(destination):  # type: ignore[no-untyped-def]
        raise AssertionError("no dial expected")

    settings = VifSettings(cluster_subnets=CLUSTER_SUBNETS, netns=netns.laptop)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(lambda **kw: serve_vif(settings, never, **kw))
        assert info.device == "tele0"
        assert "10.244.0.0/16 dev tele0" in _routes(netns.laptop)
        assert [e.device for e in journal.pending()] == ["tele0"]
        nursery.cancel_scope.cancel()
    assert _routes(netns.laptop) == before
    assert "tele0" not in _links(netns.laptop)
    assert journal.pending() == []


def _links(netns: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, "link"], check=True, capture_output=True, text=True
    ).stdout


async def test_conflicting_route_is_refused_with_a_sentence(netns: Namespaces) -> None:
    for args in (
        "link add office0 type veth peer office1",
        "link set office0 up",
        "route add 10.244.5.0/24 dev office0",
    ):
        await trio.run_process(["ip", "-n", netns.laptop, *args.split()])

    async def never(destination):  # type: ignore[no-untyped-def]
        raise AssertionError("no dial expected")

    settings = VifSettings(cluster_subnets=CLUSTER_SUBNETS, netns=netns.laptop)
    with pytest.raises(RouteConflict) as info:
        await serve_vif(settings, never)
    assert "10.244.5.0/24 on interface office0" in str(info.value)
    assert "tele0" not in _routes(netns.laptop)
    assert "tele0" not in _links(netns.laptop)
