"""Run-time log levels: a temporary level and its revert timer (on trio's mock clock), and the
rotated log file the daemon writes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tele import logs
from tele.loglevel import LogLevelController


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger's level and handlers that these tests change."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    library_levels = {name: logging.getLogger(name).level for name in logs.NOISY_LIBRARIES}
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        for name, library_level in library_levels.items():
            logging.getLogger(name).setLevel(library_level)
        logging.captureWarnings(False)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_temporary_level_reverts_after_its_duration(
    root_logging: None, mock_clock: trio.testing.MockClock
) -> None:
    logs.set_level("info")
    controller = LogLevelController("info")
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.serve)

        assert controller.set("debug", 30) == "info"
        assert logging.getLogger().level == logging.DEBUG
        assert controller.revert_in() == 30

        await trio.sleep(29.9)  # virtual time: the mock clock jumps, nothing waits
        assert controller.current == "debug"
        await trio.sleep(0.2)
        assert controller.current == "info"
        assert controller.revert_in() is None
        nursery.cancel_scope.cancel()


async def test_a_new_change_replaces_the_pending_revert(
    root_logging: None, mock_clock: trio.testing.MockClock
) -> None:
    logs.set_level("warning")
    controller = LogLevelController("warning")
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.serve)
        controller.set("debug", 10)
        await trio.sleep(5)

        assert controller.set("trace", 60) == "debug"

        await trio.sleep(10)  # the first change's deadline has passed: no revert yet
        assert controller.current == "trace"
        assert logging.getLogger("h2").level == logging.DEBUG  # trace lets h2's frames through
        await trio.sleep(51)
        assert controller.current == "warning"
        assert logging.getLogger("h2").level == logging.WARNING  # never below the level

        controller.set("error", 0)  # 0 = until changed
        await trio.sleep(10**6)
        assert controller.current == "error"
        nursery.cancel_scope.cancel()


def test_file_logging_writes_and_rotates(
    root_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(logs, "MAX_BYTES", 2000)
    path = logs.setup_file_logging("daemon", "info")
    assert path == tmp_path / "tele" / "logs" / "daemon.log"
    log = logging.getLogger("tele.test")

    log.debug("hidden at info")
    for i in range(300):
        log.info("record %03d %s", i, "x" * 40)

    assert logs.current_level() == "info"
    rotated = sorted(p.name for p in path.parent.iterdir())
    assert rotated == ["daemon.log", *(f"daemon.log.{i}" for i in range(1, logs.BACKUP_COUNT + 1))]
    assert "record 299" in path.read_text()
    assert all("hidden" not in p.read_text() for p in path.parent.iterdir())
    assert all(p.stat().st_size <= 2000 for p in path.parent.iterdir())


def test_debug_keeps_the_libraries_that_log_every_message_quiet(root_logging: None) -> None:
    """`tele loglevel debug` shows tele's steps, not every netlink message or h2 frame; trace
    shows those too."""
    logs.set_level("debug")
    assert logging.getLogger("tele.daemon").isEnabledFor(logging.DEBUG)
    for library in ("pyroute2", "h2", "hpack", "httpx"):
        assert not logging.getLogger(library).isEnabledFor(logging.DEBUG)
        assert logging.getLogger(library + ".sub").isEnabledFor(logging.INFO)
    logs.set_level("trace")
    assert logging.getLogger("pyroute2.netlink").isEnabledFor(logging.DEBUG)
    logs.set_level("info")
