"""The everyday daemon commands: version, status, quit, loglevel, gather-logs.

Only `loglevel` starts a daemon (so that a level raised before `tele connect` applies to it);
version, status and quit report on whatever runs and never start one.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import click

import tele
from tele.cli.output import emit, output_option


def _uptime_text(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


@click.command()
@output_option
def version(output: str) -> None:
    """Show the client's version and, when a daemon runs, the daemon's."""
    from tele.cli import quick
    from tele.rpc import daemon_api

    reply = quick.ask_daemon(daemon_api.VERSION, daemon_api.Empty())
    status = None if reply is None else quick.ask_daemon(daemon_api.STATUS, daemon_api.Empty())
    session = None if status is None else status.session
    manager = session.manager_version if session is not None else ""
    data = {
        "client": {"version": tele.__version__, "python": platform.python_version()},
        "daemon": None
        if reply is None
        else {"version": reply.version, "python": reply.python, "pid": reply.pid},
        # The connected cluster's traffic manager (None when not connected).
        "traffic_manager": {"version": manager} if manager else None,
    }

    def text(d: dict[str, Any]) -> str:
        lines = [f"Client: tele v{d['client']['version']} (python {d['client']['python']})"]
        daemon = d["daemon"]
        if daemon is None:
            lines.append("Daemon: not running")
        else:
            lines.append(f"Daemon: tele v{daemon['version']} (pid {daemon['pid']})")
        manager = d["traffic_manager"]
        lines.append(
            f"Traffic Manager: v{manager['version']}"
            if manager
            else "Traffic Manager: not connected"
        )
        return "\n".join(lines)

    emit(data, output, text)


def _ended(session: dict[str, Any] | None) -> str:
    """Why the last session ended, when it failed (it is not connected for that reason)."""
    if not session or session.get("status") != "failed":
        return ""
    at = time.strftime("%H:%M:%S", time.gmtime(session.get("ended_at") or 0))
    return f": the session ended at {at} UTC: {session.get('last_error') or 'see the daemon log'}"


@click.command()
@output_option
def status(output: str) -> None:
    """Show whether the daemon runs (pid, version, uptime, files) and its connection."""
    from tele.cli import docker_cmd, quick
    from tele.cli.cluster_cmd import connection_lines
    from tele.cli.intercept_cmd import mounted_here
    from tele.cli.output import to_builtins
    from tele.rpc import daemon_api

    reply = quick.ask_daemon(daemon_api.STATUS, daemon_api.Empty())
    data: dict[str, Any]
    if reply is None:
        data = {"daemon": {"running": False}, "connection": "not connected"}
    else:
        data = {
            "daemon": {
                "running": True,
                "pid": reply.pid,
                "version": reply.version,
                "started_at": reply.started_at,
                "uptime": round(reply.uptime, 3),
                "log_level": reply.log_level,
                "log_file": reply.log_file,
                "socket": reply.socket,
            },
            "connection": reply.connection,
            "session": None if reply.session is None else to_builtins(reply.session),
        }
        # connect --docker: the daemon container's paths as this machine sees them
        docker_cmd.show_host_files(data["daemon"])
        if data["session"]:
            docker_cmd.show_host_mounts(data["session"], mounted_here)

    def text(d: dict[str, Any]) -> str:
        daemon = d["daemon"]
        if not daemon["running"]:
            return f"Daemon: not running\nConnection: {d['connection']}"
        return "\n".join(
            [
                "Daemon: running",
                f"  PID:       {daemon['pid']}",
                f"  Version:   v{daemon['version']}",
                f"  Uptime:    {_uptime_text(daemon['uptime'])}",
                f"  Log level: {daemon['log_level']}",
                f"  Log file:  {daemon['log_file']}",
                f"  Socket:    {daemon['socket']}",
                f"Connection: {d['connection']}{_ended(d.get('session'))}",
                *(connection_lines(d["session"]) if d.get("session") else []),
                *(docker_cmd.mount_lines(d["session"]) if d.get("session") else []),
                *_unseen_mounts(d.get("session")),
            ]
        )

    emit(data, output, text)


def _unseen_mounts(session: dict[str, Any] | None) -> list[str]:
    """A line per engagement whose volumes this shell cannot see (the daemon mounted them in
    a mount namespace this process does not share)."""
    from tele.cli.intercept_cmd import mounted_here

    if not session or session.get("status") == "failed":
        return []
    return [
        f"  Not seen here:      the volumes of {e['name']} at {e['local_mount']} (mounted in the "
        "daemon's mount namespace, which this shell does not share)"
        for e in session.get("engagements") or []
        # connect --docker: said by docker_cmd.mount_lines (its path here, or none here)
        if e.get("local_mount") and not e.get("mounted_for") and not mounted_here(e["local_mount"])
    ]


@click.command(name="quit")
@click.option(
    "--stop-daemons",
    "-s",
    is_flag=True,
    help="Accepted for Telepresence's habit: tele's one daemon always stops.",
)
@output_option
def quit_(stop_daemons: bool, output: str) -> None:
    """Stop the daemon (and end its session and engagements); says so when none runs."""
    from tele.cli import quick
    from tele.errors import ConnectionFailed
    from tele.rpc import daemon_api

    reply = quick.ask_daemon(daemon_api.QUIT, daemon_api.Empty(), timeout=10)
    pid = None if reply is None else reply.pid
    # The daemon replied after removing its socket; wait for the process itself so that a
    # command run right after this one starts a fresh daemon instead of racing the old one.
    if pid is not None and not quick.wait_process_gone(pid, timeout=10):
        raise ConnectionFailed(f"The daemon (pid {pid}) did not exit within 10s.")
    from tele.cli import docker_cmd  # a daemon container's (connect --docker) leftovers

    cleaned: list[str] = []
    if pid is None:
        # A daemon killed with its network set up left an undo journal: finish its job.
        from tele.daemon import leftovers

        cleaned = list(leftovers.without_daemon())
        cleaned += docker_cmd.leftover_mounts()
    # connect --docker's directories, once empty (a stopped daemon's relay removes its socket)
    docker_cmd.tidy_runtime(wait_relay=10.0 if pid is not None else 0.0)
    data = {
        "stopped_pid": pid,
        "left": list(reply.ended) if reply is not None else [],
        "cleaned_up": cleaned,
    }

    def text(d: dict[str, Any]) -> str:
        if d["stopped_pid"] is None:
            lines = ["The daemon is not running."]
            lines += [f"Cleaned up after a stopped daemon: {line}." for line in d["cleaned_up"]]
            return "\n".join(lines)
        left = [f"Left {', '.join(d['left'])}."] if d["left"] else []
        return "\n".join([*left, f"Stopped the daemon (pid {d['stopped_pid']})."])

    emit(data, output, text)


@click.command()
@click.argument("level")
@click.option(
    "--duration",
    "-d",
    default="30m",
    show_default=True,
    help="How long the level holds before the configured one returns (0 = until changed).",
)
@click.option("--local-only", "-l", is_flag=True, help="Only the daemon on this machine.")
@click.option(
    "--remote-only",
    "-r",
    is_flag=True,
    help="Only the traffic manager and its traffic agents (needs a connection).",
)
@output_option
def loglevel(level: str, duration: str, local_only: bool, remote_only: bool, output: str) -> None:
    """Set the log level (trace, debug, info, warning, error) for a while: the daemon's and,
    when connected, the traffic manager's and its agents'.

    Starts the daemon when none runs, so that a raised level applies to what follows.
    """
    from tele import config
    from tele.cli import client
    from tele.errors import UserError
    from tele.rpc import daemon_api

    if local_only and remote_only:
        raise click.UsageError("--local-only and --remote-only exclude each other: use one.")
    # The value once, then what is accepted (the parsers' own messages repeat the value).
    try:
        level_name = config.parse_log_level(level)
    except ValueError:
        raise UserError(
            f"Unknown log level {level!r}: use trace, debug, info, warning or error."
        ) from None
    try:
        seconds = config.parse_duration(duration)
    except ValueError:
        raise UserError(
            f"Invalid --duration {duration!r}: use a duration like 20s, 1m30s or 500ms."
        ) from None

    async def change() -> daemon_api.SetLogLevelReply:
        async with client.daemon_client(start=not remote_only) as rpc:
            if rpc is None:
                raise UserError("Not connected; run `tele connect` first.")
            request = daemon_api.SetLogLevelRequest(
                level=str(level_name),
                duration=float(seconds),
                local=not remote_only,
                remote=not local_only,
            )
            return await rpc.call(daemon_api.SET_LOG_LEVEL, request, timeout=30)

    reply = client.run(change)
    for_a_while = f" return in {config.format_duration(round(seconds))}" if seconds else ""

    def text(r: daemon_api.SetLogLevelReply) -> str:
        manager = r.traffic_manager
        if manager is None:
            line = f"The daemon's log level is {r.level} (was {r.previous})"
            if r.revert_in is not None and r.revert_to is not None:
                line += f"; {r.revert_to} returns in {config.format_duration(round(r.revert_in))}"
            line += "."
            if r.remote_problem:
                line += f"\nThe traffic manager's is unchanged: {r.remote_problem.rstrip('.')}."
            return line
        which = [f"the daemon (was {r.previous})"] if r.previous else []
        which.append(f"the traffic manager (was {manager.previous})")
        agents = f"{manager.agents} traffic agent{'s' if manager.agents != 1 else ''}"
        line = f"The log level is {r.level} for {', '.join(which)} and {agents}"
        return line + (f"; their configured levels{for_a_while}." if for_a_while else ".")

    emit(reply, output, text)
