"""Container probes (httpGet, tcpSocket, exec) made from the node's network namespace."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from tele.sandbox.network import netns
from tele.sandbox.network.errors import NodeError

ApiObject = dict[str, Any]


def resolve_port(port: Any, container: ApiObject) -> int | None:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    return None


async def run_probe(
    probe: ApiObject,
    node: str,
    pod_ip: str,
    container: ApiObject,
    run_exec: Callable[[list[str]], Awaitable[int]],
) -> bool:
    """One probe attempt; True on success. Failures of any kind count as a failed probe."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    with trio.move_on_after(timeout):
        try:
            if "exec" in probe:
                return await run_exec(list(probe["exec"].get("command") or [])) == 0
            spec = probe.get("httpGet") or probe.get("tcpSocket") or {}
            port = resolve_port(spec.get("port"), container)
            if port is None:
                return False
            host = spec.get("host") or pod_ip
            stream = await netns.connect_in(node, host, port)
            async with stream:
                if "tcpSocket" in probe:
                    return True
                path = spec.get("path") or "/"
                headers = "".join(
                    f"{h['name']}: {h['value']}\r\n" for h in spec.get("httpHeaders") or []
                )
                await stream.send_all(
                    f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32"
                    f"\r\n{headers}Connection: close\r\n\r\n".encode()
                )
                head = b""
                while b"\r\n" not in head:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return False
                    head += chunk
                parts = head.split(b" ", 2)
                return len(parts) > 1 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
        except (OSError, trio.BrokenResourceError, NodeError):
            return False
    return False
