"""Stream floods: one peer opening streams without end cannot take the server's memory or
its other callers' service. The server refuses streams past its per-link cap and the process's
handler budget, cuts a request body that does not arrive, and gives its memory back when the
flood ends (RSS before / during / after is printed: run with -s to see it)."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from tele.rpc import wire
from tele.rpc.client import open_client
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2link import LinkSettings, StreamBudget
from tele.rpc.method import Unary
from tele.rpc.server import (
    CALLER,
    REQUEST_BODY_TIMEOUT,
    HandlerShares,
    Router,
    serve_connection,
)


class Echo(msgspec.Struct):
    text: str


ECHO = Unary("/test.v1/Echo", Echo, Echo)
STREAMS = 30_000

# The attacker: a raw h2 client that opens STREAMS calls, sends their headers and never a
# body, reads whatever comes back (so that its socket never blocks the server's writes), and
# says "flooded" once everything is sent; it stays connected until its stdin closes.
ATTACKER = """
import socket, sys, threading
import h2.config, h2.connection, h2.events
port, count = int(sys.argv[1]), int(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port))
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
conn.local_settings.max_concurrent_streams = 2**31 - 1
refused = 0
lock = threading.Lock()
def read():
    global refused
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return
        with lock:
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.StreamReset):
                    refused += 1
            sock.sendall(conn.data_to_send())
threading.Thread(target=read, daemon=True).start()
headers = [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
           (":path", "/test.v1/Echo"), ("content-type", "application/json")]
sent = 0
try:
    for n in range(count):
        with lock:
            # ignore the server's SETTINGS_MAX_CONCURRENT_STREAMS, as a hostile peer would
            conn.remote_settings.max_concurrent_streams = 2**31 - 1
            conn.send_headers(conn.get_next_available_stream_id(), headers)
            sent += 1
            if n % 500 == 0:
                sock.sendall(conn.data_to_send())
    with lock:
        sock.sendall(conn.data_to_send())
except Exception as exc:  # the server ended the connection: the flood is over
    print("ended:", type(exc).__name__, file=sys.stderr)
