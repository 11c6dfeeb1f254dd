"""Logging for tele's processes: one rotated file per process under the logs dir, and the
process-wide level that `tele loglevel` changes at run time (the revert timer lives with the
daemon, which owns the clock)."""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import os
from pathlib import Path

from tele import paths

TRACE = 5  # below DEBUG, for wire-level detail; the name Telepresence users know
logging.addLevelName(TRACE, "TRACE")

_LEVELS = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO}
_LEVELS |= {"warning": logging.WARNING, "error": logging.ERROR}
LEVELS = frozenset(_LEVELS)

MAX_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 5
FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def log_file(process: str) -> Path:
    """Where `process` ("daemon", "cli", …) writes its log."""
    return paths.logs_dir() / f"{process}.log"


def level_number(name: str) -> int:
    """A validated level name (see tele.config.parse_log_level) -> logging's number."""
    return _LEVELS[name]


def level_name(number: int) -> str:
    """logging's number -> tele's level name (the nearest one at or below it)."""
    for name, value in sorted(_LEVELS.items(), key=lambda item: -item[1]):
        if number >= value:
            return name
    return "trace"


class _OwnedFileHandler(logging.handlers.RotatingFileHandler):
    """A rotated log whose every file (the first, and each after a rollover) is given to
    `owner`: a root daemon writing for another user (tele.unixsock.delegated_uid)."""

    def __init__(self, path: Path, owner: int) -> None:
        self._owner = owner
        super().__init__(path, maxBytes=MAX_BYTES, backupCount=BACKUP_COUNT, encoding="utf-8")

    def _open(self) -> io.TextIOWrapper:
        stream = super()._open()
        with contextlib.suppress(OSError):  # logged nowhere: this is the log
            os.chown(self.baseFilename, self._owner, -1)
        return stream


def setup_file_logging(process: str, level: str, *, owner: int | None = None) -> Path:
    """Send every log record of this process to its rotated file; return the file's path.
    With `owner`, each file is given to that uid.

    The level is set on the root logger so that libraries' records (trio, h2) follow it too;
    handlers stay at NOTSET so that changing the root level is all `tele loglevel` needs to do.
    """
    path = log_file(process)
    paths.ensure_private_dir(path.parent)
    handler = (
        logging.handlers.RotatingFileHandler(
            path, maxBytes=MAX_BYTES, backupCount=BACKUP_COUNT, encoding="utf-8"
        )
        if owner is None
        else _OwnedFileHandler(path, owner)
    )
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    set_level(level)
    logging.captureWarnings(True)
    return path


def set_level(name: str) -> str:
    """Set the process-wide level; return the previous one's name."""
    root = logging.getLogger()
    previous = level_name(root.level)
    root.setLevel(level_number(name))
    # Libraries that log every frame, netlink message or HTTP exchange at DEBUG: quiet unless
    # TRACE is asked for (`loglevel debug` is about tele's own steps).
    for library in NOISY_LIBRARIES:
        # (and never below the level asked for: at `warning`, their INFO lines are noise too)
        quiet = max(logging.INFO, level_number(name))
        logging.getLogger(library).setLevel(logging.DEBUG if name == "trace" else quiet)
    return previous


NOISY_LIBRARIES = ("h2", "hpack", "pyroute2", "httpcore", "httpx", "urllib3", "kubernetes")


def current_level() -> str:
    return level_name(logging.getLogger().level)
