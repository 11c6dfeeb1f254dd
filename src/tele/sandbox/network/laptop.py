"""The laptop namespace `<cluster>-laptop`: where `tele sandbox shell` puts the user.

It has loopback only, plus the API server at the kubeconfig's own address (a listening socket
opened in the namespace and served by the API server itself: no relay process or copy between,
as a real laptop reaches its cluster's API server), so a tele daemon started there is the
laptop's: no cluster address is reachable until tele connects it.
The shell gets a tele home of its own (config, cache, state, runtime directories) and a
resolv.conf of its own: /etc/netns/<name>/resolv.conf, mounted over /etc/resolv.conf, so a
daemon there that sets up DNS changes the laptop's file, never the host's.

All shells share one mount namespace (netns.pin_mount_namespace), as the programs of one laptop
do: the volumes a tele daemon mounts for an engagement are seen from every shell, not only from
the one that started the daemon (`ip netns exec` makes a new mount namespace per command).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from . import netns

ServeApi = Callable[..., Awaitable[None]]
"""`ApiServer.serve_listeners`: serves a list of `trio.SocketListener`s, ready at once."""


async def serve_laptop(
    cluster: str,
    api_host: str,
    api_port: int,
    serve_api: ServeApi,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The laptop namespace `<cluster>-laptop`: loopback only, with the API server at its
    kubeconfig address (`serve_api` serves the socket opened there). Removed again when
    cancelled."""
    name = f"{cluster}-laptop"
    await netns.delete(name)
    await netns.add(name)
    etc = netns.ETC_NETNS / name
    try:
        etc.mkdir(parents=True, exist_ok=True)
        # Nothing outside the cluster resolves from here (loopback only); the file exists so
        # that the laptop has one of its own.
        (etc / "resolv.conf").write_text("# the sandbox laptop's resolver\nnameserver 127.0.0.1\n")
        await netns.ip_batch(name, ["link set lo up"])
        await trio.to_thread.run_sync(netns.pin_mount_namespace_sync, name)
        sock = await netns.socket_in(name)
        with sock:
            await sock.bind((api_host, api_port))
            sock.listen(128)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_api, [trio.SocketListener(sock)])
                task_status.started(name)
    finally:
        with trio.CancelScope(shield=True):
            await netns.delete(name)
            netns.unpin_mount_namespace_sync(name)
            shutil.rmtree(etc, ignore_errors=True)


def shell_command(
    cluster: str, home: Path, kubeconfig: str, command: list[str]
) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run `command` (or a shell) in the laptop namespace."""
    env = dict(os.environ)
    for sub in ("config", "cache", "state", "runtime"):
        (home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_CACHE_HOME=str(home / "cache"),
        XDG_STATE_HOME=str(home / "state"),
        XDG_RUNTIME_DIR=str(home / "runtime"),
        KUBECONFIG=kubeconfig,
        TELE_SANDBOX=cluster,
    )
    if not command:
        command = [env.get("SHELL") or "/bin/sh"]
        env["PS1"] = f"({cluster}-laptop) \\w \\$ "
    return netns.enter_command(f"{cluster}-laptop", command, os.getcwd()), env
