"""Cluster DNS at 10.96.0.10 (UDP and TCP), answered from the store like CoreDNS'
(its kubernetes plugin).

`resolve` is pure (store in, dnslib reply out): Services (A; SRV for named ports), headless
Services (ready pod IPs, and `<hostname>.<service>` for StatefulSet pods), `a-b-c-d.<ns>.pod`
names, NXDOMAIN for every other name. The sockets are opened inside the node namespace.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

import trio
from dnslib import QTYPE, RCODE, RR, SRV, A, DNSError, DNSRecord
from dnslib.label import DNSLabelError

from tele.sandbox.apiserver.store import Store

from . import netns
from .node import DNS_IP

log = logging.getLogger(__name__)

DOMAIN = "cluster.local"
TTL = 5
ApiObject = dict[str, Any]


def _ready_addresses(store: Store, ns: str, name: str) -> list[ApiObject]:
    ep = store.get("/endpoints", ns, name) or {}
    return [a for s in ep.get("subsets") or [] for a in s.get("addresses") or []]


def resolve(store: Store, request: DNSRecord) -> DNSRecord:
    reply = request.reply()
    reply.header.ra = 0
    qname = str(request.q.qname).rstrip(".").lower()
    qtype = QTYPE[request.q.qtype]
    answers = _answers(store, qname, qtype)
    if answers is None:
        reply.header.rcode = RCODE.NXDOMAIN
        return reply
    for rr in answers:
        reply.add_answer(rr)
    return reply


def _answers(store: Store, qname: str, qtype: str) -> list[RR] | None:
    """Records for `qname`/`qtype`: [] when the name exists without them, None for NXDOMAIN."""
    if not qname.endswith("." + DOMAIN):
        return None
    labels = qname[: -len(DOMAIN) - 1].split(".")
    if len(labels) == 3 and labels[2] == "pod":
        ip = labels[0].replace("-", ".")
        try:
            socket.inet_aton(ip)
        except OSError:
            return None
        return [RR(qname, QTYPE.A, rdata=A(ip), ttl=TTL)] if qtype in ("A", "ANY") else []
    if len(labels) < 3 or labels[-1] != "svc":
        return None
    ns, svc_name = labels[-2], labels[-3]
    svc = store.get("/services", ns, svc_name)
    if svc is None:
        return None
    spec = svc.get("spec") or {}
    rest = labels[:-3]
    if len(rest) == 0:
        if qtype in ("A", "ANY"):
            if spec.get("clusterIP") and spec["clusterIP"] != "None":
                return [RR(qname, QTYPE.A, rdata=A(spec["clusterIP"]), ttl=TTL)]
            ips = sorted({a["ip"] for a in _ready_addresses(store, ns, svc_name)})
            return [RR(qname, QTYPE.A, rdata=A(ip), ttl=TTL) for ip in ips]
        if qtype == "AAAA":
            return []
        if qtype == "SRV":
            return _srv(qname, spec, f"{qname}.", None)
        return []
    if len(rest) == 1:
        for addr in _ready_addresses(store, ns, svc_name):
            if addr.get("hostname") == rest[0]:
                return [RR(qname, QTYPE.A, rdata=A(addr["ip"]), ttl=TTL)] if qtype == "A" else []
        return None
    if len(rest) == 2 and rest[0].startswith("_") and rest[1].startswith("_"):
        port_name, proto = rest[0][1:], rest[1][1:].upper()
        wanted = [
            p
            for p in spec.get("ports") or []
            if p.get("name") == port_name and (p.get("protocol") or "TCP") == proto
        ]
        if not wanted:
            return None
        base = ".".join(labels[-3:]) + "." + DOMAIN + "."
        return _srv(qname, {"ports": wanted}, base, None) if qtype in ("SRV", "ANY") else []
    return None


def _srv(qname: str, spec: ApiObject, target: str, _: None) -> list[RR]:
    return [
        RR(qname, QTYPE.SRV, rdata=SRV(0, 100, int(p["port"]), target), ttl=TTL)
        for p in spec.get("ports") or []
        if p.get("name")
    ]


def _answer_bytes(store: Store, data: bytes) -> bytes | None:
    """The reply to one query, or None to drop it. Never raises for anything a client sends: a
    question that cannot go back on the wire (a 64-byte label, a compression chain past 255
    bytes) is FORMERR built from the header alone; a bug answers SERVFAIL, its traceback logged."""
    try:
        request = DNSRecord.parse(data)
    except (DNSError, IndexError, struct.error, ValueError, UnicodeError):
        return None
    try:
        return bytes(resolve(store, request).pack())
    except (DNSError, DNSLabelError):
        rcode = RCODE.FORMERR
    except Exception:
        log.exception("cluster DNS: a query failed; answering SERVFAIL")
        rcode = RCODE.SERVFAIL
    return _header_only(data, rcode)


def _header_only(query: bytes, rcode: int) -> bytes:
    """A reply with `rcode` and no sections, built from the query's header alone (its question
    may be what cannot be packed)."""
    ident, flags = struct.unpack_from("!HH", query)
    return struct.pack("!6H", ident, 0x8000 | 0x0080 | (flags & 0x7900) | rcode, 0, 0, 0, 0)


async def _udp(store: Store, sock: trio.socket.SocketType) -> None:
    while True:
        data, peer = await sock.recvfrom(4096)
        out = _answer_bytes(store, data)
        if out is not None:
            await sock.sendto(out, peer)


async def _tcp_client(store: Store, stream: trio.SocketStream) -> None:
    buf = b""
    try:
        async with stream:
            while True:
                while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buf += chunk
                size = int.from_bytes(buf[:2], "big")
                msg, buf = buf[2 : 2 + size], buf[2 + size :]
                out = _answer_bytes(store, msg)
                if out is None:
                    return
                await stream.send_all(len(out).to_bytes(2, "big") + out)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_dns(
    store: Store,
    node: str,
    address: str = DNS_IP,
    port: int = 53,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer DNS on address:port (UDP and TCP) inside namespace `node` until cancelled."""
    udp = await netns.socket_in(node, socket.AF_INET, socket.SOCK_DGRAM)
    tcp = await netns.socket_in(node, socket.AF_INET, socket.SOCK_STREAM)
    with udp, tcp:
        await udp.bind((address, port))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await tcp.bind((address, port))
        tcp.listen(128)
        listener = trio.SocketListener(tcp)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_udp, store, udp)
            nursery.start_soon(trio.serve_listeners, lambda s: _tcp_client(store, s), [listener])
            task_status.started()


__all__ = ["resolve", "serve_dns"]
