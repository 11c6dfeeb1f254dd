"""A pool of h2 links to one peer: keeps `count` links up, replaces a broken one with
exponential back-off (with jitter), and spreads new tunnel streams over the live links.

Streams on a link that breaks fail with `TunnelError` (the link's failure says why); streams
opened afterwards go to the links that are up. How many links pay off is a bench question
(bench/tunnel.py: one link per Python process saturates about one core), so `count` is a
parameter, 1 by default.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import NoReturn

import trio

from tele.errors import ConnectionFailed
from tele.net.tunnel import Destination, ResetReason
from tele.rpc.h2link import H2Link, H2Stream, LinkBroken, LinkSettings, open_link
from tele.rpc.tunnel import TunnelError, dial, open_now

log = logging.getLogger(__name__)

Connector = Callable[[], AbstractAsyncContextManager[trio.abc.Stream]]
"""Opens one transport for a link (a port-forward, or TCP inside the cluster)."""


class LinkPool:
    """Supervises `count` links made by `connect`. Run `serve()` in a nursery."""

    def __init__(
        self,
        connect: Connector,
        *,
        count: int = 1,
        settings: LinkSettings | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        name: str = "manager-link",
        prepare: Callable[[H2Link], Awaitable[None]] | None = None,
    ) -> None:
        """`prepare(link)` runs on each new link before it is handed out (e.g. to
        authenticate it); its failure fails the link."""
        if count < 1:
            raise ValueError("a link pool needs at least one link")
        self._connect = connect
        self._prepare = prepare
        self._settings = settings
        self._slots: list[H2Link | None] = [None] * count
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._name = name
        self._changed = trio.lowlevel.ParkingLot()
        self.replacements = 0  # links that came up in place of a link that had been up and broke
        self.last_failure: str | None = None

    @property
    def links(self) -> list[H2Link]:
        """The links that are up now."""
        return [link for link in self._slots if link is not None and link.is_open]

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Keep the links up until cancelled; `started` once the first link is up."""
        async with trio.open_nursery() as nursery:
            for slot in range(len(self._slots)):
                nursery.start_soon(self._keep, slot)
            await self.wait_ready()
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    async def wait_ready(self) -> H2Link:
        """Wait until at least one link is up; return the least loaded."""
        while True:
            link = self.pick()
            if link is not None:
                return link
            await self._changed.park()

    async def wait_replaced(self, since: int | None = None) -> None:
        """Return once a link has come up in place of one that broke (since `replacements` was
        `since`: one that came up before the caller started waiting counts too)."""
        seen = self.replacements if since is None else since
        while self.replacements == seen:
            await self._changed.park()

    async def wait_up(self, count: int) -> None:
        """Wait until `count` links are up (at most the pool's size)."""
        while len(self.links) < min(count, len(self._slots)):
            await self._changed.park()

    def pick(self) -> H2Link | None:
        """The live link with the fewest active streams (None if none is up)."""
        live = self.links
        return min(live, key=lambda link: link.active_streams) if live else None

    async def dial(
        self,
        destination: Destination,
        *,
        session: str,
        dial_id: str | None = None,
        wait: float = 10.0,
    ) -> H2Stream:
        """Open a tunnel stream on the least loaded live link, waiting up to `wait` seconds for
        one to come up. Raises `TunnelError` if none does or the peer refuses."""
        with trio.move_on_after(wait):
            link = await self.wait_ready()
            return await dial(link, destination, session=session, dial_id=dial_id)
        reason = f" (last failure: {self.last_failure})" if self.last_failure else ""
        raise TunnelError(
            ResetReason.UNREACHABLE,
            f"no link to the traffic manager came up within {wait:g}s{reason}",
        )

    def open_now(
        self, destination: Destination, *, session: str, dial_id: str | None = None
    ) -> H2Stream | None:
        """`dial(..., optimistic=True)` without any schedule point (`tele.rpc.tunnel.open_now`
        on the least loaded live link): None when it would have to wait (no link is up, or
        the link is at the peer's stream limit) or the link is unusable; `dial` then."""
        link = self.pick()
        if link is None:
            return None
        return open_now(link, destination, session=session, dial_id=dial_id)

    async def _keep(self, slot: int) -> None:
        delay = self._backoff_initial
        was_up = False
        while True:
            up = False

            def on_up(link: H2Link, replacing: bool = was_up) -> None:
                nonlocal up
                up = True
                if replacing:
                    self.replacements += 1
                self._slots[slot] = link
                self._changed.unpark_all()

            failure = await self._run_link(slot, on_up)
            self._slots[slot] = None
            self._changed.unpark_all()
            self.last_failure = failure
            if up:
                was_up = True
                delay = self._backoff_initial  # it worked: start the back-off over
            # Jitter keeps many clients that lost the manager together from returning in step.
            pause = delay * random.uniform(0.5, 1.0)
            log.warning("%s %d: %s; reconnecting in %.1fs", self._name, slot, failure, pause)
            await trio.sleep(pause)
            delay = min(delay * 2, self._backoff_max)

    async def _run_link(self, slot: int, on_up: Callable[[H2Link], None]) -> str:
        """Run one link on `slot` until it fails; return why, in words."""
        failure = "the link closed"
        try:
            async with (
                self._connect() as transport,
                open_link(
                    transport,
                    client_side=True,
                    settings=self._settings,
                    name=f"{self._name}-{slot}",
                ) as link,
            ):
                if self._prepare is not None:
                    await self._prepare(link)
                on_up(link)
                log.info("%s %d: up", self._name, slot)
                await link.wait_closed()
                failure = link.failure or failure
        except* (ConnectionFailed, OSError, trio.BrokenResourceError, LinkBroken) as group:
            failure = "; ".join(str(exc) or type(exc).__name__ for exc in group.exceptions)
        return failure
