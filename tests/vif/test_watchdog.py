"""A daemon that changes the resolver itself and is killed (-9) does not leave the machine
pointing at a dead address until the next `tele quit`: its watchdog puts the file back as
soon as the daemon is gone. A daemon that ends normally leaves the watchdog nothing to do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ORIGINAL = "# the machine's own\nnameserver 192.0.2.53\n"

FAKE_DAEMON = """
import sys, time
from pathlib import Path
from tele.dns import system
from tele.vif import journal, watchdog
resolv, backup, journal_file = (Path(a) for a in sys.argv[1:4])
end = sys.argv[4]
journal.use_file(journal_file)
journal.record(journal.Entry(None, resolv_conf=str(resolv), resolv_backup=str(backup)))
system.override_resolv_conf(resolv, backup, "198.18.0.53", ["svc.cluster.local"])
process, pipe = watchdog.start(journal_file)
print(process.pid, flush=True)
if end == "normally":
    system.restore_resolv_conf(resolv, backup)
    journal.forget(None, resolv_conf=str(resolv))
    import os
    os.close(pipe)
    process.wait()
    print("done", flush=True)
else:
    time.sleep(600)
"""


def wait_until(predicate: object, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def run_daemon(tmp_path: Path, end: str) -> tuple[subprocess.Popen[str], int, Path]:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(ORIGINAL)
    daemon = subprocess.Popen(
        [sys.executable, "-c", FAKE_DAEMON, str(resolv), str(tmp_path / "resolv.orig"),
         str(tmp_path / "journal.json"), end],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert daemon.stdout is not None
    watchdog_pid = int(daemon.stdout.readline())
    return daemon, watchdog_pid, resolv


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_the_resolver_is_restored_when_the_daemon_is_killed(tmp_path: Path) -> None:
    daemon, watchdog_pid, resolv = run_daemon(tmp_path, "killed")
    try:
        assert "198.18.0.53" in resolv.read_text()
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        assert wait_until(lambda: resolv.read_text() == ORIGINAL), resolv.read_text()
        assert wait_until(lambda: gone(watchdog_pid))
        assert (tmp_path / "journal.json").read_text().strip() == "[]"
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.communicate()
        if not gone(watchdog_pid):
            os.kill(watchdog_pid, signal.SIGKILL)


def test_a_daemon_that_ends_normally_leaves_the_watchdog_nothing(tmp_path: Path) -> None:
    daemon, watchdog_pid, resolv = run_daemon(tmp_path, "normally")
    out, _ = daemon.communicate(timeout=20)
    assert out.strip() == "done"
    assert resolv.read_text() == ORIGINAL
    assert gone(watchdog_pid)
