"""Which http engagement a request belongs to (sans-IO: names, values and paths in, a choice out).

The filters' rules are tele.rpc.filters' (the CLI and the manager check them with the same
code); here each engagement's filters are compiled once and the first engagement whose filters
take a request gets it. Requests that match no engagement go to the app.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from tele.agent.errors import FilterError
from tele.rpc.agent_api import Engagement
from tele.rpc.filters import RequestFilter

log = logging.getLogger(__name__)

RawHeaders = Iterable[tuple[bytes, bytes]]


def compile_filter(engagement: Engagement) -> RequestFilter:
    """`engagement`'s filters compiled; FilterError (one sentence) for one that cannot match."""
    try:
        return RequestFilter.compile(
            [(name.strip(), value) for name, value in engagement.headers],
            engagement.path_equal,
            engagement.path_prefix,
            engagement.path_regex,
        )
    except ValueError as exc:
        raise FilterError(f"engagement {engagement.id}: {exc}.") from None


class Router:
    """Chooses the engagement for each request; filters are compiled once per engagement."""

    def __init__(self) -> None:
        self._compiled: dict[str, tuple[Engagement, RequestFilter | None]] = {}

    def _filter(self, engagement: Engagement) -> RequestFilter | None:
        cached = self._compiled.get(engagement.id)
        if cached is not None and cached[0] == engagement:
            return cached[1]
        try:
            compiled: RequestFilter | None = compile_filter(engagement)
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
