"""Which names tele's DNS server answers from the cluster, and what it asks the manager.

Telepresence's rules (compat doc §3), in order: `wpad.*` is refused; exact `excludes` are
NXDOMAIN; `localhost` is loopback; `mappings` alias a name to another (or to an IP, answered as
it is); `x.tel2-search` (the search domain tele installs) is `x`; a single label is a name in
the connected namespace; names ending in an `exclude_suffixes` entry go to the system's
resolver unless a longer `include_suffixes` entry matches; a mapped namespace as the last
label, `svc`, the cluster domain and the include suffixes go to the cluster; everything else to
the system's resolver.
Pure functions over strings: no I/O.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

SEARCH_DOMAIN = "tel2-search"
DEFAULT_EXCLUDE_SUFFIXES = (".com", ".io", ".net", ".org", ".ru")


class Route(enum.Enum):
    CLUSTER = "cluster"
    LOCAL = "local"
    NXDOMAIN = "nxdomain"
    LOOPBACK = "loopback"
    ADDRESS = "address"
    """A mapping to an IP: answered with it (`ask` is the address)."""


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    ask: str = ""
    """For CLUSTER: the name to look up through the manager (lower case, no trailing dot)."""


@dataclass(slots=True)
class NameRules:
    """The client's DNS settings (kubeconfig extension / config `dns` keys) and the session."""

    namespace: str = "default"
    """The connected namespace: single-label names are looked up there."""
    namespaces: Sequence[str] = ()
    """Mapped (or managed) namespaces: each usable as a top-level domain."""
    cluster_domain: str = "cluster.local"
    include_suffixes: Sequence[str] = ()
    exclude_suffixes: Sequence[str] = DEFAULT_EXCLUDE_SUFFIXES
    excludes: Sequence[str] = ()
    mappings: dict[str, str] = field(default_factory=dict)
    """name -> the name it is an alias for, or the IP address it is answered with
    (`mappings[{name, aliasFor}]`)."""

    def decide(self, qname: str) -> Decision:
        name = qname.lower().rstrip(".")
        if not name:
            return Decision(Route.LOCAL)
        labels = name.split(".")
        if labels[-1] == SEARCH_DOMAIN:
            # What the system resolver asks through the search path is the name itself: the
            # same rules (an excluded or mapped name stays so).
            labels = labels[:-1]
            name = ".".join(labels)
            if not name:
                return Decision(Route.NXDOMAIN)
        if labels[0] == "wpad":
            return Decision(Route.NXDOMAIN)
        if name in self._set(self.excludes):
            return Decision(Route.NXDOMAIN)
        if name == "localhost" or name.endswith(".localhost"):
            return Decision(Route.LOOPBACK)
        alias = {k.lower().rstrip("."): v for k, v in self.mappings.items()}.get(name)
        if alias is not None:
            try:
                return Decision(Route.ADDRESS, str(ipaddress.ip_address(alias)))
            except ValueError:
                return Decision(Route.CLUSTER, alias.lower().rstrip("."))
        if len(labels) == 1:
            return Decision(Route.CLUSTER, f"{name}.{self.namespace}")
        include = _longest_suffix(name, self.include_suffixes)
        exclude = _longest_suffix(name, self.exclude_suffixes)
        if exclude > include:
            return Decision(Route.LOCAL)
        domain = self.cluster_domain.lower().strip(".")
        if (
            labels[-1] in self._set(self.namespaces)
            or labels[-1] == "svc"
            or name == domain
            or name.endswith("." + domain)
            or include
        ):
            return Decision(Route.CLUSTER, name)
        return Decision(Route.LOCAL)

    @staticmethod
    def _set(names: Sequence[str]) -> set[str]:
        return {n.lower().rstrip(".") for n in names}


def _longest_suffix(name: str, suffixes: Sequence[str]) -> int:
    """Length of the longest suffix (".com", "corp.example") that `name` ends with, else 0."""
    best = 0
    for suffix in suffixes:
        s = suffix.lower().strip(".")
        if s and (name == s or name.endswith("." + s)):
            best = max(best, len(s) + 1)
    return best
