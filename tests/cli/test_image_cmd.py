"""`tele image build -o`: there -o names the archive, so a format name given to it is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tele.cli.main import cli


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_a_format_name_given_to_build_o_is_refused_and_writes_nothing(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["image", "build", "-o", fmt])
    assert result.exit_code == 2
    wanted = f"-o names the archive file here (-o FILE.tar); for {fmt} output use --output {fmt}."
    assert wanted in result.output
    assert list(tmp_path.iterdir()) == []
