"""Undo what the daemon changed on the machine when it dies without undoing it (kill -9, a
crash): a small process the daemon starts (`python -m tele.vif.watchdog`) holding the read end
of a pipe as its standard input. End of file there means the daemon closed it or is gone; the
watchdog then runs the undo journal's recovery, which undoes only the entries of owners that
are gone (the resolver pointed at a dead address, a device and its routes) and exits.

The privileged helper does the same for a daemon without CAP_NET_ADMIN (it undoes everything
when its connection ends); this is for a daemon that makes the changes itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from tele.vif import journal

log = logging.getLogger(__name__)


def start(journal_file: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start a watchdog for this process; returns it and the pipe's write end (keep it open
    for as long as the changes live; closing it, or dying, lets the watchdog act)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "tele.vif.watchdog", "--journal", str(journal_file)],
            stdin=read_fd,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the daemon must not stop it first
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return process, write_fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tele.vif.watchdog", description=__doc__)
    parser.add_argument("--journal", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="tele watchdog: %(message)s")
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    journal.use_file(args.journal)
    try:
        for line in journal.recover():
            log.info("the daemon is gone: %s", line)
    except Exception:
        log.exception("undoing the daemon's changes failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
