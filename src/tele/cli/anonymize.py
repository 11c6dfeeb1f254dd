"""`tele gather-logs --anonymize`: the names a bug report should not carry (namespaces, pods,
workloads, the kube context and server, the user and host) and every IP address are replaced
by stand-ins, the same one for the same original in every file, so that the logs still read
as a story ("pod-2 in namespace-1 at 192.0.2.7")."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Final

KEPT_NAMES: Final = frozenset(
    {
        "default", "kube-system", "kube-public", "kube-node-lease", "traffic-manager",
        "traffic-agent", "localhost", "tele", "ambassador",
    }
)  # fmt: skip
"""Names every cluster has (or tele itself uses): they tell nothing about the user's."""

_IPV4: Final = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
_IPV6: Final = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_NAME_EDGE: Final = r"[A-Za-z0-9_-]"

_V4_STAND_INS: Final = ("192.0.2.", "198.51.100.", "203.0.113.")
"""The documentation ranges (RFC 5737): stand-ins no real peer has."""


def _kept(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses that identify nobody: loopback, unspecified, link-local, multicast, masks."""
    if address.is_loopback or address.is_unspecified or address.is_link_local:
        return True
    if address.is_multicast:
        return True
    return isinstance(address, ipaddress.IPv4Address) and str(address).startswith("255.")


class Anonymizer:
    """Replaces the names it was given (by kind: namespace, pod, workload, ...) and every IP
    address; one instance for all the files of a zip keeps stand-ins consistent."""

    def __init__(self, names: Iterable[tuple[str, str]]) -> None:
        self._stand_in: dict[str, str] = {}
        counts: dict[str, int] = {}
        for kind, name in sorted(set(names), key=lambda item: (item[0], item[1])):
            if len(name) < 2 or name in KEPT_NAMES or name in self._stand_in:
                continue
            counts[kind] = counts.get(kind, 0) + 1
            self._stand_in[name] = f"{kind}-{counts[kind]}"
        self._names = None
        if self._stand_in:
            # longest first: a pod name starts with its workload's
            alternatives = "|".join(
                re.escape(name) for name in sorted(self._stand_in, key=lambda n: (-len(n), n))
            )
            self._names = re.compile(rf"(?<!{_NAME_EDGE})(?:{alternatives})(?!{_NAME_EDGE})")
        self._addresses: dict[str, str] = {}

    def _address(self, match: re.Match[str]) -> str:
        text = match[0]
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return text  # a time, a version: not an address
        if _kept(address):
            return text
        key = str(address)
        if key not in self._addresses:
            family = [a for a in self._addresses.values() if (":" in a) == (address.version == 6)]
            number = len(family) + 1
            if address.version == 6:
                self._addresses[key] = f"2001:db8::{number:x}"
            elif number <= 254 * len(_V4_STAND_INS):
                block, host = divmod(number - 1, 254)
                self._addresses[key] = f"{_V4_STAND_INS[block]}{host + 1}"
            else:
                self._addresses[key] = f"ipv4-{number}"
        return self._addresses[key]

    def __call__(self, text: str) -> str:
        if self._names is not None:
            text = self._names.sub(lambda m: self._stand_in[m[0]], text)
        text = _IPV4.sub(self._address, text)
        return _IPV6.sub(self._address, text)
