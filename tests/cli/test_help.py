"""`tele --help` as a user runs it."""

from __future__ import annotations

import subprocess

from tests.conftest import VENV_BIN


def test_help_lists_commands(tele_env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "tele"), "--help"],
        env=tele_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for command in ("status", "quit", "version", "loglevel", "gather-logs", "config"):
        assert f"  {command}" in result.stdout


def test_unknown_command_is_a_usage_error(tele_env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "tele"), "frobnicate"],
        env=tele_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "No such command 'frobnicate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_mistyped_command_gets_a_suggestion(tele_env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "tele"), "interecpt", "echo"],
        env=tele_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: No such command 'interecpt'. Did you mean intercept? `tele --help` lists them."
    )


def test_completion_scripts_complete_commands_and_flags(tele_env: dict[str, str]) -> None:
    tele = str(VENV_BIN / "tele")
    for shell, marker in (("bash", "_tele_completion()"), ("zsh", "#compdef tele"), ("fish", "")):
        script = subprocess.run(
            [tele, "completion", shell], env=tele_env, capture_output=True, text=True, check=False
        )
        assert script.returncode == 0, script.stderr
        assert "_TELE_COMPLETE" in script.stdout and marker in script.stdout
    # What the bash script asks tele for, and the answer it gets.
    for words, cword, answer in (
        ("tele inter", "1", "plain,intercept\n"),
        ("tele intercept --http-h", "2", "plain,--http-header\n"),
    ):
        asked = subprocess.run(
            [tele],
            env={
                **tele_env,
                "_TELE_COMPLETE": "bash_complete",
                "COMP_WORDS": words,
                "COMP_CWORD": cword,
            },
            capture_output=True,
            text=True,
            check=False,
        )
        assert asked.stdout == answer, asked.stderr
