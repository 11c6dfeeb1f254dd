"""The commands as a user runs them (subprocesses): output, exit codes, one-line errors."""

from __future__ import annotations

import getpass
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.daemon.util import DaemonGuard, run_tele, single_error_line


def write_config(env: dict[str, str], text: str) -> Path:
    path = Path(env["XDG_CONFIG_HOME"]) / "tele" / "config.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_view_merges_the_file_with_defaults(tele_env: dict[str, str]) -> None:
    write_config(tele_env, "timeouts:\n  cluster-connect: 45s\nlogLevels:\n  userDaemon: debug\n")

    as_json = run_tele(tele_env, "config", "view", "-o", "json")
    as_text = run_tele(tele_env, "config", "view")

    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["timeouts"]["clusterConnect"] == "45s"
    assert data["timeouts"]["trafficManagerConnect"] == "1m"
    assert data["logLevels"]["userDaemon"] == "debug"
    assert data["intercept"]["defaultPort"] == 8080
    assert as_text.returncode == 0
    assert yaml.safe_load(as_text.stdout) == data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("timeouts: [\n", "is not valid YAML at line 2"),
        ("timeouts:\n  colour: 3\n", "key `timeouts.colour` is not a known key"),
        ("intercept:\n  defaultPort: eighty\n", "key `intercept.defaultPort` is wrong"),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_1(
    tele_env: dict[str, str], text: str, expected: str
) -> None:
    path = write_config(tele_env, text)

    result = run_tele(tele_env, "config", "view")

    assert result.returncode == 1, result.stderr
    line = single_error_line(result)
    assert line.startswith("tele: ") and str(path) in line and expected in line, line


