"""The service proxy (kube-proxy's job): Services' ClusterIPs DNAT to ready endpoints via nftables.

`ruleset` is pure: Services + Endpoints in, nft script out. `serve_proxy` watches the store and
replaces the whole table atomically in the node namespace on each change (one `nft -f`
transaction, so traffic never sees a half-written table). Endpoints are chosen at random per
connection (`numgen random`); a pod that reaches itself through its Service is masqueraded (the
hairpin case), the way kube-proxy marks such packets.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from tele.sandbox.apiserver.store import Event, Store

from . import netns

log = logging.getLogger(__name__)

TABLE = "tele-proxy"
_MASQ_MARK = "0x4000"
ApiObject = dict[str, Any]


def ruleset(services: list[ApiObject], endpoints: dict[tuple[str, str], ApiObject]) -> str:
    """The nft script for `services` (ClusterIP ones) and their Endpoints by (namespace, name)."""
    lines = [
        f"table ip {TABLE} {{}}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "  chain services {",
    ]
    chains: list[str] = []
    n = 0
    for svc in services:
        spec = svc.get("spec") or {}
        ip = spec.get("clusterIP")
        if not ip or ip == "None" or spec.get("type") == "ExternalName":
            continue
        meta = svc["metadata"]
        ep = endpoints.get((meta.get("namespace", ""), meta["name"]))
        for port in spec.get("ports") or []:
            proto = str(port.get("protocol") or "TCP").lower()
            targets = _targets(ep, port)
            if not targets:
                continue
            n += 1
            chain = f"svc{n}"
            lines.append(f"    ip daddr {ip} {proto} dport {port['port']} jump {chain}")
            body = [f"  chain {chain} {{"]
            if len(targets) == 1:
                body += _endpoint(targets[0], proto)
            else:
                verdicts = ", ".join(f"{i} : jump {chain}e{i}" for i in range(len(targets)))
                body.append(f"    numgen random mod {len(targets)} vmap {{ {verdicts} }}")
                for i, target in enumerate(targets):
                    chains += [f"  chain {chain}e{i} {{", *_endpoint(target, proto), "  }"]
            body.append("  }")
            chains += body
    lines.append("  }")
    lines += chains
    lines += [
        "  chain prerouting {",
        "    type nat hook prerouting priority -100; policy accept;",
        "    jump services",
        "  }",
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",
        "    jump services",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority 100; policy accept;",
        f"    meta mark & {_MASQ_MARK} == {_MASQ_MARK} masquerade",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _endpoint(target: tuple[str, int], proto: str) -> list[str]:
    ip, port = target
    return [
        f"    ip saddr {ip} meta mark set meta mark | {_MASQ_MARK}",
        f"    meta l4proto {proto} dnat to {ip}:{port}",
    ]


def _targets(ep: ApiObject | None, svc_port: ApiObject) -> list[tuple[str, int]]:
    """Ready (ip, port) pairs of Endpoints `ep` for one Service port (matched by name)."""
    out: list[tuple[str, int]] = []
    for subset in (ep or {}).get("subsets") or []:
        for p in subset.get("ports") or []:
            if (p.get("name") or "") != (svc_port.get("name") or ""):
                continue
            for addr in subset.get("addresses") or []:
                out.append((addr["ip"], int(p["port"])))
    return sorted(set(out))


async def serve_proxy(
    store: Store, node: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Keep the node's nftables table in step with Services and Endpoints until cancelled."""
    changed = trio.Event()

    def on_event(event: Event) -> None:
        changed.set()

    unsubscribe = [store.subscribe(r, on_event) for r in ("/services", "/endpoints")]
    applied = ""
    try:
        first = True
        while True:
            changed = trio.Event()
            services = store.objects("/services")
            eps = {
                (e["metadata"].get("namespace", ""), e["metadata"]["name"]): e
                for e in store.objects("/endpoints")
            }
            script = ruleset(services, eps)
            if script != applied:
                await netns.run(
                    "ip", "netns", "exec", node, "nft", "-f", "-", stdin=script.encode()
                )
                applied = script
            if first:
                task_status.started()
                first = False
            await changed.wait()
    finally:
        for unsub in unsubscribe:
            unsub()
