"""A process's log level at run time (the daemon's, the traffic manager's): `tele loglevel LEVEL
--duration D` sets it and, after D, the configured level comes back. One task owns the revert
timer; a new change moves its deadline; `on_revert` hears of the return (the manager tells its
agents)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from tele import logs

log = logging.getLogger(__name__)


class LogLevelController:
    """Owns the process-wide level: the configured one, and a temporary one with a deadline."""

    def __init__(self, configured: str, on_revert: Callable[[], None] | None = None) -> None:
        self.configured = configured
        self._on_revert = on_revert
        self._revert_at = math.inf  # trio time at which `configured` returns; inf = never
        self._timer: trio.CancelScope | None = None

    @property
    def current(self) -> str:
        return logs.current_level()

    def revert_in(self) -> float | None:
        """Seconds until the configured level returns, or None when nothing is pending."""
        if math.isinf(self._revert_at):
            return None
        return max(0.0, self._revert_at - trio.current_time())

    def set(self, level: str, duration: float) -> str:
        """Switch to `level` now; return the previous level. After `duration` seconds (> 0) the
        configured level returns; 0 keeps `level` until the next change."""
        previous = logs.set_level(level)
        self._revert_at = trio.current_time() + duration if duration > 0 else math.inf
        if self._timer is not None:
            self._timer.deadline = self._revert_at
        log.info(
            "log level %s -> %s%s",
            previous,
            level,
            f" for {duration:g}s" if duration > 0 else "",
        )
        return previous

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the revert timer until cancelled."""
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self._revert_at) as self._timer:
                await trio.sleep_forever()
            # Only our own deadline ends that scope: the temporary level has run its time.
            self._revert_at = math.inf
            previous = logs.set_level(self.configured)
            log.info("log level %s -> %s (its duration ended)", previous, self.configured)
            if self._on_revert is not None:
                self._on_revert()
