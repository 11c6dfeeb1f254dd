"""tele's image as a module of this venv (the kubelet's fallback for images not in its store).

Does what the image's entry point does: `manager` (the default), `agent` / `agent-init`. The
programs are run by name (runpy), so the sandbox does not import the manager or agent.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    args = sys.argv[1:] or ["manager"]
    if args[0] in ("agent", "agent-init"):
        sys.argv = ["tele.agent", *args]
        runpy.run_module("tele.agent", run_name="__main__", alter_sys=True)
    else:
        rest = args[1:] if args[0] == "manager" else args
        sys.argv = ["tele.manager", *rest]
        runpy.run_module("tele.manager", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
