"""What the quick commands import: `tele --help` and `tele status` must stay fast, so heavy
modules load only in the commands that need them (see bench/cli_startup.py for the times)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("trio", "h2", "msgspec", "yaml", "kubernetes", "cryptography", "pyroute2", "rich")

PROBE = """
import json, sys
from tele.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = {heavy!r}
print(json.dumps(sorted(name for name in heavy if name in sys.modules)), file=sys.stderr)
"""


def loaded_after(env: dict[str, str], *argv: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    loaded = json.loads(result.stderr.splitlines()[-1])
    assert isinstance(loaded, list)
    return loaded


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["version", "--help"]])
def test_help_imports_nothing_heavy(tele_env: dict[str, str], argv: list[str]) -> None:
    assert loaded_after(tele_env, *argv) == []


def test_status_and_version_do_without_trio(tele_env: dict[str, str]) -> None:
    # The blocking fast path (tele.cli.quick) needs h2 and msgspec, and nothing else heavy.
    assert loaded_after(tele_env, "status") == ["h2", "msgspec"]
    assert loaded_after(tele_env, "version") == ["h2", "msgspec"]
