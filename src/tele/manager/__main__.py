"""`python -m tele.manager`: the traffic manager as it runs in its pod (the Helm chart's image).

Configuration comes from TELE_* variables (see ManagerConfig.from_env) and the pod's service
account (in-cluster credentials), or a kubeconfig given with --kubeconfig for running it outside.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio


async def _main(kubeconfig: str | None) -> None:
    from tele import gctune
    from tele.k8s.client import open_kube_client
    from tele.k8s.incluster import in_cluster, in_cluster_connection
    from tele.manager.server import Manager, ManagerConfig

    config = ManagerConfig.from_env()
    connection = in_cluster_connection() if kubeconfig is None and in_cluster() else None
    async with (
        open_kube_client(kubeconfig, connection=connection) as kube,
        trio.open_nursery() as nursery,
    ):
        manager = Manager(config, kube)
        await nursery.start(manager.serve)
        # It relays tunnels and engaged connections: start-up's objects (modules, the informers'
        # first lists) out of every full collection (see tele.gctune).
        gctune.settle()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tele.manager", description=__doc__)
    parser.add_argument(
        "--kubeconfig", help="use this kubeconfig instead of in-cluster credentials"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    from tele import logs
    from tele.config import parse_log_level

    try:
        level = str(parse_log_level(os.environ.get("TELE_LOG_LEVEL") or "info"))
    except ValueError:
        level = "info"
    # (also keeps the libraries that log every frame or request at INFO unless trace)
    logs.set_level(level)
    from tele import _patches
    from tele.errors import TeleError, single_leaf

    _patches.apply()
    log = logging.getLogger("tele.manager")
    try:
        trio.run(_main, args.kubeconfig)
    except KeyboardInterrupt:
        pass
    except TeleError as exc:
        log.error("%s", exc)
        sys.exit(1)
    except BaseExceptionGroup as group:
        leaf = single_leaf(group)  # trio wraps what escapes a nursery
        if not isinstance(leaf, TeleError):
            raise
        log.error("%s", leaf)
        sys.exit(1)


if __name__ == "__main__":
    main()
