"""tele's own error types shared by every layer, with the CLI exit code each one maps to.

Library exceptions are translated into these at the I/O edge; the CLI prints `str(error)` as one
sentence and exits with `error.exit_code`.
"""

from __future__ import annotations


class TeleError(Exception):
    """A failure with a message meant for a person: one sentence, what to do next if known."""

    exit_code = 1


class UserError(TeleError):
    """The user asked for something invalid (bad flag value, malformed config, unknown name)."""

    exit_code = 1


class ConnectionFailed(TeleError):
    """The daemon, the cluster or the traffic manager could not be reached or broke off."""

    exit_code = 3
