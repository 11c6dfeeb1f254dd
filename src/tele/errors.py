"""tele's own error types shared by every layer, with the CLI exit code each one maps to.

Library exceptions are translated into these at the I/O edge; the CLI prints `str(error)` as one
sentence and exits with `error.exit_code`.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class TeleError(Exception):
    """A failure with a message meant for a person: one sentence, what to do next if known."""

    exit_code = 1


class UserError(TeleError):
    """The user asked for something invalid (bad flag value, malformed config, unknown name)."""

    exit_code = 1


class ConnectionFailed(TeleError):
    """The daemon, the cluster or the traffic manager could not be reached or broke off."""

    exit_code = 3


def single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested exception groups, or the group when there are several.

    trio wraps whatever escapes a nursery in a group; a caller that expects tele's own error
    (to show its sentence) unwraps it with this.
    """
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group


def first_leaf(group: BaseExceptionGroup[E]) -> E:
    """The first exception inside nested groups: what `except* SomeError as group` caught,
    when one sentence is all a caller can show."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc  # type: ignore[return-value]  # a split group's leaves are all E
