"""tele's DNS server on the VIF's address (UDP and TCP): cluster names through the manager's
LOOKUP_DNS, everything else forwarded to the resolver the system had before.

`Resolver.answer(query) -> reply` is the whole policy (names.py decides, the cache remembers,
the manager or the upstream answers); `serve_udp` / `serve_tcp` are thin loops around it. A
cluster lookup that takes longer than `lookup_timeout` is SERVFAIL (not cached), so a program
never hangs on tele; misses are NXDOMAIN at once and cached briefly (negative caching).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import trio
from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSError, DNSLabelError, DNSRecord

from tele.dns.cache import TTLCache
from tele.dns.names import NameRules, Route
from tele.errors import TeleError
from tele.rpc import manager_api as mapi

log = logging.getLogger(__name__)

Lookup = Callable[[str, str], Awaitable[mapi.LookupReply]]
"""(name, qtype) -> the manager's answer; raises on transport failure."""

NEGATIVE_TTL: Final = 4.0
UPSTREAM_TIMEOUT: Final = 3.0
MAX_IN_FLIGHT: Final = 256
"""Queries answered at once; more wait (UDP: are dropped) so a flood cannot grow memory."""
MAX_TCP_CONNECTIONS: Final = 64
"""DNS-over-TCP connections at once; a new one past this closes the longest idle one (RFC 7766
6.2.3), so idle connections held open by one program cannot lock out every other's queries."""
TCP_IDLE_TIMEOUT: Final = 10.0
"""A connection with no query for this long is closed (RFC 7766 suggests seconds)."""
TCP_MESSAGE_TIMEOUT: Final = 5.0
"""A query begun on a TCP connection must arrive whole within this (no byte-a-minute trickle)."""
UDP_MAX: Final = 512
MAX_NAME: Final = 255
MAX_LABEL: Final = 63
_TCP_LEN = struct.Struct("!H")
_HEADER = struct.Struct("!HHHHHH")
_LINK_ERRORS = (TeleError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)
"""How a lookup fails when the manager or the link to it does (not a bug of ours)."""
_PARSE_ERRORS = (DNSError, DNSLabelError, struct.error, IndexError, ValueError, UnicodeError)
"""What dnslib raises for bytes that are not a DNS message (found by fuzzing): a drop."""
_PACK_ERRORS = (DNSError, DNSLabelError, struct.error, ValueError, UnicodeError)
"""What dnslib raises for a reply it cannot put on the wire (a name or record out of bounds)."""


@dataclass(slots=True)
class Counters:
    queries: int = 0
    cluster: int = 0
    forwarded: int = 0
    cache_hits: int = 0
    failures: int = 0


class Upstream:
    """Forwards raw queries over one UDP socket to the system's nameservers, matching replies
    by a fresh query id (so concurrent clients with equal ids do not mix)."""

    def __init__(self, sock: trio.socket.SocketType, servers: Sequence[tuple[str, int]]) -> None:
        self.sock = sock
        self.servers = list(servers)
        self._pending: dict[int, tuple[trio.Event, list[bytes]]] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                data, peer = await self.sock.recvfrom(65535)
            except OSError as exc:  # an ICMP error of an earlier send, say: not the end
                log.debug("dns upstream: receiving: %s", exc)
                continue
            if len(data) < 2 or (peer[0], peer[1]) not in self.servers:
                continue
            (ident,) = struct.unpack_from("!H", data)
            waiting = self._pending.get(ident)
            if waiting is not None:
                waiting[1].append(data)
                waiting[0].set()

    async def forward(self, query: bytes) -> bytes | None:
        """The upstream's reply with the client's id, or None when none answered in time."""
        if not self.servers or len(query) < 12:
            return None
        original = query[:2]
        ident = random.randrange(1 << 16)
        while ident in self._pending:
            ident = random.randrange(1 << 16)
        event = trio.Event()
        box: list[bytes] = []
        self._pending[ident] = (event, box)
        try:
            rewritten = struct.pack("!H", ident) + query[2:]
            for server in self.servers:
                try:
                    await self.sock.sendto(rewritten, server)
                except OSError as exc:
                    log.debug("dns upstream %s: %s", server, exc)
                    continue
                with trio.move_on_after(UPSTREAM_TIMEOUT):
                    await event.wait()
                if box:
                    return original + box[0][2:]
            return None
        finally:
            del self._pending[ident]


