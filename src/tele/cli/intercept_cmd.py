"""`tele intercept` and `tele leave`: send a workload's traffic to a local handler."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import click

from tele.cli.output import emit, output_option
from tele.errors import UserError


def _header(value: str) -> tuple[str, str]:
    """`K=V` or `K: V` (Telepresence's two forms)."""
    for separator in ("=", ":"):
        key, sep, rest = value.partition(separator)
        if sep and key.strip():
            return key.strip().lower(), rest.strip()
    raise UserError(f"--http-header {value!r} must look like NAME=VALUE or 'NAME: VALUE'")


def _port(value: str) -> tuple[int, str]:
    """`--port LOCAL[:SERVICE_PORT]` -> (local port, service port name or number)."""
    local, _, service_port = value.partition(":")
    if not local.isdigit() or not 0 < int(local) < 65536:
        raise UserError(f"--port {value!r}: the local port must be a number from 1 to 65535")
    return int(local), service_port


def _mount(value: str) -> str:
    """`--mount true|false|DIR[:ro]` with DIR made absolute (the daemon has another cwd)."""
    text, read_only = (value[:-3], ":ro") if value.endswith(":ro") else (value, "")
    if text.strip().lower() in ("", "true", "false", "yes", "no"):
        return value
    return os.path.abspath(os.path.expanduser(text)) + read_only


def _write_env(info: dict[str, Any], env_file: Path | None, env_json: Path | None) -> None:
    environment: dict[str, str] = info.get("environment") or {}
    try:
        if env_file is not None:
            env_file.write_text(
                "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(environment.items()))
            )
        if env_json is not None:
            env_json.write_text(json.dumps(environment, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the environment file: {exc.strerror or exc}") from exc


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--workload", "-w", default="", help="The workload (default: NAME).")
@click.option("--namespace", "-n", default="", help="Its namespace (default: the connected one).")
@click.option("--port", "-p", default="8080", show_default=True, help="LOCAL[:SERVICE_PORT].")
@click.option(
    "--address", default="127.0.0.1", show_default=True, help="The local handler's address."
)
@click.option("--service", default="", help="The Service, when several select the workload.")
@click.option("--container", default="", help="The container, when several have the port.")
@click.option(
    "--mechanism",
    type=click.Choice(["tcp", "http"]),
    default=None,
    help="Default: tcp, or http with filters.",
)
@click.option(
    "--http-header", multiple=True, help="Only requests with this header (NAME=VALUE); repeatable."
)
@click.option("--http-path-equal", multiple=True, help="Only requests for this exact path.")
@click.option("--http-path-prefix", multiple=True, help="Only requests whose path starts so.")
@click.option("--http-path-regex", multiple=True, help="Only requests whose path matches.")
@click.option(
    "--env-file",
    "-e",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the pod's environment here (sh syntax).",
)
@click.option(
    "--env-json",
    "-j",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the pod's environment here as JSON.",
)
@click.option(
    "--mount",
    default="true",
    show_default=True,
    help="Mount the pod's volumes: true (a temporary directory), false, or DIR; "
    "append :ro for read-only. TELEPRESENCE_ROOT tells the handler where.",
)
@output_option
def intercept(
    name: str,
    command: tuple[str, ...],
    workload: str,
    namespace: str,
    port: str,
    address: str,
    service: str,
    container: str,
    mechanism: str | None,
    http_header: tuple[str, ...],
    http_path_equal: tuple[str, ...],
    http_path_prefix: tuple[str, ...],
    http_path_regex: tuple[str, ...],
    env_file: Path | None,
    env_json: Path | None,
    mount: str,
    output: str,
) -> None:
    """Send NAME's traffic to a local handler; with `-- COMMAND`, run it, then leave."""
    from tele.cli import client
    from tele.cli.output import to_builtins
    from tele.rpc import daemon_api
    from tele.rpc.agent_api import EngagementInfo

    local_port, service_port = _port(port)
    headers = [_header(h) for h in http_header]
    filtered = bool(headers or http_path_equal or http_path_prefix or http_path_regex)
    if mechanism == "tcp" and filtered:
        raise UserError("--http-* filters need --mechanism http")
    request = daemon_api.InterceptRequest(
        name=name,
        workload=workload,
        namespace=namespace,
        local_address=address,
        local_port=local_port,
        port=service_port,
        service=service,
        container=container,
        mechanism=mechanism or ("http" if filtered else "tcp"),
        headers=headers,
        path_equal=list(http_path_equal),
        path_prefix=list(http_path_prefix),
        path_regex=list(http_path_regex),
        mount=_mount(mount),
    )

    async def call() -> EngagementInfo:
        async with client.daemon_client(start=False) as rpc:
            if rpc is None:
                raise UserError("Not connected; run `tele connect` first.")
            return await rpc.call(daemon_api.INTERCEPT, request, timeout=180)

    info = client.run(call)
    data = to_builtins(info)
    _write_env(data, env_file, env_json)

    def text(d: dict[str, Any]) -> str:
        what = "all TCP connections" if d["mechanism"] == "tcp" else "HTTP requests that match"
        return "\n".join(
            [
                f"Using {d['workload_kind']} {d['workload']}",
                f"   Intercept name         : {d['name']}",
                "   State                  : ACTIVE",
                f"   Workload kind          : {d['workload_kind']}",
                f"   Destination            : {address}:{local_port}",
                f"   Service Port Identifier: {d['service']}:{d['service_port']}",
                *(
                    [f"   Volume Mount Point     : {d['local_mount']}"]
                    if d.get("local_mount")
                    else []
                ),
                f"   Intercepting           : {what}",
            ]
        )

    if data.get("mount_error"):
        click.echo(f"tele: the volumes are not mounted: {data['mount_error']}", err=True)
    emit(data, output, text)
    if command:
        env = {**os.environ, **(data.get("environment") or {})}
        try:
            status = subprocess.run(list(command), env=env, check=False).returncode
        except OSError as exc:
            status = 127
            click.echo(f"tele: cannot run {command[0]}: {exc.strerror or exc}", err=True)
        finally:
            _leave(name)
        raise SystemExit(status)


def _leave(name: str) -> None:
    from tele.cli import client
    from tele.rpc import daemon_api

    async def call() -> None:
        async with client.daemon_client(start=False) as rpc:
            if rpc is None:
                raise UserError("Not connected; run `tele connect` first.")
            await rpc.call(daemon_api.LEAVE, daemon_api.LeaveRequest(name=name), timeout=30)

    client.run(call)


@click.command()
@click.argument("name")
def leave(name: str) -> None:
    """End the engagement NAME; its traffic goes back to the cluster's workload."""
    _leave(name)
    click.echo(f"Left {name}.")


@click.command()
@click.option("--agent", "-d", "agents", multiple=True, help="A workload to remove the agent from.")
@click.option("--all-agents", "-a", is_flag=True, help="Every agent in the namespace.")
@click.option("--namespace", "-n", default="", help="The namespace (default: the connected one).")
def uninstall(agents: tuple[str, ...], all_agents: bool, namespace: str) -> None:
    """Remove the traffic agent from workloads; their pods are rolled out without it."""
    from tele.cli import client
    from tele.rpc import daemon_api
    from tele.rpc.agent_api import UninstallReply

    if bool(agents) == all_agents:
        raise UserError("Name workloads with --agent, or use --all-agents (one of the two).")

    async def call() -> UninstallReply:
        async with client.daemon_client(start=False) as rpc:
            if rpc is None:
                raise UserError("Not connected; run `tele connect` first.")
            request = daemon_api.UninstallRequest(
                namespace=namespace, workloads=list(agents), all_agents=all_agents
            )
            return await rpc.call(daemon_api.UNINSTALL, request, timeout=60)

    reply = client.run(call)
    if reply.removed:
        click.echo(f"Removed the traffic agent from {', '.join(reply.removed)}.")
    else:
        click.echo("No traffic agent to remove.")
