"""`python -m tele.agent agent|agent-init`: the traffic agent's two programs in one image.

`agent` serves the agent ports (config from the env the manager's webhook injects); `agent-init`
installs the numeric-port redirects in the pod's network namespace and exits. Errors are one
sentence on stderr (the pod's log) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from pathlib import Path

import msgspec
import trio

from tele import _patches, gctune, logs
from tele.agent.config import AgentSettings, load
from tele.errors import TeleError, single_leaf

log = logging.getLogger("tele.agent")


async def run_agent(settings: AgentSettings) -> None:
    from tele.agent.files import FileServerKeys, exports, serve_files
    from tele.agent.forward import serve
    from tele.agent.manager_link import ManagerEngagements
    from tele.agent.tls import TlsTermination

    tls = None
    if settings.tls_cert:
        tls = TlsTermination.from_files(
            Path(settings.tls_cert),
            Path(settings.tls_key),
            app_tls=settings.app_tls,
            app_ca=Path(settings.app_ca) if settings.app_ca else None,
        )
    async with trio.open_nursery() as nursery:
        try:
            keys: FileServerKeys | None = FileServerKeys()
        except OSError as exc:  # e.g. a read-only root filesystem: serve no files
            log.warning("volumes are not exported: no place for the file servers' key: %s", exc)
            keys = None
        source = ManagerEngagements.for_settings(settings, files=keys)
        # The file servers (one per container with exported volumes) before arriving: the
        # manager learns their ports from the identity.
        sftp_ports = {}
        if keys is not None:
            for container, export in exports(settings.config, tls_dir=keys.directory).items():
                files = partial(serve_files, export, allow=source.may_reach_files)
                sftp_ports[container] = await nursery.start(files)
        source.agent = msgspec.structs.replace(
            source.agent,
            sftp_ports=sftp_ports,
            tls_public_key=keys.public_key_pem.decode() if keys is not None else "",
        )
        # Started at once, before the manager answers: until then the agent is transparent.
        await nursery.start(source.serve)
        await nursery.start(partial(serve, tls=tls), settings, source)
        ports = ", ".join(f"{i.agent_port}->{i.container_port}" for _, i in settings.intercepts())
        log.info("traffic agent %s ready on %s", settings.name, ports or "no ports")
        # It relays every engaged connection of its pod: start-up's objects out of every full
        # collection (see tele.gctune).
        gctune.settle()


async def run_init(settings: AgentSettings) -> None:
    from tele.agent.init import apply

    await apply(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tele.agent", description=__doc__)
    parser.add_argument("program", choices=["agent", "agent-init"])
    args = parser.parse_args(argv)
    level = (os.environ.get("LOG_LEVEL") or os.environ.get("TELE_LOG_LEVEL") or "info").lower()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    # (also keeps the libraries that log every frame or request at INFO unless trace)
    logs.set_level("warning" if level == "warn" else level if level in logs.LEVELS else "info")
    _patches.apply()
    try:
        settings = load(os.environ)
        trio.run(run_agent if args.program == "agent" else run_init, settings)
    except KeyboardInterrupt:
        return 0
    except TeleError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except BaseExceptionGroup as group:
        leaf = single_leaf(group)
        if isinstance(leaf, TeleError):
            log.error("%s", leaf)
            return leaf.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
