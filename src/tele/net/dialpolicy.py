"""Where tele does not dial for a client (issue 15 item 5): the dialer's own loopback and host,
link-local and cloud metadata addresses, whatever the address family's spelling; the traffic
manager (its tunnel) and the agents (--proxy-via dials) apply it alike. Sans-IO."""

from __future__ import annotations

import ipaddress
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK = "it is the traffic manager's own loopback"
METADATA = "it is a cloud metadata address (it hands out the node's credentials)"
LINK_LOCAL = "it is link-local (the node's own network, not the cluster's)"

NEVER_DIALED: Final[tuple[tuple[_Network, str], ...]] = tuple(
    (ipaddress.ip_network(network), why)
    for network, why in (
        ("127.0.0.0/8", LOOPBACK),
        ("::1/128", LOOPBACK),
        ("0.0.0.0/8", LOOPBACK),  # Linux connects 0.0.0.0 to the host itself
        ("::/128", LOOPBACK),
        ("169.254.169.254/32", METADATA),  # AWS, GCP, Azure, OpenStack
        ("100.100.100.200/32", METADATA),  # Alibaba Cloud
        ("fd00:ec2::254/128", METADATA),  # AWS over IPv6
        ("169.254.0.0/16", LINK_LOCAL),
        ("fe80::/10", LINK_LOCAL),
    )
)


def never_dialed(ip: IPAddress, *, allow_loopback: bool = False) -> str:
    """Why the manager must not dial `ip` for anyone, or "" (IPv4-mapped and NAT64-free
    spellings of an IPv4 address count as that address)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for network, why in NEVER_DIALED:
        if ip.version == network.version and ip in network:
            if why == LOOPBACK and allow_loopback:
                return ""
            return why
    return ""
