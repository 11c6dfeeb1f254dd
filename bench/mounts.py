"""Mounted volumes (issue 9, point 5): how long a mount takes and how fast files move through it.

Two paths, same measurements (a 64 MiB file written then read back on a fresh mount, and 300
small files of 4 KiB read one by one):
  loopback  sshfs -> the agent's file server (tele.agent.files: one chrooted tele.agent.sftp
            per connection) on 127.0.0.1: the floor of the design, no tunnel;
  tunnel    `tele intercept --mount DIR` on a sandbox with a node: sshfs -> the daemon's
            forwarder -> h2 tunnel over the port-forward websocket -> manager -> the agent pod;
            the mount time is `tele intercept` with --mount minus the same without (medians
            of 3).
Needs root (the sandbox's network namespaces) and sshfs. Prints a table and one JSON line.

    .venv/bin/python bench/mounts.py [--size-mib 64] [--files 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
SERVER = """
import sys, trio
from tele.agent.files import Export, serve_files
async def main():
    async with trio.open_nursery() as n:
        export = Export(root=sys.argv[1], read_only=False, writable=("/",))
        port = await n.start(lambda task_status: serve_files(
            export, host="127.0.0.1", task_status=task_status))
        print(port, flush=True)
trio.run(main)
"""

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: files, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: files}}
  template:
    metadata: {labels: {app: files}}
    spec:
      containers:
      - name: app
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}]
        volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: files, namespace: default}
spec:
  selector: {app: files}
  ports: [{name: http, port: 80, targetPort: http}]
"""


def _write(path: Path, size: int) -> float:
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return (size / (1 << 20)) / (time.perf_counter() - start)


def _read(path: Path) -> float:
    start = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return (total / (1 << 20)) / (time.perf_counter() - start)


def _small(directory: Path, count: int) -> float:
    start = time.perf_counter()
    for index in range(count):
        (directory / f"f{index}").read_bytes()
    return count / (time.perf_counter() - start)


def _unmount(directory: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(directory)], check=False)


def loopback(size: int, files: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        export, mnt = Path(tmp) / "export", Path(tmp) / "mnt"
        (export / "small").mkdir(parents=True)
        mnt.mkdir()
        export.chmod(0o777)  # the file server is not root: a writable volume, as an emptyDir
        for index in range(files):
            (export / "small" / f"f{index}").write_bytes(os.urandom(4096))
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(export)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())

            def mount() -> float:
                start = time.perf_counter()
                subprocess.run(
                    ["sshfs", "-o", f"directport={port}", "127.0.0.1:/", str(mnt)],
                    check=True,
                )
                os.listdir(mnt)
                return time.perf_counter() - start

            mount_s = mount()
            write = _write(mnt / "big", size)
            _unmount(mnt)
            mount()  # a fresh mount: the read is not served from the page cache
            read = _read(mnt / "big")
            small = _small(mnt / "small", files)
            _unmount(mnt)
        finally:
            _unmount(mnt)
            server.terminate()
            server.wait()
    return {"mount_s": mount_s, "write_mib_s": write, "read_mib_s": read, "small_per_s": small}


def tunnel(size: int, files: int) -> dict[str, float]:
    from tele.sandbox.testing import threaded_cluster

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        env = dict(os.environ)
        for name in ("config", "cache", "state", "runtime"):
            (base / name).mkdir()
            env[f"XDG_{name.upper()}_HOME" if name != "runtime" else "XDG_RUNTIME_DIR"] = str(
                base / name
            )
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
        kubeconfig = base / "kubeconfig"

        def tele(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run(
                [str(VENV_BIN / "tele"), *args],
                check=False,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, done.stderr
            return done

        def kubectl(*args: str, stdin: str | None = None) -> None:
            subprocess.run(
                ["kubectl", "--kubeconfig", str(kubeconfig), *args],
                input=stdin,
                text=True,
                check=True,
                capture_output=True,
                timeout=120,
            )

        def timed(action: Callable[[], Any]) -> float:
            start = time.perf_counter()
            action()
            return time.perf_counter() - start

        name = f"bm{uuid.uuid4().hex[:6]}"
        with threaded_cluster(
            kubeconfig, name=name, nodes=True, state_dir=base / "sandbox", node_options={}
        ):
            mnt = base / "mnt"
            try:
                tele("helm", "install", "--kubeconfig", str(kubeconfig))
                kubectl(
                    "wait", "-n", "ambassador", "--for=condition=Ready", "pod",
                    "-l", "app=traffic-manager", "--timeout=90s",
                )  # fmt: skip
                kubectl("apply", "-f", "-", stdin=APP)
                kubectl("wait", "--for=condition=Ready", "pod", "-l", "app=files", "--timeout=90s")
                tele("connect", "--no-vif", "--kubeconfig", str(kubeconfig))
                intercept = ("intercept", "files", "--port", "8089")
                # The agent is injected by the first intercept: time the next ones.
                tele(*intercept, "--mount", "false")
                tele("leave", "files")
                withouts, withs = [], []
                for _ in range(3):
                    withouts.append(timed(lambda: tele(*intercept, "--mount", "false")))
                    tele("leave", "files")
                    withs.append(timed(lambda: tele(*intercept, "--mount", str(mnt))))
                    tele("leave", "files")
                without, with_mount = statistics.median(withouts), statistics.median(withs)
                tele(*intercept, "--mount", str(mnt))
                (mnt / "data" / "small").mkdir()
                for index in range(files):
                    (mnt / "data" / "small" / f"f{index}").write_bytes(os.urandom(4096))
                write = _write(mnt / "data" / "big", size)
                tele("leave", "files")
                tele(*intercept, "--mount", str(mnt))  # a fresh mount, cold page cache
                read = _read(mnt / "data" / "big")
                small = _small(mnt / "data" / "small", files)
                tele("leave", "files")
            finally:
                _unmount(mnt)
                subprocess.run(
                    [str(VENV_BIN / "tele"), "quit"], env=env, capture_output=True, check=False
                )
                subprocess.run(
                    [str(VENV_BIN / "tele"), "helm", "uninstall", "--kubeconfig", str(kubeconfig)],
                    env=env,
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
    return {
        "intercept_s": without,
        "intercept_with_mount_s": with_mount,
        "mount_s": with_mount - without,
        "write_mib_s": write,
        "read_mib_s": read,
        "small_per_s": small,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--files", type=int, default=300)
    args = parser.parse_args()
    size = args.size_mib << 20
    rows = {"loopback": loopback(size, args.files), "tunnel": tunnel(size, args.files)}
    print(
        f"{'path':<10} {'mount s':>8} {'write MiB/s':>12} {'read MiB/s':>11} {'4KiB files/s':>13}"
    )
    for path, row in rows.items():
        print(
            f"{path:<10} {row['mount_s']:>8.3f} {row['write_mib_s']:>12.1f} "
            f"{row['read_mib_s']:>11.1f} {row['small_per_s']:>13.0f}"
        )
    print(json.dumps({"bench": "mounts", "size_mib": args.size_mib, "files": args.files, **rows}))


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    main()
