"""The agent-init program: in the pod's network namespace, redirect each container port that
callers reach by number (a numeric targetPort, or any port of a headless Service: its callers
dial pod IPs) to its agent port (nftables), TCP and UDP, before the app and the agent start.

Only traffic arriving from outside the pod is redirected (the prerouting hook): the agent's own
connections to 127.0.0.1:<containerPort> leave through output and reach the app, as
Telepresence's iptables REDIRECT does. The table is replaced as a whole in one `nft -f`
transaction (`add` + `delete` + define), so running the program again — an init container is
re-run when a pod restarts — leaves exactly one copy of the rules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import trio

from tele.agent.config import AgentSettings
from tele.contracts.agentconfig import Intercept
from tele.errors import ConnectionFailed

log = logging.getLogger(__name__)

TABLE: Final = "tele_agent_init"


Redirect = tuple[int, int, str]
"""(container port, agent port, "tcp" | "udp")."""


def redirects(settings: AgentSettings) -> list[Redirect]:
    """The redirects the configuration needs, each once."""
    found: list[Redirect] = []
    for _, intercept in settings.intercepts():
        redirect = (intercept.container_port, intercept.agent_port, intercept.protocol.lower())
        if needs_redirect(intercept) and redirect not in found and redirect[0] != redirect[1]:
            found.append(redirect)
    return found


def needs_redirect(intercept: Intercept) -> bool:
    """Callers reach the port by its number: a numeric targetPort, or any port of a headless
    Service (its callers dial pod IPs: no Service port name is ever resolved)."""
    return (intercept.target_port_numeric or intercept.headless) and (
        intercept.protocol.upper() in ("TCP", "UDP")
    )


def ruleset(redirects: Sequence[Redirect]) -> str:
    """The nft script: one `inet` table (IPv4 and IPv6), a nat prerouting chain of redirects."""
    rules = "".join(
        f"\t\t{protocol} dport {container} redirect to :{agent}\n"
        for container, agent, protocol in redirects
    )
    return (
        f"add table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        "\tchain prerouting {\n"
        "\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
        f"{rules}"
        "\t}\n"
        "}\n"
    )


async def apply(settings: AgentSettings, *, nft: str = "nft") -> list[Redirect]:
    """Install the redirects in the current network namespace; returns them."""
    pairs = redirects(settings)
    if not pairs:
        log.info("no numeric target ports: nothing to redirect")
        return pairs
    try:
        result = await trio.run_process(
            [nft, "-f", "-"],
            stdin=ruleset(pairs).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    except OSError as exc:
        raise ConnectionFailed(f"cannot run {nft}: {exc.strerror or exc}.") from exc
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise ConnectionFailed(
            "nft refused the port redirect"
            + (f" ({detail[0]})" if detail else "")
            + "; the init container needs the NET_ADMIN capability."
        )
    for container, agent, protocol in pairs:
        log.info("redirecting %s port %d to the agent's port %d", protocol, container, agent)
    return pairs
