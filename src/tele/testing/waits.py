"""Waiting in tests for a condition, with a deadline instead of a fixed sleep."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def wait_for(predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:
    """Return as soon as `predicate()` is true; raise TooSlowError after `timeout` seconds.

    For state that has no event to wait on (another task's counters, a process table).
    """
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - there is no event for arbitrary predicates
            await trio.sleep(0.001)
