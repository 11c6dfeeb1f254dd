"""Which http engagement a request belongs to (sans-IO: names, values and paths in, a choice out).

Semantics (reference §8): `--http-header` filters are ANDed, each `K=V` or `K: V` with the name
case-insensitive and the value exact or a `*` glob (`*` matches any run of characters); a header
sent several times matches if any of its values does. `--http-path-equal|prefix|regex` filters
are ORed with each other and ANDed with the headers; paths are matched without the query string,
a regex anywhere in the path (anchor it with ^…$ to match the whole path). An engagement with no
filter takes every request. Requests that match no engagement go to the app.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tele.agent.errors import FilterError
from tele.rpc.agent_api import Engagement

log = logging.getLogger(__name__)

RawHeaders = Iterable[tuple[bytes, bytes]]


def parse_header_filter(text: str) -> tuple[str, str]:
    """`K=V` or `K: V` (the first `=` or `:` separates) into (name, value pattern)."""
    cuts = [i for i in (text.find("="), text.find(":")) if i > 0]
    if not cuts:
        raise FilterError(f"header filter {text!r} is not of the form NAME=VALUE or 'NAME: VALUE'.")
    cut = min(cuts)
    name, value = text[:cut].strip(), text[cut + 1 :].strip()
    if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
        raise FilterError(f"header filter {text!r} does not start with a valid header name.")
    return name, value


def _glob(value: str) -> re.Pattern[bytes]:
    parts = (re.escape(p.encode()) for p in value.split("*"))
    return re.compile(b".*".join(parts), re.DOTALL)


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """One engagement's filters, compiled."""

    headers: tuple[tuple[bytes, re.Pattern[bytes]], ...] = ()
    path_equal: frozenset[str] = frozenset()
    path_prefix: tuple[str, ...] = ()
    path_regex: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def of(cls, engagement: Engagement) -> RequestFilter:
        """Compile `engagement`'s filters; FilterError (one sentence) for a bad one."""
        headers = []
        for name, value in engagement.headers:
            if not name.strip():
                raise FilterError(f"engagement {engagement.id} has a header filter with no name.")
            headers.append((name.strip().lower().encode(), _glob(value)))
        regexes = []
        for pattern in engagement.path_regex:
            try:
                regexes.append(re.compile(pattern))
            except re.error as exc:
                raise FilterError(
                    f"the path regex {pattern!r} does not compile: {exc.msg} at {exc.pos}."
                ) from None
        return cls(
            headers=tuple(headers),
            path_equal=frozenset(engagement.path_equal),
            path_prefix=tuple(engagement.path_prefix),
            path_regex=tuple(regexes),
        )

    def matches(self, path: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """`path` is the request target (query string included or not); names in lower case."""
        for name, pattern in self.headers:
            if not any(n == name and pattern.fullmatch(v) for n, v in headers):
                return False
        if not (self.path_equal or self.path_prefix or self.path_regex):
            return True
        path = path.split("?", 1)[0]
        return (
            path in self.path_equal
            or any(path.startswith(p) for p in self.path_prefix)
            or any(r.search(path) for r in self.path_regex)
        )


class Router:
    """Chooses the engagement for each request; filters are compiled once per engagement."""

    def __init__(self) -> None:
        self._compiled: dict[str, tuple[Engagement, RequestFilter | None]] = {}

    def _filter(self, engagement: Engagement) -> RequestFilter | None:
        cached = self._compiled.get(engagement.id)
        if cached is not None and cached[0] == engagement:
            return cached[1]
        try:
            compiled: RequestFilter | None = RequestFilter.of(engagement)
        except FilterError as exc:
            # The manager should have refused it; matching nothing keeps the app's traffic safe.
            log.warning("engagement %s takes no requests: %s", engagement.id, exc)
            compiled = None
        self._compiled[engagement.id] = (engagement, compiled)
        return compiled

    def route(
        self,
        engagements: Iterable[Engagement],
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> Engagement | None:
        """The first http engagement that takes the request, or None (the app)."""
        for engagement in engagements:
            if engagement.mechanism != "http":
                continue
            compiled = self._filter(engagement)
            if compiled is not None and compiled.matches(path, headers):
                return engagement
        return None
