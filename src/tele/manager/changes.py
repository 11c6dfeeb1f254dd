"""A change notice shared by the parts of the manager's engagements: agents arriving or going,
engagements made or ended. Watchers take `event` before they look, then wait on it."""

from __future__ import annotations

import trio


class Changes:
    """One trio.Event per change: `notify()` sets the current one and starts the next."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def notify(self) -> None:
        self.event.set()
        self.event = trio.Event()
