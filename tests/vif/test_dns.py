"""tele's DNS server end to end: programs in the laptop namespace resolve cluster names through
the resolv.conf tele installs there, other names through the laptop's own resolver."""

from __future__ import annotations

import pytest
import trio

from tele.dns.names import NameRules, Route
from tele.vif import journal

from .conftest import POD_ADDRESS, Tele, run_in

RESOLVE = """
import socket, time
start = time.monotonic()
try:
    print(socket.gethostbyname("{name}"), end=" ")
except OSError as exc:
    print(type(exc).__name__, end=" ")
print(round(time.monotonic() - start, 3))
"""


async def resolve(tele: Tele, name: str) -> tuple[str, float]:
    result = await run_in(tele.netns.laptop, RESOLVE.format(name=name))
    assert result.returncode == 0, result.stderr
    answer, seconds = result.stdout.split()
    return answer, float(seconds)


@pytest.mark.parametrize(
    "name", ["echo.default", "echo.default.svc.cluster.local", "echo", "ECHO.Default."]
)
async def test_cluster_names_resolve(tele: Tele, name: str) -> None:
    assert (await resolve(tele, name))[0] == POD_ADDRESS


async def test_missing_name_is_nxdomain_quickly(tele: Tele) -> None:
    answer, seconds = await resolve(tele, "missing.default")
    assert answer == "gaierror"
    assert seconds < 1.0
    assert tele.resolver.counters.failures == 0


async def test_other_names_go_to_the_laptops_resolver(tele: Tele) -> None:
    assert (await resolve(tele, "example.test"))[0] == "192.0.2.7"
    assert tele.resolver.counters.forwarded >= 1


async def test_connect_by_name_through_the_tunnel(tele: Tele) -> None:
    code = """
import socket
with socket.create_connection(("echo.default", 7000), timeout=5) as s:
    s.sendall(b"by name")
    s.shutdown(socket.SHUT_WR)
    print(s.recv(100).decode())
"""
    result = await run_in(tele.netns.laptop, code)
    assert result.stdout.strip() == "by name", result.stderr


async def test_mappings_excludes_and_include_suffixes_as_programs_see_them(tele: Tele) -> None:
    """The settings `tele connect` merges (README: Settings) as the resolver applies them: a name
    mapped to an IP is answered with it, one mapped to a name with that name's cluster address,
    an excluded name does not exist, an include suffix goes to the cluster."""
    rules = tele.resolver.rules
    rules.mappings = {"db.local": "10.1.2.3", "alias.example.test": "echo.default"}
    rules.include_suffixes = ["corp.internal"]
    assert (await resolve(tele, "db.local"))[0] == "10.1.2.3"
    assert (await resolve(tele, "alias.example.test"))[0] == POD_ADDRESS
    assert (await resolve(tele, "echo.default.svc.cluster.local"))[0] == POD_ADDRESS
    rules.excludes = ["echo.default.svc.cluster.local"]
    assert (await resolve(tele, "echo.default.svc.cluster.local"))[0] == "gaierror"
    asked = tele.resolver.counters.cluster
    await resolve(tele, "api.corp.internal")
    assert tele.resolver.counters.cluster > asked


async def test_dns_over_tcp(tele: Tele) -> None:
    code = f"""
import socket, struct
from dnslib import DNSRecord
query = DNSRecord.question("echo.default", "A").pack()
with socket.create_connection(("{tele.vif.address}", 53), timeout=5) as s:
    s.sendall(struct.pack("!H", len(query)) + query)
    size = struct.unpack("!H", s.recv(2))[0]
    reply = DNSRecord.parse(s.recv(size))
print(reply.rr[0].rdata)
"""
    result = await run_in(tele.netns.laptop, code)
    assert result.stdout.strip() == POD_ADDRESS, result.stderr


async def test_answers_are_cached(tele: Tele) -> None:
    await resolve(tele, "echo.default")
    hits = tele.resolver.counters.cache_hits
    await resolve(tele, "echo.default")
    assert tele.resolver.counters.cache_hits > hits


async def test_resolv_conf_is_restored_exactly(tele: Tele) -> None:
    assert f"nameserver {tele.vif.address}" in tele.resolv_conf.read_text()
    assert str(tele.resolv_conf) in [e.resolv_conf for e in journal.pending()]
    tele.dns_scope.cancel()
    with trio.fail_after(5):
        await tele.dns_done.wait()
    assert tele.resolv_conf.read_text() == tele.original_resolv_conf
    assert [e.device for e in journal.pending()] == ["tele0"]  # the VIF is still up


def test_name_rules() -> None:
    rules = NameRules(
        namespace="dev",
        namespaces=["dev", "prod"],
        include_suffixes=["corp.io"],
        excludes=["secret.dev"],
        mappings={"db": "postgres.prod", "legacy.corp": "10.1.2.3", "v6.corp": "fd00::5"},
    )
    cases = {
        "wpad.corp.": (Route.NXDOMAIN, ""),
        "secret.dev": (Route.NXDOMAIN, ""),
        "secret.dev.tel2-search.": (Route.NXDOMAIN, ""),  # through the search path: the same
        "db.tel2-search": (Route.CLUSTER, "postgres.prod"),
        "localhost.": (Route.LOOPBACK, ""),
        "db": (Route.CLUSTER, "postgres.prod"),
        "legacy.corp.": (Route.ADDRESS, "10.1.2.3"),
        "V6.corp": (Route.ADDRESS, "fd00::5"),
        "web": (Route.CLUSTER, "web.dev"),
        "web.tel2-search.": (Route.CLUSTER, "web.dev"),
        "web.prod": (Route.CLUSTER, "web.prod"),
        "web.prod.svc": (Route.CLUSTER, "web.prod.svc"),
        "web.other.svc.cluster.local": (Route.CLUSTER, "web.other.svc.cluster.local"),
        "api.corp.io": (Route.CLUSTER, "api.corp.io"),
        "github.com": (Route.LOCAL, ""),
        "example.test": (Route.LOCAL, ""),
    }
    for name, (route, ask) in cases.items():
        decision = rules.decide(name)
        assert (decision.route, decision.ask) == (route, ask), name
