"""CLI start-up cost: wall time of `tele --help`, `tele version` and `tele status` (with a daemon
running) against `python -c pass`, the interpreter's own start. Median of N runs each.

Targets (issue 3): `tele status` <= 0.3 s, `tele --help` <= 0.2 s.

    .venv/bin/python bench/cli_startup.py [--runs N]

Runs in a private temporary home (its own daemon, stopped at the end); prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"tele --help": 0.2, "tele status": 0.3}


def timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
        )
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    tele = str(bin_dir / "tele")
    home = Path(tempfile.mkdtemp(prefix="tele-bench-"))
    env = dict(os.environ)
    for name in ("config", "cache", "state", "runtime"):
        (home / name).mkdir(mode=0o700)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_CACHE_HOME=str(home / "cache"),
        XDG_STATE_HOME=str(home / "state"),
        XDG_RUNTIME_DIR=str(home / "runtime"),
    )
    pid_file = home / "runtime" / "tele" / "daemon.pid"
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "tele --help": [tele, "--help"],
        "tele version": [tele, "version"],
        "tele status": [tele, "status"],
    }
    results: dict[str, dict[str, float]] = {}
    try:
        subprocess.run([tele, "daemon", "start"], env=env, check=True, capture_output=True)
        for name, argv in cases.items():
            timed(argv, env, 2)  # warm the page cache and .pyc files
            samples = timed(argv, env, args.runs)
            results[name] = {
                "median_s": statistics.median(samples),
                "min_s": min(samples),
                "max_s": max(samples),
            }
    finally:
        subprocess.run([tele, "quit"], env=env, capture_output=True, check=False)
        try:  # if quit could not do it, stop the daemon this benchmark started, by its pid
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(home, ignore_errors=True)

    floor = results["python -c pass"]["median_s"]
    print(f"{'command':<16} {'median':>8} {'min':>8} {'max':>8} {'- python':>9} {'target':>8}")
    for name, row in results.items():
        target = TARGETS.get(name)
        verdict = (
            ""
            if target is None
            else f"{target:.2f} {'ok' if row['median_s'] <= target else 'MISS'}"
        )
        print(
            f"{name:<16} {row['median_s']:8.3f} {row['min_s']:8.3f} {row['max_s']:8.3f}"
            f" {row['median_s'] - floor:9.3f} {verdict:>8}"
        )
    print(
        json.dumps(
            {
                "bench": "cli_startup",
                "runs": args.runs,
                "results": results,
                "targets_s": TARGETS,
                "targets_met": {k: results[k]["median_s"] <= v for k, v in TARGETS.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
