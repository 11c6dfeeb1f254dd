"""`tele connect` wall time and traffic manager memory, with 1 namespace and with 100 namespaces
holding 1,000 Services (issue 7: connect <= 1.5 s, growing < 2x; manager <= 100 MiB).

The sandbox API server runs in this process (a thread); the manager runs as `python -m
tele.manager` against it and is reached by address (the port-forward path is measured by
bench/tunnel.py). Each row: a fresh daemon, `tele connect` timed end to end (CLI start, daemon
spawn, kubeconfig, link, arrival), then `tele quit`. Prints a table and a JSON line.
The 1-namespace cluster is measured with two managers at once, authentication enforcing (the
default: a TokenReview per link, a SubjectAccessReview on arrival) and disabled, the connects
alternating between them (ABBA ABBA ...: order does not bias the difference), to show what
authentication costs: the median of the paired differences.
Usage: python bench/connect.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tele.sandbox.testing import threaded_cluster

VENV_BIN = Path(sys.executable).parent


def populate(kubeconfig: Path, namespaces: int, services: int) -> None:
    objects: list[dict[str, Any]] = []
    for n in range(namespaces):
        objects.append(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"bench-{n}"}}
        )
    for s in range(services):
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{s}", "namespace": f"bench-{s % namespaces}"},
                "spec": {"selector": {"app": f"a{s}"}, "ports": [{"port": 80}]},
            }
        )
    manifest = kubeconfig.parent / "objects.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(kubeconfig),
            "apply",
            "--validate=false",
            "-f",
            str(manifest),
        ],
        check=True,
        capture_output=True,
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_manager(kubeconfig: Path, auth_mode: str) -> tuple[subprocess.Popen[str], int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "TELE_MANAGER_NAMESPACE": "default",
        "TELE_API_PORT": str(port),
        "TELE_AUTH_MODE": auth_mode,
    }
    manager = subprocess.Popen(
        [sys.executable, "-m", "tele.manager", "--kubeconfig", str(kubeconfig)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert manager.stderr is not None
    for line in manager.stderr:
        if "serving on port" in line:
            break
    else:
        raise SystemExit("the manager did not start")
    # Keep reading its log (a full pipe would stall it).
    threading.Thread(target=manager.stderr.read, daemon=True).start()
    return manager, port


def connect_once(kubeconfig: Path, port: int) -> float:
    """`tele connect` with a fresh daemon and home, timed end to end; then `tele quit`."""
    home = Path(tempfile.mkdtemp(prefix="tele-bench-home-"))
    tele_env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_STATE_HOME": str(home / "state"),
        "XDG_RUNTIME_DIR": str(home / "runtime"),
    }
    (home / "runtime").mkdir(mode=0o700)
    try:
        start = time.perf_counter()
        subprocess.run(
            [
                str(VENV_BIN / "tele"),
                "connect",
                "--no-vif",
                "--kubeconfig",
                str(kubeconfig),
                "--manager-address",
                f"127.0.0.1:{port}",
            ],
            env=tele_env,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start
    finally:
        subprocess.run(
            [str(VENV_BIN / "tele"), "quit"], env=tele_env, capture_output=True, check=False
        )
        shutil.rmtree(home, ignore_errors=True)


def measure(kubeconfig: Path, runs: int, auth_mode: str = "enforcing") -> dict[str, float]:
    manager, port = start_manager(kubeconfig, auth_mode)
    try:
        times = [connect_once(kubeconfig, port) for _ in range(runs + 1)]
        # The first connect warms caches up: not counted.
        return {"connect_s": statistics.median(times[1:]), "manager_rss_mib": rss_mib(manager.pid)}
    finally:
        manager.terminate()
        manager.wait(10)


def compare_auth(kubeconfig: Path, runs: int) -> dict[str, dict[str, float]]:
    """Connect time with authentication enforcing and disabled: both managers run at once and
    the connects alternate between them, the first of each pair swapping every round (ABBA
    ABBA ...), so that neither mode gets the warmer machine or the quieter moment."""
    managers = {mode: start_manager(kubeconfig, mode) for mode in ("enforcing", "disabled")}
    try:
        times: dict[str, list[float]] = {mode: [] for mode in managers}
        for _, port in managers.values():
            connect_once(kubeconfig, port)  # warm-up, not counted
        for round_ in range(runs):
            order = ["enforcing", "disabled"] if round_ % 2 == 0 else ["disabled", "enforcing"]
            for mode in order:
                times[mode].append(connect_once(kubeconfig, managers[mode][1]))
        return {
            mode: {
                "connect_s": statistics.median(times[mode]),
                "manager_rss_mib": rss_mib(managers[mode][0].pid),
            }
            for mode in managers
        } | {
            "paired": {
                "median_diff_s": statistics.median(
                    e - d for e, d in zip(times["enforcing"], times["disabled"], strict=True)
                )
            }
        }
    finally:
        for manager, _ in managers.values():
            manager.terminate()
            manager.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = {}
    auth: dict[str, dict[str, float]] = {}
    for label, namespaces, services in (
        ("1 namespace", 1, 0),
        ("100 namespaces, 1000 services", 100, 1000),
    ):
        with tempfile.TemporaryDirectory(prefix="tele-bench-") as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            with threaded_cluster(kubeconfig):
                if services or namespaces > 1:
                    populate(kubeconfig, namespaces, services)
                if namespaces == 1:  # the cost of authentication (issue 15: <= +50 ms)
                    auth = compare_auth(kubeconfig, args.runs)
                    results[label] = auth["enforcing"]
                    results["1 namespace, auth disabled"] = auth["disabled"]
                else:
                    results[label] = measure(kubeconfig, args.runs)
    small, large = results["1 namespace"], results["100 namespaces, 1000 services"]
    print(f"{'cluster':32} {'tele connect s':>15} {'manager RSS MiB':>16}")
    for label, row in results.items():
        print(f"{label:32} {row['connect_s']:>15.2f} {row['manager_rss_mib']:>16.1f}")
    growth = large["connect_s"] / small["connect_s"]
    auth_cost = auth["paired"]["median_diff_s"]
    print(
        f"authentication (enforcing - disabled, median of paired connects, interleaved ABBA): "
        f"{auth_cost * 1000:+.0f} ms (target <= +50 ms)"
    )
    print(
        f"growth 1 -> 100 namespaces: {growth:.2f}x (target < 2x); "
        "targets: connect <= 1.5 s, RSS <= 100 MiB"
    )
    summary = {"growth": round(growth, 2), "auth_cost_ms": round(auth_cost * 1000)}
    print(json.dumps({"bench": "connect", "results": results, **summary}))


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    main()