def test_commands_that_start_the_daemon_refuse_a_bad_config(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    path = write_config(tele_env, "timeouts:\n  colour: 3\n")
    expected = f"tele: In the config file {path}, key `timeouts.colour` is not a known key"

    for command in (["daemon", "start"], ["loglevel", "debug"], ["daemon", "run"]):
        result = run_tele(tele_env, *command)
        assert result.returncode == 1, (command, result.stderr)
        assert single_error_line(result).startswith(expected)
    assert guard.daemons() == []


def test_a_bad_log_level_is_one_line_and_starts_nothing(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    result = run_tele(tele_env, "loglevel", "loud")

    assert result.returncode == 1
    assert single_error_line(result) == (
        "tele: Unknown log level 'loud': use trace, debug, info, warning or error."
    )
    bad_duration = run_tele(tele_env, "loglevel", "debug", "-d", "forever")
    assert bad_duration.returncode == 1
    assert single_error_line(bad_duration) == (
        "tele: Invalid --duration 'forever': use a duration like 20s, 1m30s or 500ms."
    )
    assert guard.daemons() == []


def test_usage_errors_exit_2(tele_env: dict[str, str]) -> None:
    result = run_tele(tele_env, "status", "-o", "xml")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    missing = run_tele(tele_env, "loglevel")
    assert missing.returncode == 2


def test_commands_without_a_daemon_report_it_and_start_none(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    status = run_tele(tele_env, "status")
    version = run_tele(tele_env, "version", "-o", "yaml")
    quit_ = run_tele(tele_env, "quit")

    assert status.returncode == 0
    assert status.stdout == "Daemon: not running\nConnection: not connected\n"
    assert version.returncode == 0
    versions = yaml.safe_load(version.stdout)
    assert versions["daemon"] is None
    assert versions["traffic_manager"] is None
    assert versions["client"]["version"] == "0.1.0"
    assert quit_.returncode == 0
    assert quit_.stdout == "The daemon is not running.\n"
    assert guard.daemons() == []


def test_gather_logs_zips_the_log_files(tele_env: dict[str, str], tmp_path: Path) -> None:
    empty = run_tele(tele_env, "gather-logs", "-o", str(tmp_path / "none.zip"))
    assert empty.returncode == 1
    assert "There are no log files" in single_error_line(empty)

    logs_dir = Path(tele_env["XDG_CACHE_HOME"]) / "tele" / "logs"
    logs_dir.mkdir(parents=True)
    (logs_dir / "daemon.log").write_text("today\n")
    (logs_dir / "daemon.log.1").write_text("yesterday\n")
    target = tmp_path / "out" / "bug"
    target.parent.mkdir()

    result = run_tele(tele_env, "gather-logs", "--output-file", str(target))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target) + ".zip"
    not_connected = (
        "Not connected: only this machine's logs (connect first for the traffic manager's and "
        "the agents')."
    )
    assert result.stderr == f"tele: {not_connected}\n"
    with zipfile.ZipFile(str(target) + ".zip") as archive:
        assert sorted(archive.namelist()) == [
            "tele_logs/daemon.log",
            "tele_logs/daemon.log.1",
            "tele_logs/problems.txt",
        ]
        assert archive.read("tele_logs/daemon.log.1") == b"yesterday\n"
        assert archive.read("tele_logs/problems.txt").decode() == not_connected + "\n"


def test_gather_logs_json_anonymized_and_the_cluster_needs_a_connection(
    tele_env: dict[str, str], tmp_path: Path
) -> None:
    logs_dir = Path(tele_env["XDG_CACHE_HOME"]) / "tele" / "logs"
    logs_dir.mkdir(parents=True)
    user = getpass.getuser()
    (logs_dir / "daemon.log").write_text(
        f"dial 10.244.1.7:8080 from 10.244.1.7 and fd00:10:244::7, {user} on 127.0.0.1\n"
    )
    target = tmp_path / "anon.zip"

    result = run_tele(
        tele_env, "gather-logs", "-o", "json", "--anonymize", "--output-file", str(target)
    )

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == {
        "file": str(target),
        "files": ["tele_logs/daemon.log", "tele_logs/problems.txt"],
        "connected": False,
        "anonymized": True,
        "problems": [data["problems"][0]],
    }
    with zipfile.ZipFile(target) as archive:
        assert archive.read("tele_logs/daemon.log").decode() == (
            "dial 192.0.2.1:8080 from 192.0.2.1 and 2001:db8::1, user-1 on 127.0.0.1\n"
        )
    # -o FILE (tele's earlier habit) still names the zip; asking for the cluster's logs while
    # not connected is refused, writing nothing.
    assert run_tele(tele_env, "gather-logs", "-o", str(tmp_path / "old")).returncode == 0
    assert (tmp_path / "old.zip").is_file()
    refused = run_tele(tele_env, "gather-logs", "--traffic-manager", "-o", str(tmp_path / "x"))
    assert refused.returncode == 1
    assert single_error_line(refused) == (
        "tele: Not connected; run `tele connect` first (the cluster's logs come through the "
        "traffic manager)."
    )
    assert not (tmp_path / "x.zip").exists()


def test_a_daemon_that_cannot_start_says_why_in_one_line(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    # A directory where the socket should be: connecting is refused (so the CLI starts a
    # daemon), and the daemon cannot bind; its reason travels back on the readiness pipe.
    blocker = Path(tele_env["XDG_RUNTIME_DIR"]) / "tele" / "daemon.sock"
    blocker.mkdir(parents=True)

    result = run_tele(tele_env, "daemon", "start")

    assert result.returncode == 3
    assert single_error_line(result) == f"tele: Cannot listen on {blocker}: Is a directory."
    assert guard.daemons() == []


def test_unusable_directories_are_one_line_errors(tele_env: dict[str, str]) -> None:
    logs_dir = Path(tele_env["XDG_CACHE_HOME"]) / "tele" / "logs"
    logs_dir.parent.mkdir(parents=True)
    logs_dir.write_text("a file where the log directory should be")

    result = run_tele(tele_env, "loglevel", "debug")

    assert result.returncode == 3
    assert single_error_line(result) == (
        f"tele: Cannot start the daemon: cannot create {logs_dir}: File exists."
    )


def test_quit_finishes_what_a_killed_daemon_left(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    # A daemon killed with its resolver override in place left this journal entry.
    state = Path(tele_env["XDG_STATE_HOME"]) / "tele"
    state.mkdir(parents=True, exist_ok=True)
    resolv = Path(tele_env["HOME"]) / "resolv.conf"
    backup = Path(tele_env["HOME"]) / "resolv.conf.tele-orig"
    resolv.write_text("nameserver 198.18.0.53\n")
    backup.write_text("nameserver 192.0.2.1\n")
    entry = {"netns": None, "resolv_conf": str(resolv), "resolv_backup": str(backup)}
    (state / "vif-journal.json").write_text(json.dumps([entry]))
    result = run_tele(tele_env, "quit")
    assert result.returncode == 0, result.stderr
    assert f"Cleaned up after a stopped daemon: restored {resolv}." in result.stdout
    assert resolv.read_text() == "nameserver 192.0.2.1\n"
    assert json.loads((state / "vif-journal.json").read_text()) == []


def test_output_is_accepted_before_and_after_the_command_and_errors_come_as_json(
    tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    before = run_tele(tele_env, "-o", "json", "quit")
    after = run_tele(tele_env, "quit", "--output", "yaml")
    assert before.returncode == 0 and after.returncode == 0
    assert json.loads(before.stdout) == {"stopped_pid": None, "left": [], "cleaned_up": []}
    assert yaml.safe_load(after.stdout) == {"stopped_pid": None, "left": [], "cleaned_up": []}
    failed = run_tele(tele_env, "--output", "json", "uninstall", "echo")
    assert failed.returncode == 1
    assert json.loads(failed.stdout) == {
        "error": "Not connected; run `tele connect` first.",
        "exit_code": 1,
    }
    assert single_error_line(failed) == "tele: Not connected; run `tele connect` first."
    assert guard.daemons() == []


def test_list_contexts_reads_the_kubeconfig_list(
    tele_env: dict[str, str], guard: DaemonGuard, tmp_path: Path
) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(
        yaml.safe_dump(
            {
                "current-context": "dev",
                "contexts": [{"name": "dev", "context": {"cluster": "k1", "namespace": "team"}}],
            }
        )
    )
    second.write_text(
        yaml.safe_dump({"contexts": [{"name": "prod", "context": {"cluster": "k2"}}]})
    )
    listed = run_tele(
        {**tele_env, "KUBECONFIG": f"{first}:{tmp_path / 'absent.yaml'}:{second}"},
        "list-contexts",
        "-o",
        "json",
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [
        {"name": "dev", "cluster": "k1", "namespace": "team", "current": True},
        {"name": "prod", "cluster": "k2", "namespace": "", "current": False},
    ]
    text = run_tele(tele_env, "list-contexts", "--kubeconfig", str(first))
    assert text.stdout.split() == ["*", "dev", "k1", "team"]
    assert guard.daemons() == []
