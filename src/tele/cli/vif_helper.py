"""`tele connect`'s part in least privilege: start the privileged network helper when the
daemon cannot set up the network itself.

The daemon runs as the user; creating the TUN device, routes and resolver settings needs
CAP_NET_ADMIN. The CLI has the terminal that sudo needs for its password prompt, so it starts
`python -m tele.vif.helper` through `$TELE_VIF_HELPER` (default `sudo`; any command that runs
its arguments as root, such as `doas`). The helper connects to the daemon's helper socket and
detaches; the command returns once the daemon has accepted it. Without --vif, sudo runs with
`-n` (never asks): connecting must not stop at a prompt nobody expected.

The helper's log is opened here, as the user, and passed as its standard output: the helper
never opens a file by a path it was given (as root that would be any file).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

import trio

from tele import paths
from tele.errors import UserError
from tele.rpc import daemon_api
from tele.rpc.client import Client
from tele.vif.caps import has_net_admin

ENV_COMMAND = "TELE_VIF_HELPER"
"""The command that runs the helper as root (split like a shell would); default `sudo`."""
START_TIMEOUT = 120.0
"""Long enough for a person to type a password."""


def helper_command(daemon_pid: int, *, interactive: bool) -> list[str]:
    """The argv that starts the helper for `daemon_pid` (no prefix when already root)."""
    prefix = shlex.split(os.environ.get(ENV_COMMAND, "sudo"))
    if os.geteuid() == 0:
        prefix = []
    elif prefix and os.path.basename(prefix[0]) == "sudo" and not interactive:
        prefix.insert(1, "-n")
    return [
        *prefix,
        sys.executable,
        "-m",
        "tele.vif.helper",
        "--daemon-pid",
        str(daemon_pid),
        "--socket",
        str(paths.helper_socket()),
        "--log-level",
        _root_log_level(),
    ]


def _root_log_level() -> str:
    """Config logLevels.rootDaemon (a bad config file: the default; connect reports it)."""
    from tele import config
    from tele.errors import UserError

    try:
        return str.__str__(config.load().log_levels.root_daemon)
    except UserError:
        return "info"


async def ensure_helper(rpc: Client, *, explicit: bool) -> str:
    """Start the helper when the daemon needs one for a new session.

    Returns "" (started, or not needed) or why it could not be started; with `explicit`
    (--vif) that is a UserError instead.
    """
    status = await rpc.call(daemon_api.STATUS, daemon_api.Empty(), timeout=10)
    if status.session is not None or has_net_admin(status.pid):
        return ""  # connected already (nothing to set up), or the daemon can do it itself
    argv = helper_command(status.pid, interactive=explicit)
    program = argv[0]
    if shutil.which(program) is None:
        reason = f"{program} is not installed (set {ENV_COMMAND} to a command that runs as root)"
        if explicit:
            raise UserError(f"Cannot start the privileged network helper: {reason}.")
        return reason
    paths.ensure_private_dir(paths.logs_dir())
    try:
        log_fd = os.open(
            paths.logs_dir() / "helper.log",
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError:  # (a symlink there, say): the helper runs without a log
        log_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        with trio.move_on_after(START_TIMEOUT if explicit else 30):
            result = await trio.run_process(
                argv, stdin=None, stdout=log_fd, capture_stderr=True, check=False
            )
            if result.returncode == 0:
                return ""
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            reason = lines[-1] if lines else f"{program} exited with status {result.returncode}"
            if explicit:
                raise UserError(f"Cannot start the privileged network helper: {reason}")
            return reason
    finally:
        os.close(log_fd)
    reason = f"{program} did not start the helper within {START_TIMEOUT:g}s"
    if explicit:
        raise UserError(f"Cannot start the privileged network helper: {reason}.")
    return reason