class Resolver:
    """Answers one DNS message (wire bytes in, wire bytes out)."""

    def __init__(
        self,
        rules: NameRules,
        lookup: Lookup,
        upstream: Upstream | None,
        *,
        lookup_timeout: float = 8.0,
    ) -> None:
        self.rules = rules
        self.lookup = lookup
        self.upstream = upstream
        self.lookup_timeout = lookup_timeout
        self.cache: TTLCache[mapi.LookupReply] = TTLCache()
        self.counters = Counters()
        self._limit = trio.CapacityLimiter(MAX_IN_FLIGHT)

    @property
    def busy(self) -> bool:
        """As many queries in flight as the limit allows."""
        return self._limit.borrowed_tokens >= MAX_IN_FLIGHT

    async def answer(self, data: bytes, *, udp: bool) -> bytes | None:
        """The reply to `data`, or None for something that is not a DNS query.

        Never raises for anything a client sends: a query whose name is out of bounds is FORMERR,
        a reply that cannot be packed is SERVFAIL (one log line), and a bug while answering is
        SERVFAIL with its traceback in the log."""
        try:
            query = DNSRecord.parse(data)
        except _PARSE_ERRORS as exc:
            log.debug("dns: dropping a message that does not parse: %s", exc)
            return None
        if query.header.qr or not query.questions:
            return None
        self.counters.queries += 1
        if not all(_name_fits(q.qname) for q in query.questions):
            return _header_only(data, RCODE.FORMERR)
        async with self._limit:
            try:
                reply = await self._answer(query, data)
            except _PACK_ERRORS as exc:
                self.counters.failures += 1
                log.warning("dns: cannot answer %s: %s", _describe(query), exc)
                return _header_only(data, RCODE.SERVFAIL)
            except Exception:
                self.counters.failures += 1
                log.exception("dns: answering %s failed", _describe(query))
                return _header_only(data, RCODE.SERVFAIL)
        if reply is None:
            return None
        if udp and len(reply) > _udp_limit(query):
            truncated = query.reply()
            truncated.header.tc = 1
            truncated.header.rcode = RCODE.NOERROR
            return bytes(truncated.pack())
        return reply

    async def _answer(self, query: Any, raw: bytes) -> bytes | None:
        question = query.q
        qname = str(question.qname)
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        decision = self.rules.decide(qname)
        reply = query.reply()
        if decision.route is Route.NXDOMAIN:
            reply.header.rcode = RCODE.NXDOMAIN
            return bytes(reply.pack())
        if decision.route is Route.LOOPBACK:
            if qtype == "A":
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
            elif qtype == "AAAA":
                reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA("::1"), ttl=60))
            return bytes(reply.pack())
        if decision.route is Route.ADDRESS:
            address = ipaddress.ip_address(decision.ask)
            if qtype == "A" and address.version == 4:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(decision.ask), ttl=60))
            elif qtype == "AAAA" and address.version == 6:
                reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(decision.ask), ttl=60))
            return bytes(reply.pack())
        if decision.route is Route.LOCAL:
            self.counters.forwarded += 1
            if self.upstream is None:
                reply.header.rcode = RCODE.SERVFAIL
                return bytes(reply.pack())
            forwarded = await self.upstream.forward(raw)
            if forwarded is None:
                self.counters.failures += 1
                reply.header.rcode = RCODE.SERVFAIL
                return bytes(reply.pack())
            return forwarded
        self.counters.cluster += 1
        asked = qtype if qtype in ("A", "AAAA", "SRV") else "A"
        found = await self._cluster(decision.ask, asked)
        if found is None:
            self.counters.failures += 1
            reply.header.rcode = RCODE.SERVFAIL
            return bytes(reply.pack())
        if found.rcode == "NXDOMAIN":
            reply.header.rcode = RCODE.NXDOMAIN
        elif found.rcode != "NOERROR":
            reply.header.rcode = RCODE.SERVFAIL
        elif asked == qtype:
            for record in found.records:
                rr = _rr(question.qname, record)
                if rr is not None:
                    reply.add_answer(rr)
        return bytes(reply.pack())

    async def _cluster(self, name: str, qtype: str) -> mapi.LookupReply | None:
        key = (name, qtype)
        now = trio.current_time()
        cached = self.cache.get(key, now)
        if cached is not None:
            self.counters.cache_hits += 1
            return cached
        with trio.move_on_after(self.lookup_timeout):
            try:
                found = await self.lookup(name, qtype)
            except _LINK_ERRORS as exc:  # the link or the manager failed: SERVFAIL, not a crash
                log.warning("dns: looking up %s %s failed: %s", name, qtype, exc)
                return None
            except Exception:  # a bug: SERVFAIL still, but with its traceback
                log.exception("dns: looking up %s %s failed", name, qtype)
                return None
            if found.rcode == "NOERROR" and found.records:
                ttl = float(max(1, min(r.ttl for r in found.records)))
            elif found.rcode in ("NXDOMAIN", "NOERROR"):
                ttl = NEGATIVE_TTL
            else:
                ttl = 0
            self.cache.put(key, found, ttl, trio.current_time())
            return found
        log.warning(
            "dns: the manager did not answer %s %s within %gs", name, qtype, self.lookup_timeout
        )
        return None


