"""The agent's error types: one sentence each, the runtime's library errors translated here."""

from __future__ import annotations

from tele.errors import ConnectionFailed, UserError


class AgentConfigError(UserError):
    """The agent's injected configuration (env variables) is missing or malformed."""


class FilterError(UserError):
    """An http engagement's header or path filter cannot be used (a bad regex, an empty name)."""


class UpstreamFailed(ConnectionFailed):
    """The app or the engaging client's handler could not be reached or broke off."""