print("flooded", flush=True)
sys.stdin.read()
print("sent", sent, "refused", refused, flush=True)
"""


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


async def echo(request: Echo) -> Echo:
    return request


@pytest.fixture
async def server() -> AsyncIterator[int]:
    router = Router()
    router.unary(ECHO, echo)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_tcp, lambda s: serve_connection(s, router), 0, host="127.0.0.1"
            )
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_a_flood_of_bodiless_streams_is_capped_and_its_memory_given_back(server: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server)
    async with open_client(stream) as other:
        assert await other.call(ECHO, Echo("warm-up")) == Echo("warm-up")
        before = rss_mib()
        attacker = await trio.lowlevel.open_process(
            [sys.executable, "-c", ATTACKER, str(server), str(STREAMS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert attacker.stdin is not None and attacker.stdout is not None
        try:
            with trio.fail_after(120):
                line = b""
                while not line.endswith(b"\n"):
                    line += await attacker.stdout.receive_some(100)
                assert line == b"flooded\n"
                # Everyone else is still served while the flood holds its streams open.
                for n in range(20):
                    assert await other.call(ECHO, Echo(str(n)), timeout=5) == Echo(str(n))
                during = rss_mib()
                await attacker.stdin.aclose()
                out = b""
                while chunk := await attacker.stdout.receive_some(100):
                    out += chunk
                await attacker.wait()
            _, sent, _, refused = (int(w) if w.isdigit() else 0 for w in out.split())
        finally:
            if attacker.returncode is None:
                attacker.kill()
                await attacker.wait()
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked(0.2)
        assert await other.call(ECHO, Echo("after")) == Echo("after")
        after = rss_mib()
    print(
        f"\nRSS of the server: {before:.1f} MiB before, {during:.1f} MiB once one peer sent "
        f"{STREAMS} bodiless streams ({sent} before the server cut its link, {refused} refused "
        f"one by one), {after:.1f} MiB after the flood"
    )
    assert sent == STREAMS or refused == 0  # refused one by one, or the link cut at the cap
    assert during - before < 60, "the flood's streams took more memory than the cap allows"
    assert after - before < 15, "the flood's memory was not given back"


async def test_the_process_budget_caps_handlers_across_links() -> None:
    budget = StreamBudget(3)
    settings = LinkSettings(budget=budget)
    started = trio.Event()
    waiting = 0

    async def hang(request: Echo) -> Echo:
        nonlocal waiting
        waiting += 1
        if waiting == 3:
            started.set()
        await trio.sleep_forever()
        raise AssertionError

    router = Router()
    router.unary(ECHO, hang)
    async with trio.open_nursery() as nursery:
        clients = []
        for _ in range(2):
            left, right = trio.testing.memory_stream_pair()
            nursery.start_soon(lambda s=right: serve_connection(s, router, settings=settings))
            clients.append(await nursery.start(_client, left))
        for client in (clients[0], clients[0], clients[1]):
            nursery.start_soon(client.call, ECHO, Echo("hang"))
        await started.wait()
        with pytest.raises(RpcError) as info:
            await clients[1].call(ECHO, Echo("one too many"))
        assert "refused" in info.value.message.lower() or info.value.code is Code.UNAVAILABLE
        assert budget.in_use == 3 and budget.refused == 1
        nursery.cancel_scope.cancel()
    assert budget.in_use == 0


LOGIN = Unary("/test.v1/Login", Echo, Echo)
HANG = Unary("/test.v1/Hang", Echo, Echo)


async def test_one_identitys_flood_ends_at_its_share_and_the_others_are_still_served() -> None:
    total = StreamBudget(7)
    shares = HandlerShares(total, share=3)
    hanging: dict[object, int] = {}
    changed = trio.Event()

    async def login(request: Echo) -> Echo:
        connection = CALLER.get()
        assert connection is not None
        connection.principal = request.text  # as an authenticator does, once it has checked
        return request

    async def hang(request: Echo) -> Echo:
        nonlocal changed
        connection = CALLER.get()
        assert connection is not None
        hanging[connection.principal] = hanging.get(connection.principal, 0) + 1
        changed.set()
        changed = trio.Event()
        await trio.sleep_forever()
        raise AssertionError

    async def wait_for(who: object, count: int) -> None:
        with trio.fail_after(5):
            while hanging.get(who, 0) < count:
                await changed.wait()

    router = Router()
    router.unary(ECHO, echo)
    router.unary(LOGIN, login)
    router.unary(HANG, hang)
    async with trio.open_nursery() as nursery:
        clients = []
        for _ in range(4):
            left, right = trio.testing.memory_stream_pair()
            nursery.start_soon(functools.partial(serve_connection, right, router, shares=shares))
            clients.append(await nursery.start(_client, left))
        alice_1, alice_2, bob, nobody = clients
        for client, name in ((alice_1, "alice"), (alice_2, "alice"), (bob, "bob")):
            assert await client.call(LOGIN, Echo(name)) == Echo(name)
        # alice floods over two links: her share (3) is the limit, not the process's (7).
        for client in (alice_1, alice_1, alice_2):
            nursery.start_soon(client.call, HANG, Echo("flood"))
        await wait_for("alice", 3)
        for client in (alice_1, alice_2):
            with pytest.raises(RpcError) as info:
                await client.call(HANG, Echo("one too many"))
            assert info.value.code is Code.UNAVAILABLE
        shares_alice = shares.of("alice")
        assert shares_alice is not None and shares_alice.in_use == 3
        # bob and an unauthenticated caller are served from their own shares meanwhile.
        assert await bob.call(ECHO, Echo("bob")) == Echo("bob")
        assert await nobody.call(ECHO, Echo("nobody")) == Echo("nobody")
        for _ in range(3):
            nursery.start_soon(bob.call, HANG, Echo("bob's own"))
        await wait_for("bob", 3)
        assert total.in_use == 6
        # The total still holds: nobody's share has room, the process has one handler left.
        nursery.start_soon(nobody.call, HANG, Echo("last"))
        await wait_for(None, 1)
        with pytest.raises(RpcError):
            await nobody.call(ECHO, Echo("past the total"))
        assert total.in_use == 7
        nursery.cancel_scope.cancel()
    assert total.in_use == 0


async def _client(transport: trio.abc.Stream, *, task_status: trio.TaskStatus[object]) -> None:
    async with open_client(transport) as client:
        task_status.started(client)
        await client.link.wait_closed()


async def test_a_request_body_that_never_comes_is_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = Router()
    router.unary(ECHO, echo)
    async with trio.open_nursery() as nursery:
        left, right = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_connection, right, router)
        async with open_client(left) as client:
            stream = await client.link.open_stream(wire.request_headers(ECHO.path, None))
            await stream.send_all(b'{"te')  # and nothing more, ever
            with trio.fail_after(REQUEST_BODY_TIMEOUT + 1):
                headers = await stream.receive_response()
            status = wire.parse_status(headers)
            assert status is not None and status[0] is Code.DEADLINE_EXCEEDED
        nursery.cancel_scope.cancel()
