"""The undo journal undoes only what dead owners left: a second helper (or daemon) sharing the
file must not tear down a live session's device (issue 16: `Errno 77` in the first session)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tele.vif import journal


def _ip(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace with devices)")
    name = f"tele-{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    journal.use_file(tmp_path / "journal.json")
    try:
        yield name
    finally:
        journal.use_file(None)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def links(netns: str) -> set[str]:
    return {link["ifname"] for link in json.loads(_ip("-n", netns, "-j", "link"))}


def entry(netns: str, device: str, pid: int, start: int) -> dict[str, object]:
    _ip("-n", netns, "link", "add", device, "type", "veth", "peer", "name", f"{device}p")
    return {"netns": netns, "device": device, "routes": [], "owner_pid": pid, "owner_start": start}


def test_recover_leaves_a_live_owners_device_and_undoes_a_dead_ones(netns: str) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)  # fmt: skip
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        entries = [
            entry(netns, "tele-live", live.pid, journal.process_start(live.pid)),
            entry(netns, "tele-dead", dead.pid, 12345),
            # a live pid that is not the owner any more (reused): its start time differs
            entry(netns, "tele-reused", live.pid, journal.process_start(live.pid) - 1),
            entry(netns, "tele-old", 0, 0),  # written by a tele before owners were recorded
        ]
        journal.journal_path().write_text(json.dumps(entries))
        done = journal.recover()
        assert sorted(done) == [f"removed device tele-{n}" for n in ("dead", "old", "reused")]
        assert "tele-live" in links(netns)
        assert [e.device for e in journal.pending()] == ["tele-live"]
    finally:
        assert live.stdin is not None
        live.stdin.close()
        live.wait()
    assert journal.recover() == ["removed device tele-live"]  # its owner is gone now
    assert "tele-live" not in links(netns)
    assert journal.pending() == []


def test_entries_record_their_owner(netns: str) -> None:
    journal.record(journal.Entry(netns, device="tele-x"))
    (mine,) = journal.pending()
    assert (mine.owner_pid, mine.owner_start) == (os.getpid(), journal.process_start(os.getpid()))
    assert mine.owner_alive()
