"""`tele-sandbox/worker`: no ports; logs a line of what it does every few seconds until stopped."""

from __future__ import annotations

import os
import signal
import sys
import time


def main() -> None:
    interval = float(os.environ.get("WORK_INTERVAL", "2"))

    def on_term(signum: int, frame: object) -> None:
        print("worker stopping", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    print(f"worker {os.environ.get('HOSTNAME', '')} starting", flush=True)
    n = 0
    while True:
        n += 1
        print(f"work item {n} done", flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
