"""Undoing what a daemon that died (kill -9, a crash) left behind: routes, devices and resolver
settings in the network undo journal, FUSE mounts in the mount journal.

A starting daemon does it while holding the one-per-user lock (`at_start`); `tele quit` finds no
daemon and does the network part itself (`without_daemon`), so that a user can clean up without
starting a new daemon. Light on imports: the CLI loads this module.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


async def at_start() -> None:
    """Holding the lock, this is the only daemon: what is still in the journals belongs to one
    that died; undo it first (failures are logged, never fatal)."""
    import trio

    from tele.daemon import mounts
    from tele.vif import journal

    for undo in [j.recover for j in (journal, mounts) if j.pending()]:
        try:
            done = await trio.to_thread.run_sync(undo)
        except Exception:
            log.exception("could not undo what a previous daemon left")
            continue
        for line in done:
            log.info("cleaned up after a previous daemon: %s", line)


def without_daemon() -> list[str]:
    """No daemon runs: undo the network changes a killed one left; what was done, in words."""
    from tele.vif import journal

    return journal.recover() if journal.pending() else []
