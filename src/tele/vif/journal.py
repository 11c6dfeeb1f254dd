"""The undo journal: what the VIF and DNS changed on the machine, kept until it is undone.

Each change (a device with its routes, an overridden resolv.conf) is recorded before it is made
and forgotten after it was undone. A daemon that died with `kill -9` leaves its entries behind;
the next daemon start (or `tele quit`) calls `recover()`, which removes the leftovers. The file
is small JSON in the state directory, rewritten atomically.

Every entry names its owner (pid and the process's start time, so a reused pid is not mistaken
for it): `recover()` undoes only the entries of owners that are gone. A second helper or daemon
sharing the file must never tear down a live session's device.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tele import paths

log = logging.getLogger(__name__)


_FILE_NAME = "vif-journal.json"
_PATH: Path | None = None


def use_file(path: Path | None) -> None:
    """Keep this process's journal in `path` (the privileged helper keeps one per user in
    root's own state directory, apart from the daemon's, which it could not undo anyway).
    None: the default again."""
    global _PATH
    _PATH = path


def journal_path() -> Path:
    return _PATH if _PATH is not None else paths.state_dir() / _FILE_NAME


def process_start(pid: int) -> int:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22); 0 when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


_SELF_START = 0


def _self() -> tuple[int, int]:
    global _SELF_START
    if not _SELF_START:
        _SELF_START = process_start(os.getpid())
    return os.getpid(), _SELF_START


@dataclass(slots=True)
class Entry:
    """One device (with its routes) or one resolv.conf override, in a network namespace."""

    netns: str | None
    device: str = ""
    routes: list[str] = field(default_factory=list)
    resolv_conf: str = ""
    """The resolv.conf that was overridden; its original is kept at `resolv_backup`."""
    resolv_backup: str = ""
    owner_pid: int = 0
    """The process that made the change (0: an entry of an older tele, treated as orphaned)."""
    owner_start: int = 0
    """That process's start time (process_start), so that a reused pid is not taken for it."""

    def owner_alive(self) -> bool:
        return bool(self.owner_pid) and process_start(self.owner_pid) == self.owner_start

    @property
    def key(self) -> str:
        kind = "dev" if self.device else "resolv"
        return f"{kind}:{self.netns or ''}:{self.device or self.resolv_conf}"


def _load() -> dict[str, Entry]:
    try:
        raw = json.loads(journal_path().read_text())
    except (OSError, ValueError):
        return {}
    entries: dict[str, Entry] = {}
    for item in raw if isinstance(raw, list) else []:
        try:
            entry = Entry(**item)
        except TypeError:
            continue
        if not isinstance(entry.owner_pid, int) or not isinstance(entry.owner_start, int):
            entry.owner_pid = entry.owner_start = 0
        entries[entry.key] = entry
    return entries


def _save(entries: dict[str, Entry]) -> None:
    path = journal_path()
    paths.ensure_private_dir(path.parent)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(e) for e in entries.values()], indent=1))
    os.replace(tmp, path)


def record(entry: Entry) -> None:
    """Remember `entry` as this process's (its owner is set here)."""
    entry.owner_pid, entry.owner_start = _self()
    entries = _load()
    entries[entry.key] = entry
    _save(entries)


def forget(netns: str | None, device: str = "", resolv_conf: str = "") -> None:
    entries = _load()
    key = Entry(netns, device=device, resolv_conf=resolv_conf).key
    if entries.pop(key, None) is not None:
        _save(entries)


def pending() -> list[Entry]:
    return list(_load().values())


def recover() -> list[str]:
    """Undo the changes of owners that are gone (a daemon or helper killed with -9); returns
    what was done, in words (for the log). A live owner's entries stay: that session is still
    using its device."""
    from tele.dns.system import restore_resolv_conf
    from tele.vif.errors import VifError
    from tele.vif.routing import delete_link, parse_networks, remove_routes

    done: list[str] = []
    me = _self()
    for entry in pending():
        if (entry.owner_pid, entry.owner_start) != me and entry.owner_alive():
            log.debug("undo journal: %s belongs to live pid %d", entry.key, entry.owner_pid)
            continue
        try:
            if entry.device:
                remove_routes(entry.netns, entry.device, parse_networks(entry.routes))
                if delete_link(entry.netns, entry.device):
                    done.append(f"removed device {entry.device}")
            if entry.resolv_conf:
                restore_resolv_conf(Path(entry.resolv_conf), Path(entry.resolv_backup))
                done.append(f"restored {entry.resolv_conf}")
        except (VifError, OSError) as exc:
            log.warning("could not undo %s: %s", entry.key, exc)
            if isinstance(exc, VifError) and "does not exist" in str(exc):
                pass  # the namespace is gone, and everything in it
            else:
                continue
        forget(entry.netns, entry.device, entry.resolv_conf)
    for line in done:
        log.info("undo journal: %s", line)
    return done
