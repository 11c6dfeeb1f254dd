"""The undo journal: what the VIF and DNS changed on the machine, kept until it is undone.

Each change (a device with its routes, an overridden resolv.conf) is recorded before it is made
and forgotten after it was undone. A daemon that died with `kill -9` leaves its entries behind;
the next daemon start (or `tele quit`) calls `recover()`, which removes the leftovers. The file
is small JSON in the state directory, rewritten atomically.
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


def use_file_name(name: str) -> None:
    """Keep this process's journal in another file of the state directory (the privileged
    helper keeps its own, apart from the daemon's, which it could not undo anyway)."""
    global _FILE_NAME
    _FILE_NAME = name


def journal_path() -> Path:
    return paths.state_dir() / _FILE_NAME


@dataclass(slots=True)
class Entry:
    """One device (with its routes) or one resolv.conf override, in a network namespace."""

    netns: str | None
    device: str = ""
    routes: list[str] = field(default_factory=list)
    resolv_conf: str = ""
    """The resolv.conf that was overridden; its original is kept at `resolv_backup`."""
    resolv_backup: str = ""

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
        entries[entry.key] = entry
    return entries


def _save(entries: dict[str, Entry]) -> None:
    path = journal_path()
    paths.ensure_private_dir(path.parent)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(e) for e in entries.values()], indent=1))
    os.replace(tmp, path)


def record(entry: Entry) -> None:
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
    """Undo every change a dead daemon left; returns what was done, in words (for the log)."""
    from tele.dns.system import restore_resolv_conf
    from tele.vif.errors import VifError
    from tele.vif.routing import delete_link, parse_networks, remove_routes

    done: list[str] = []
    for entry in pending():
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
