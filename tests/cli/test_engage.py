"""intercept / replace / ingest flags that are refused before anything reaches the daemon: one
sentence on stderr and exit 1 (no daemon is started for them)."""

from __future__ import annotations

import pytest

from tests.daemon.util import DaemonGuard, run_tele, single_error_line


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (
            ["intercept", "echo", "--to-pod", "99999"],
            "tele: --to-pod '99999' must be PORT or PORT/UDP (a port from 1 to 65535).",
        ),
        (
            ["replace", "echo", "--to-pod", "53/SCTP"],
            "tele: --to-pod '53/SCTP' must be PORT or PORT/UDP (a port from 1 to 65535).",
        ),
        (
            ["replace", "echo", "-p", "80", "-p", "80:http"],
            "tele: Each --port needs its own local port.",
        ),
        (
            ["intercept", "echo", "-p", "x:http"],
            "tele: --port 'x:http': the local port must be a number from 1 to 65535.",
        ),
        (
            ["intercept", "echo", "--http-path-regex", "(["],
            "tele: --http-path-regex '([' does not compile: unterminated character set at "
            "position 1.",
        ),
        (
            ["intercept", "echo", "--http-header", "x-dev"],
            "tele: --http-header 'x-dev' must look like NAME=VALUE or 'NAME: VALUE'.",
        ),
        (
            ["intercept", "echo", "--http-header", "x dev=me"],
            "tele: --http-header 'x dev' is not a valid header name.",
        ),
        (
            ["uninstall"],
            "tele: Name workloads (tele uninstall NAME...), or use --all-agents; not both.",
        ),
        (
            ["uninstall", "echo", "--all-agents"],
            "tele: Name workloads (tele uninstall NAME...), or use --all-agents; not both.",
        ),
        (
            ["intercept", "echo", "--http-path-prefix", "api"],
            "tele: --http-path-prefix 'api' must start with /.",
        ),
    ],
)
def test_bad_engage_flags_are_one_sentence(
    tele_env: dict[str, str], guard: DaemonGuard, args: list[str], sentence: str
) -> None:
    result = run_tele(tele_env, *args)
    assert result.returncode == 1
    assert single_error_line(result) == sentence
    assert guard.daemons() == []


def test_intercept_replace_is_deprecated(tele_env: dict[str, str], guard: DaemonGuard) -> None:
    result = run_tele(tele_env, "intercept", "echo", "--replace", "--http-header", "a=b")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "tele: --replace is deprecated and will be removed; use `tele replace` instead.",
        "tele: --replace takes the whole container; it cannot filter HTTP requests.",
    ]