def _name_fits(qname: Any) -> bool:
    """Whether a parsed name can go back on the wire: labels of at most 63 bytes, the whole name
    (length bytes and root included) at most 255 (RFC 1035 2.3.4). A query breaks these with one
    long label or a chain of compression pointers."""
    labels = qname.label
    return all(len(label) <= MAX_LABEL for label in labels) and (
        sum(len(label) + 1 for label in labels) + 1 <= MAX_NAME
    )


def _header_only(query: bytes, rcode: int) -> bytes:
    """A reply with `rcode` and no sections, built from the query's header alone (for a query
    whose question cannot be echoed)."""
    ident, flags = struct.unpack_from("!HH", query)
    opcode_rd = flags & 0x7900  # opcode and RD copied, as RFC 1035 4.1.1 asks
    return _HEADER.pack(ident, 0x8000 | 0x0080 | opcode_rd | rcode, 0, 0, 0, 0)


def _describe(query: Any) -> str:
    try:
        return f"{query.q.qname} {QTYPE.get(query.q.qtype, query.q.qtype)}"
    except Exception:  # a description must never be the error
        return "a query"


def _udp_limit(query: Any) -> int:
    for rr in query.ar:
        if rr.rtype == QTYPE.OPT:
            return max(UDP_MAX, int(rr.rclass))
    return UDP_MAX


def _rr(qname: Any, record: mapi.DnsRecord) -> Any:
    try:
        if record.type == "A":
            return RR(qname, QTYPE.A, rdata=A(record.value), ttl=record.ttl)
        if record.type == "AAAA":
            return RR(qname, QTYPE.AAAA, rdata=AAAA(record.value), ttl=record.ttl)
        if record.type == "SRV":
            priority, weight, port, target = record.value.split()
            rdata = SRV(int(priority), int(weight), int(port), target)
            return RR(qname, QTYPE.SRV, rdata=rdata, ttl=record.ttl)
    except (ValueError, DNSError, DNSLabelError) as exc:
        log.warning("dns: ignoring a bad record from the manager %s: %s", record, exc)
    return None


