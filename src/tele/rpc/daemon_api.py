"""The CLI <-> user daemon API: where the daemon listens and the messages of each call.

Transport-free definitions only (tele.rpc carries them). The CLI imports this module and never
the daemon's internals. Messages are versioned by the service name; add fields with defaults so
that an older CLI and a newer daemon (or the reverse) still understand each other.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from tele import paths
from tele.rpc.method import Empty, Unary

SERVICE = "tele.daemon.v1"

__all__ = ["Empty"]  # requests that carry nothing; re-exported for the CLI


# -- where the daemon lives ------------------------------------------------------------------


def socket_path() -> Path:
    """The unix socket the daemon listens on (mode 0600, in a 0700 dir)."""
    return paths.runtime_dir() / "daemon.sock"


def lock_path() -> Path:
    """flock()ed exclusively by the running daemon for its whole life: one daemon per user."""
    return paths.runtime_dir() / "daemon.lock"


def pid_path() -> Path:
    """The running daemon's pid, for people and for tests that must kill it."""
    return paths.runtime_dir() / "daemon.pid"


# -- messages ----------------------------------------------------------------------------------


class VersionReply(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    python: str
    pid: int


class StatusReply(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    pid: int
    started_at: float  # unix time
    uptime: float  # seconds
    log_file: str
    socket: str
    log_level: str
    # Filled by the session subtree in later issues; "not connected" until then.
    connection: str = "not connected"


class QuitReply(msgspec.Struct, frozen=True, kw_only=True):
    pid: int


class SetLogLevelRequest(msgspec.Struct, frozen=True, kw_only=True):
    level: str  # trace | debug | info | warning | error
    duration: float = 0.0  # seconds until the configured level returns; 0 = keep it


class SetLogLevelReply(msgspec.Struct, frozen=True, kw_only=True):
    level: str
    previous: str
    revert_to: str | None = None  # the level that returns after `duration`, if any
    revert_in: float | None = None


# -- calls -------------------------------------------------------------------------------------

VERSION: Unary[Empty, VersionReply] = Unary(f"/{SERVICE}/Version", Empty, VersionReply)
STATUS: Unary[Empty, StatusReply] = Unary(f"/{SERVICE}/Status", Empty, StatusReply)
# Replies once the daemon has stopped listening and removed its socket and pid file; the
# process exits right after.
QUIT: Unary[Empty, QuitReply] = Unary(f"/{SERVICE}/Quit", Empty, QuitReply)
# INVALID_ARGUMENT for an unknown level or a negative duration.
SET_LOG_LEVEL: Unary[SetLogLevelRequest, SetLogLevelReply] = Unary(
    f"/{SERVICE}/SetLogLevel", SetLogLevelRequest, SetLogLevelReply
)
