"""`tele daemon run|start`: the daemon in the foreground (what the CLI spawns), or on demand."""

from __future__ import annotations

import click

from tele.cli.output import emit, output_option


@click.group()
def daemon() -> None:
    """Run or start the background daemon."""


@daemon.command()
@click.option("--ready-fd", type=int, default=None, hidden=True)
def run(ready_fd: int | None) -> None:
    """Run the daemon in the foreground.

    It runs until `tele quit`, SIGTERM or Ctrl-C; this is what the CLI starts in the background.
    """
    from tele.daemon import process

    process.run(ready_fd=ready_fd)


@daemon.command()
@output_option
def start(output: str) -> None:
    """Start the daemon in the background.

    Does nothing when it already runs; prints its pid either way.
    """
    from tele import paths
    from tele.cli import client
    from tele.rpc import daemon_api

    async def ensure() -> daemon_api.VersionReply:
        async with client.daemon_client(start=True) as rpc:
            assert rpc is not None
            return await rpc.call(daemon_api.VERSION, daemon_api.Empty(), timeout=5)

    reply = client.run(ensure)
    emit(
        {"pid": reply.pid, "version": reply.version, "socket": str(paths.daemon_socket())},
        output,
        lambda d: f"The daemon runs (pid {d['pid']}).",
    )
