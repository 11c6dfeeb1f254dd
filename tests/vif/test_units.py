"""The VIF's and DNS server's logic without devices: subnet arithmetic, conflict checks, the
resolver's timeout, caching and rcodes (trio's MockClock instead of waiting)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import trio
import trio.testing
from dnslib import RCODE, DNSRecord

from tele.dns import system
from tele.dns.names import NameRules
from tele.dns.server import NEGATIVE_TTL, Resolver
from tele.rpc import manager_api as mapi
from tele.vif.routing import (
    Route,
    conflict_message,
    find_conflict,
    parse_networks,
    proxied_subnets,
)


def nets(*texts: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return parse_networks(texts)


def test_never_proxy_is_carved_out_of_the_cluster_subnets() -> None:
    routed = proxied_subnets(nets("10.96.0.0/16"), nets("192.168.5.0/24"), nets("10.96.0.0/17"))
    assert routed == nets("10.96.128.0/17", "192.168.5.0/24")
    assert proxied_subnets(nets("10.0.0.0/8", "10.1.0.0/16", "fd00::/64")) == nets(
        "10.0.0.0/8", "fd00::/64"
    )
    assert proxied_subnets(nets("10.0.0.0/16"), never=nets("10.0.0.0/8")) == []


def test_conflicts_name_the_route_and_interface() -> None:
    existing = [
        Route(ipaddress.ip_network("0.0.0.0/0"), "eth0"),
        Route(ipaddress.ip_network("10.244.0.0/16"), "tele0"),
        Route(ipaddress.ip_network("10.244.7.0/24"), "wg0"),
    ]
    wanted = nets("10.96.0.0/16", "10.244.0.0/16")
    found = find_conflict(wanted, existing, own_interface="tele0")
    assert found == (wanted[1], existing[2])
    assert "route 10.244.7.0/24 on interface wg0" in conflict_message(*found)
    assert find_conflict(wanted, existing, own_interface="tele0", allow=nets("10.0.0.0/8")) is None


def query(name: str, qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


class Manager:
    """Answers like the manager's LOOKUP_DNS; counts calls; can hang."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.hang = False

    async def lookup(self, name: str, qtype: str) -> mapi.LookupReply:
        self.calls.append((name, qtype))
        if self.hang:
            await trio.sleep_forever()
        if name == "web.dev" and qtype == "A":
            record = mapi.DnsRecord(name=name, type="A", value="10.96.0.7", ttl=30)
            return mapi.LookupReply(rcode="NOERROR", records=[record])
        if name == "web.dev":
            return mapi.LookupReply(rcode="NOERROR")
        return mapi.LookupReply(rcode="NXDOMAIN")


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_resolver_caches_by_ttl_and_negatively(clock: trio.testing.MockClock) -> None:
    manager = Manager()
    resolver = Resolver(
        NameRules(namespace="dev", namespaces=["dev"]), manager.lookup, None, lookup_timeout=2
    )
    reply = DNSRecord.parse(await resolver.answer(query("web"), udp=True))
    assert [str(rr.rdata) for rr in reply.rr] == ["10.96.0.7"]
    assert reply.rr[0].ttl == 30
    await resolver.answer(query("web.dev."), udp=True)
    assert manager.calls == [("web.dev", "A")]  # the second came from the cache
    clock.jump(31)
    await resolver.answer(query("web"), udp=True)
    assert len(manager.calls) == 2

    missing = DNSRecord.parse(await resolver.answer(query("nope.dev"), udp=True))
    assert missing.header.rcode == RCODE.NXDOMAIN
    await resolver.answer(query("nope.dev"), udp=True)
    assert manager.calls.count(("nope.dev", "A")) == 1
    clock.jump(NEGATIVE_TTL)
    await resolver.answer(query("nope.dev"), udp=True)
    assert manager.calls.count(("nope.dev", "A")) == 2

    # A name that exists without records of the asked type: NOERROR, empty answer.
    txt = DNSRecord.parse(await resolver.answer(query("web.dev", "TXT"), udp=True))
    assert (txt.header.rcode, txt.rr) == (RCODE.NOERROR, [])
    aaaa = DNSRecord.parse(await resolver.answer(query("web.dev", "AAAA"), udp=True))
    assert (aaaa.header.rcode, aaaa.rr) == (RCODE.NOERROR, [])