async def serve_udp(resolver: Resolver, sock: trio.socket.SocketType) -> None:
    """Answer datagrams on `sock`; each query its own task, bounded by the resolver's limit.

    A datagram ends at most its own task: whatever goes wrong is logged and the datagram
    dropped (the client retries)."""

    async def one(data: bytes, peer: Any) -> None:
        try:
            reply = await resolver.answer(data, udp=True)
            if reply is not None:
                await sock.sendto(reply, peer)
        except OSError as exc:
            log.debug("dns: reply to %s failed: %s", peer, exc)
        except Exception:
            log.exception("dns: a query from %s failed; dropped", peer)

    async with trio.open_nursery() as nursery:
        while True:
            try:
                data, peer = await sock.recvfrom(65535)
            except OSError as exc:  # e.g. ICMP port unreachable of an earlier reply (Linux)
                log.debug("dns: receiving: %s", exc)
                continue
            if resolver.busy:
                continue  # overloaded: the client retries
            nursery.start_soon(one, data, peer)


class _TcpConnections:
    """The open DNS-over-TCP connections and whether each is waiting for a query."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.idle_since: dict[trio.CancelScope, float | None] = {}

    def admit(self, scope: trio.CancelScope) -> bool:
        """Make room for a new connection: close the longest idle one when full; False when
        every connection is in the middle of a query."""
        if len(self.idle_since) >= self.limit:
            idle = [(since, id(s), s) for s, since in self.idle_since.items() if since is not None]
            if not idle:
                return False
            victim = min(idle)[2]
            victim.cancel()
            del self.idle_since[victim]
        self.idle_since[scope] = trio.current_time()
        return True


async def serve_tcp(
    resolver: Resolver,
    listener: trio.abc.Listener[trio.SocketStream],
    *,
    max_connections: int = MAX_TCP_CONNECTIONS,
    idle_timeout: float = TCP_IDLE_TIMEOUT,
) -> None:
    """Answer length-prefixed queries on TCP connections (RFC 7766), several per connection.

    Each connection waits at most `idle_timeout` for a query and TCP_MESSAGE_TIMEOUT for the
    rest of one it began; past `max_connections` the longest idle one makes room."""
    connections = _TcpConnections(max_connections)

    async def receive_exactly(stream: trio.SocketStream, buffer: bytearray, size: int) -> bool:
        while len(buffer) < size:
            data = await stream.receive_some(65537)
            if not data:
                return False
            buffer += data
        return True

    async def queries(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        buffer = bytearray()
        while True:
            connections.idle_since[scope] = trio.current_time()
            with trio.move_on_after(idle_timeout) as idle:
                if not buffer and not await receive_exactly(stream, buffer, 1):
                    return
            if idle.cancelled_caught:
                return
            connections.idle_since[scope] = None
            with trio.move_on_after(TCP_MESSAGE_TIMEOUT) as late:
                if not await receive_exactly(stream, buffer, 2):
                    return
                (length,) = _TCP_LEN.unpack_from(buffer)
                if not await receive_exactly(stream, buffer, 2 + length):
                    return
            if late.cancelled_caught:
                log.debug("dns: a TCP query did not arrive whole in time")
                return
            message = bytes(buffer[2 : 2 + length])
            del buffer[: 2 + length]
            reply = await resolver.answer(message, udp=False)
            if reply is None:
                return
            await stream.send_all(_TCP_LEN.pack(len(reply)) + reply)

    async def connection(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.CancelScope() as scope:
                if not connections.admit(scope):
                    return  # every connection is busy: the client retries or uses UDP
                try:
                    await queries(stream, scope)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    log.debug("dns: a TCP connection ended: %s", exc)
                except Exception:
                    log.exception("dns: a TCP connection failed; closed")
                finally:
                    connections.idle_since.pop(scope, None)

    await trio.serve_listeners(connection, [listener])


def bind_sockets(address: str, port: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    """The server's UDP and TCP sockets on `address`:`port` and the upstream UDP socket.

    Blocking and namespace-bound: call it in the namespace the server serves (netns.py).
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind((address, port))
        tcp.bind((address, port))
        tcp.listen(128)
        upstream.bind(("0.0.0.0", 0))
    except BaseException:
        for s in (udp, tcp, upstream):
            s.close()
        raise
    return udp, tcp, upstream
