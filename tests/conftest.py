"""Shared fixtures: an isolated home for every test that runs tele as a user would."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def tele_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a `tele` subprocess with private config, cache, state and runtime dirs."""
    env = dict(os.environ)
    for name in ("config", "cache", "state", "runtime"):
        (tmp_path / name).mkdir(mode=0o700)
    env.update(
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_RUNTIME_DIR=str(tmp_path / "runtime"),
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
    )
    yield env