async def test_a_slow_manager_is_servfail_after_the_lookup_timeout(
    clock: trio.testing.MockClock,
) -> None:
    manager = Manager()
    manager.hang = True
    resolver = Resolver(
        NameRules(namespace="dev", namespaces=["dev"]), manager.lookup, None, lookup_timeout=4
    )
    start = trio.current_time()
    reply = DNSRecord.parse(await resolver.answer(query("web"), udp=True))
    assert reply.header.rcode == RCODE.SERVFAIL
    assert trio.current_time() - start == pytest.approx(4)
    manager.hang = False
    reply = DNSRecord.parse(await resolver.answer(query("web"), udp=True))  # not cached
    assert [str(rr.rdata) for rr in reply.rr] == ["10.96.0.7"]


async def test_resolver_ignores_garbage_and_answers_local_rules() -> None:
    resolver = Resolver(NameRules(namespace="dev", namespaces=["dev"]), Manager().lookup, None)
    assert await resolver.answer(b"\x00\x01garbage", udp=True) is None
    wpad = DNSRecord.parse(await resolver.answer(query("wpad.corp.example"), udp=True))
    assert wpad.header.rcode == RCODE.NXDOMAIN
    local = DNSRecord.parse(await resolver.answer(query("localhost"), udp=True))
    assert [str(rr.rdata) for rr in local.rr] == ["127.0.0.1"]
    # No upstream configured: names outside the cluster fail instead of hanging.
    other = DNSRecord.parse(await resolver.answer(query("example.com"), udp=True))
    assert other.header.rcode == RCODE.SERVFAIL


def test_resolv_conf_is_rewritten_in_place_and_restored(tmp_path: Path) -> None:
    # In place: a bind-mounted /etc/resolv.conf (ip netns exec, containers) keeps its inode, so
    # the mount and the file behind it are the ones changed and restored, nobody else's.
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.1\n")
    inode = resolv.stat().st_ino
    backup = tmp_path / "state" / "resolv.conf.tele-orig"
    system.override_resolv_conf(resolv, backup, "198.18.0.53", ["tel2-search", "dev"])
    assert resolv.stat().st_ino == inode
    assert "nameserver 198.18.0.53\nsearch tel2-search dev\n" in resolv.read_text()
    assert backup.read_text() == "nameserver 192.0.2.1\n"
    # A second override (a restarted session) keeps the true original.
    system.override_resolv_conf(resolv, backup, "198.18.0.54", ["tel2-search"])
    assert backup.read_text() == "nameserver 192.0.2.1\n"
    system.restore_resolv_conf(resolv, backup)
    assert resolv.stat().st_ino == inode
    assert resolv.read_text() == "nameserver 192.0.2.1\n"
    assert not backup.exists()


def test_a_symlinked_resolv_conf_is_replaced_and_the_link_restored(tmp_path: Path) -> None:
    target = tmp_path / "stub-resolv.conf"
    target.write_text("nameserver 127.0.0.53\n")
    resolv = tmp_path / "resolv.conf"
    resolv.symlink_to(target)
    backup = tmp_path / "resolv.conf.tele-orig"
    system.override_resolv_conf(resolv, backup, "198.18.0.53", ["tel2-search"])
    assert not resolv.is_symlink()
    assert target.read_text() == "nameserver 127.0.0.53\n"  # the manager's file is untouched
    system.restore_resolv_conf(resolv, backup)
    assert resolv.is_symlink() and resolv.resolve() == target
