"""`tele intercept`, `tele replace`, `tele ingest` (engage a workload's container: its traffic,
the whole container, or only its environment) and `tele leave`, `tele uninstall`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from tele.cli import docker_cmd, podenv
from tele.cli.output import emit, output_option
from tele.errors import UserError

log = logging.getLogger(__name__)


def _header(value: str) -> tuple[str, str]:
    from tele.rpc import filters

    try:
        return filters.parse_header(value)
    except ValueError as exc:
        raise UserError(f"{exc}.") from None


def _port(value: str) -> tuple[int, str]:
    """`--port LOCAL[:SERVICE_PORT]` -> (local port, service port name or number)."""
    local, _, service_port = value.partition(":")
    if not local.isdigit() or not 0 < int(local) < 65536:
        raise UserError(f"--port {value!r}: the local port must be a number from 1 to 65535.")
    return int(local), service_port


def _mount(value: str) -> str:
    """`--mount true|false|DIR[:ro]` with DIR made absolute (the daemon has another cwd)."""
    text, read_only = (value[:-3], ":ro") if value.endswith(":ro") else (value, "")
    if text.strip().lower() in ("", "true", "false", "yes", "no"):
        return value
    return os.path.abspath(os.path.expanduser(text)) + read_only


def _write_env(info: dict[str, Any], handling: _Handling) -> None:
    environment: dict[str, str] = info.get("environment") or {}
    unsafe = handling.unsafe_env
    try:
        if handling.env_file is not None:
            text, left_out = podenv.env_file(environment, handling.env_syntax, unsafe=unsafe)
            handling.env_file.write_text(text)
            if left_out:
                click.echo(
                    f"tele: left {', '.join(left_out)} out of {handling.env_file}: "
                    f"--env-syntax {handling.env_syntax} cannot hold a line break in a value "
                    "(compose, sh or json can).",
                    err=True,
                )
        if handling.env_json is not None:
            mapping = podenv.json_map(environment, unsafe=unsafe)
            handling.env_json.write_text(json.dumps(mapping, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise UserError(f"Cannot write the environment file: {exc.strerror or exc}.") from exc


def _port_mappings(values: tuple[str, ...], *, remote_defaults_to_local: bool) -> list[Any]:
    """`-p LOCAL[:REMOTE]` values as PortMappings; for `replace` REMOTE (a container port)
    defaults to LOCAL, for `intercept` to the only service port."""
    from tele.rpc.daemon_api import PortMapping

    mappings = []
    for value in values:
        local, remote = _port(value)
        if not remote and remote_defaults_to_local:
            remote = str(local)
        mappings.append(PortMapping(local=local, remote=remote))
    locals_ = [m.local for m in mappings]
    if len(set(locals_)) != len(locals_):
        raise UserError("Each --port needs its own local port.")
    return mappings


def _to_pod(values: tuple[str, ...]) -> list[str]:
    for value in values:
        port, _, protocol = value.partition("/")
        if (
            not port.isdigit()
            or not 0 < int(port) < 65536
            or protocol.upper() not in ("", "TCP", "UDP")
        ):
            raise UserError(
                f"--to-pod {value!r} must be PORT or PORT/UDP (a port from 1 to 65535)."
            )
    return list(values)


@dataclass(frozen=True)
class _Target:
    """What intercept, replace and ingest all name: the workload's container, and what the
    local side gets (`--to-pod` forwards, `--mount`)."""

    workload: str
    namespace: str
    container: str
    to_pod: tuple[str, ...]
    mount: str


@dataclass(frozen=True)
class _Handling:
    """What the three do once engaged: env files, output, `-- COMMAND`."""

    env_file: Path | None
    env_syntax: str
    env_json: Path | None
    unsafe_env: bool
    command: tuple[str, ...]
    output: str


def _engage(kind: str, target: _Target, handling: _Handling, text: Any, **fields: Any) -> None:
    """The CLI side of intercept, replace and ingest: ask the daemon for a `kind` engagement
    of `target` (`fields`: the rest of the InterceptRequest), write the env files, print, and
    with `-- COMMAND` run it with the pod's env, then leave."""
    from tele.cli import client
    from tele.cli.output import to_builtins
    from tele.rpc import daemon_api

    request = daemon_api.InterceptRequest(
        workload=target.workload,
        namespace=target.namespace,
        container=target.container,
        kind=kind,
        to_pod=_to_pod(target.to_pod),
        mount=_mount(target.mount),
        **fields,
    )
    unsafe_env, command, output = handling.unsafe_env, handling.command, handling.output

    docker = docker_cmd.before_engaging()  # --docker-*: the engine and the image first
    in_container = docker_cmd.daemon_in_container()  # connect --docker
    if in_container:
        if note := docker_cmd.mount_dir_note(request.mount):
            click.echo(note, err=True)
        mount = docker_cmd.mount_request(request.mount, docker is not None)
        import msgspec

        request = msgspec.structs.replace(request, mount=mount)
    what = {
        "intercept": "Intercepting",
        "replace": "Replacing",
        "ingest": "Ingesting",
        "wiretap": "Wiretapping",
    }[kind]
    info = client.call_connected(
        daemon_api.INTERCEPT,
        request,
        timeout=180,
        connect=True,
        progress=f"{what} {target.workload or fields.get('name') or ''}".rstrip(),
    )
    data = to_builtins(info)
    try:
        _write_env(data, handling)
    except UserError:
        _leave(info.name)
        raise
    if in_container:  # mounted in there, for the --docker-run container only
        data["local_mount"] = docker_cmd.host_mount(str(data.get("local_mount") or ""))
        if note := docker_cmd.volumes_note(data, docker is not None):
            click.echo(note, err=True)
    elif data.get("mount_error"):
        why = str(data["mount_error"]).rstrip(".")
        click.echo(f"tele: The volumes are not mounted: {why}.", err=True)
    elif data.get("local_mount") and not mounted_here(data["local_mount"]):
        click.echo(
            f"tele: The volumes are mounted at {data['local_mount']} in the tele daemon's mount "
            "namespace, which this shell does not share, so the directory is empty here; run "
            "the handler where the daemon was started.",
            err=True,
        )
    for note in data.get("withheld") or []:  # what the user may not read (RBAC)
        click.echo(f"tele: {note}", err=True)
    if not command:  # with `-- COMMAND`, the command is the handler and starts next
        protocols = [str(p.get("protocol") or "TCP") for p in data.get("ports") or []]
        for where in _not_listening(data.get("local") or [], protocols):
            if where.endswith("/UDP"):
                click.echo(
                    f"tele: nothing listens on {where} yet: until something does, the "
                    "engaged UDP datagrams are dropped",
                    err=True,
                )
                continue
            click.echo(
                f"tele: nothing listens on {where} yet: until something does, engaged HTTP "
                "requests get a 502 and other connections are reset",
                err=True,
            )
    emit(data, output, text)
    if docker is not None:
        interrupted = False
        try:
            with _saying_pod_changes(info.name):
                status = docker_cmd.run_handler(docker, data, info.name)
        except KeyboardInterrupt:
            interrupted, status = True, 130
        finally:
            with contextlib.suppress(UserError):  # ended already (`tele leave` elsewhere)
                _leave(info.name)
        if interrupted:
            click.echo(f"Interrupted; left {info.name}.", err=True)
        raise SystemExit(exit_status(status))
    if command:
        env, held = podenv.command_environment(
            os.environ, data.get("environment") or {}, unsafe=unsafe_env
        )
        if unsafe_env and held:
            click.echo(
                f"tele: warning: the pod's environment sets {', '.join(held)} for {command[0]} "
                f"({podenv.UNSAFE_FLAG})",
                err=True,
            )
        elif noted := [name for name in held if name not in podenv.QUIET]:
            click.echo(
                f"tele: kept your own {', '.join(noted)} (the pod sets them too; "
                f"{podenv.UNSAFE_FLAG} uses the pod's)",
                err=True,
            )
        interrupted = False
        try:
            with _saying_pod_changes(info.name):
                status = subprocess.run(list(command), env=env, check=False).returncode
        except OSError as exc:
            status = 127
            click.echo(f"tele: Cannot run {command[0]}: {exc.strerror or exc}.", err=True)
        except KeyboardInterrupt:
            interrupted, status = True, 130
        finally:
            _leave(info.name)
        if interrupted:
            click.echo(f"Interrupted; left {info.name}.", err=True)
        raise SystemExit(exit_status(status))


POD_WATCH_SECONDS = 2.0
"""While a `-- COMMAND` runs, how often the daemon is asked which pod serves its engagement."""


@contextlib.contextmanager
def _saying_pod_changes(name: str) -> Iterator[None]:
    """While the handler runs, one line on stderr each time another pod takes over serving
    engagement `name` (its pod was replaced; --to-pod forwards and volumes follow it)."""
    stop = threading.Event()
    watcher = threading.Thread(
        target=_follow_pod, args=(name, stop), name="tele-pod-watch", daemon=True
    )
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=POD_WATCH_SECONDS)  # its last look (a change just before the end)


def _follow_pod(name: str, stop: threading.Event) -> None:
    import trio

    from tele.cli import client
    from tele.rpc import daemon_api

    async def follow() -> None:
        said = 0  # how many changes were said: two between looks are both said
        async with client.daemon_client(start=False) as rpc:
            while rpc is not None:
                last = stop.is_set()  # the command ended: one more look, then no more
                status = await rpc.call(daemon_api.STATUS, daemon_api.Empty(), timeout=2)
                engagements = status.session.engagements if status.session else []
                for e in engagements:
                    # Said once the daemon has moved everything (forwards, volumes) there.
                    if e.name == name and e.pod_change_count > said:
                        for sentence in e.pod_changes[-(e.pod_change_count - said) :]:
                            click.echo(f"tele: {sentence}", err=True)
                        said = e.pod_change_count
                if last:
                    return
                await trio.to_thread.run_sync(stop.wait, POD_WATCH_SECONDS)

    try:
        trio.run(follow)
    except Exception as exc:  # the daemon went away: the command goes on, unwatched
        log.debug("watching the serving pod of %s ended: %s", name, exc)


def exit_status(returncode: int) -> int:
    """A command's status as a shell gives it: killed by signal N -> 128+N (143 for SIGTERM)."""
    return 128 - returncode if returncode < 0 else returncode


def mounted_here(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether `path` is a mount point in this process's mount namespace (the daemon mounts
    the volumes in its own: a shell in another one sees an empty directory). True when it
    cannot tell."""
    import re

    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as lines:
            points = {
                # Field 5 is the mount point, with space, tab, newline and backslash as \ooo.
                re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split(" ")[4])
                for line in lines
                if line.count(" ") >= 5
            }
    except OSError:
        return True
    return os.path.realpath(path) in points


def _not_listening(local: list[str], protocols: list[str] | None = None) -> list[str]:
    """The local handler addresses (host:port) that refuse a connection right now; a UDP one
    (`protocols`, in the order of `local`) as host:port/UDP when no socket is bound to it."""
    import socket

    refused = []
    for index, where in enumerate(local):
        host, _, port = where.rpartition(":")
        if protocols and index < len(protocols) and protocols[index].upper() == "UDP":
            if port.isdigit() and _udp_unbound(int(port)):
                refused.append(f"{where}/UDP")
            continue
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
                pass
        except ConnectionRefusedError:
            refused.append(where)
        except (OSError, ValueError):
            pass  # unknown: say nothing rather than something wrong
    return refused


def _udp_unbound(port: int) -> bool:
    """Whether no UDP socket of this machine is bound to `port` (Linux's /proc/net tables;
    elsewhere: unknown, so False). A probe datagram would reach a handler that exists."""
    bound = False
    known = False
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        known = True
        for row in rows:
            fields = row.split()
            if len(fields) > 1 and fields[1].rpartition(":")[2] == f"{port:04X}":
                bound = True
    return known and not bound


def _pod(d: dict[str, Any]) -> str:
    """The pod the engagement's --to-pod forwards and volumes use: `name (IP)`."""
    ips = d.get("pod_ips") or []
    name = d.get("pod_name") or ""
    if name and ips:
        return f"{name} ({ips[0]})"
    return name or ", ".join(ips) or "?"


def _intercept_text(d: dict[str, Any]) -> str:
    from tele.rpc import filters

    how = filters.describe(
        d["mechanism"],
        [tuple(h) for h in d.get("headers") or []],
        d.get("path_equal") or [],
        d.get("path_prefix") or [],
        d.get("path_regex") or [],
    )
    protocols = {str(p.get("protocol") or "TCP").upper() for p in d.get("ports") or []}
    if d["mechanism"] == "tcp" and protocols == {"UDP"}:
        what = "all UDP datagrams"
    elif d["mechanism"] == "tcp" and "UDP" in protocols:
        what = "all TCP connections and UDP datagrams"
    elif d["mechanism"] == "tcp":
        what = "all TCP connections"
    elif how.startswith("http: "):
        what = f"HTTP requests with {how.removeprefix('http: ')}"
    else:
        what = "all HTTP requests"
    lines = _traffic_lines(d, "Intercept name", "Destination")
    if len(d.get("ports") or []) == 1:
        lines.append(_row("Service Port Identifier", f"{d['service']}:{d['service_port']}"))
    lines += _pod_and_mount_lines(d)
    lines.append(_row("Intercepting", what))
    return "\n".join(lines)


def _row(label: str, value: object) -> str:
    """A line of intercept's and wiretap's text, aligned as Telepresence aligns them."""
    return f"   {label:<23}: {value}"


def _traffic_lines(d: dict[str, Any], name_label: str, port_label: str) -> list[str]:
    """What intercept's and wiretap's text start with: the engagement, its state and the
    workload's kind, then a line per port: where its traffic goes on this machine, from which
    service port."""
    local = d.get("local") or []
    lines = [
        f"Using {d['workload_kind']} {d['workload']}",
        _row(name_label, d["name"]),
        _row("State", "ACTIVE"),
        _row("Workload kind", d["workload_kind"]),
    ]
    for index, port in enumerate(d.get("ports") or []):
        where = local[index] if index < len(local) else "?"
        service = f"{port['service']}:{port['service_port_name'] or port['service_port']}"
        lines.append(_row(port_label, f"{where} (service port {service})"))
    return lines


def _pod_and_mount_lines(d: dict[str, Any]) -> list[str]:
    """The serving pod and where its volumes are mounted, when there are."""
    lines = []
    if d.get("pod_name"):
        lines.append(_row("Pod", _pod(d)))
    if d.get("local_mount"):
        lines.append(_row("Volume Mount Point", d["local_mount"]))
    return lines


def _replace_text(d: dict[str, Any]) -> str:
    local = d.get("local") or []
    lines = [
        f"Using {d['workload_kind']} {d['workload']}",
        f"   Name          : {d['name']}",
        "   State         : ACTIVE",
        f"   Container     : {d['container']} (replaced: it does not run in the cluster)",
    ]
    for index, port in enumerate(d.get("ports") or []):
        where = local[index] if index < len(local) else "?"
        lines.append(f"   Port          : {port['container_port']}/{port['protocol']} -> {where}")
    if not d.get("ports"):
        lines.append("   Ports         : none (the container declares no TCP or UDP port)")
    if d.get("pod_name"):
        lines.append(f"   Pod           : {_pod(d)}")
    if d.get("local_mount"):
        lines.append(f"   Volume Mount  : {d['local_mount']}")
    return "\n".join(lines)


def _ingest_text(d: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"Using {d['workload_kind']} {d['workload']}",
            f"   Ingest name   : {d['name']}",
            "   State         : ACTIVE",
            f"   Container     : {d['container']}",
            f"   Pod           : {_pod(d)}",
            f"   Environment   : {len(d.get('environment') or {})} variables",
            *([f"   Volume Mount  : {d['local_mount']}"] if d.get("local_mount") else []),
        ]
    )


command_argument = click.argument("command", nargs=-1, type=click.UNPROCESSED)
"""`-- COMMAND`: run it while engaged, then leave."""
namespace_option = click.option(
    "--namespace", "-n", default="", help="Its namespace (default: the connected one)."
)
address_option = click.option(
    "--address", default="127.0.0.1", show_default=True, help="The local handler's address."
)
env_file_option = click.option(
    "--env-file",
    "-e",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the pod's environment here, in --env-syntax.",
)
env_syntax_option = click.option(
    "--env-syntax",
    type=click.Choice(podenv.SYNTAXES),
    default="docker",
    show_default=True,
    help="The syntax of --env-file: docker (docker run --env-file), compose (an .env file), "
    "sh or csh (to source; :export exports), cmd (a batch file), ps (PowerShell), json.",
)
env_json_option = click.option(
    "--env-json",
    "-j",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the pod's environment here as JSON.",
)
unsafe_env_option = click.option(
    podenv.UNSAFE_FLAG,
    "unsafe_env",
    is_flag=True,
    help="Let the pod's environment set loader, interpreter and shell variables (LD_*, PATH, "
    "PYTHON*, PERL5*, NODE_OPTIONS, BROWSER, ...) for -- COMMAND and in the env files too; "
    "without it they stay yours (commented out in --env-file, left out of --env-json).",
)

_Command = TypeVar("_Command", bound=Callable[..., Any])


def env_options(command: _Command) -> _Command:
    """--env-file, --env-syntax, --env-json and the unsafe-variables flag: where and how the
    pod's environment is written, for every command that engages."""
    for option in (unsafe_env_option, env_json_option, env_syntax_option, env_file_option):
        command = option(command)
    return command


mount_option = click.option(
    "--mount",
    default="true",
    show_default=True,
    help="Mount the pod's volumes: true (a temporary directory), false, or DIR; "
    "append :ro for read-only. TELEPRESENCE_ROOT tells the handler where.",
)
to_pod_option = click.option(
    "--to-pod",
    multiple=True,
    help="PORT[/UDP]: localhost:PORT reaches the engaged pod's PORT while engaged; repeatable.",
)


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("name")
@command_argument
@click.option("--workload", "-w", default="", help="The workload (default: NAME).")
@namespace_option
@click.option(
    "--port",
    "-p",
    multiple=True,
    help="LOCAL[:SERVICE_PORT] (name or number); repeat for several ports. Default: the "
    "config's intercept.defaultPort (8080).",
)
@address_option
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
    "--http-plaintext",
    is_flag=True,
    help="Send requests the agent decrypted (the workload has a terminating TLS secret) to the "
    "local handler in plaintext instead of TLS.",
)
@env_options
@to_pod_option
@click.option(
    "--replace",
    is_flag=True,
    help="Deprecated: use `tele replace`. Replace the whole container.",
)
@mount_option
@docker_cmd.docker_options
@output_option
def intercept(
    name: str,
    command: tuple[str, ...],
    workload: str,
    namespace: str,
    port: tuple[str, ...],
    address: str,
    service: str,
    container: str,
    mechanism: str | None,
    http_header: tuple[str, ...],
    http_path_equal: tuple[str, ...],
    http_path_prefix: tuple[str, ...],
    http_path_regex: tuple[str, ...],
    http_plaintext: bool,
    env_file: Path | None,
    env_syntax: str,
    env_json: Path | None,
    unsafe_env: bool,
    to_pod: tuple[str, ...],
    replace: bool,
    mount: str,
    output: str,
) -> None:
    """Send NAME's traffic to a local handler; with `-- COMMAND`, run it, then leave.

    With --namespace and no --workload, NAME is the workload and the engagement is named
    NAME-NAMESPACE, as Telepresence names it (`tele leave` takes either)."""

    if namespace and not workload:
        workload, name = name, f"{name}-{namespace}"
    if not port:
        from tele import config

        port = (str(config.load().intercept.default_port),)
    mappings = _port_mappings(port, remote_defaults_to_local=False)
    headers = [_header(h) for h in http_header]
    filtered = bool(headers or http_path_equal or http_path_prefix or http_path_regex)
    if mechanism == "tcp" and filtered:
        raise UserError("--http-* filters need --mechanism http.")
    from tele.rpc import filters

    # Refused here (and again by the manager): an engagement that cannot match is no engagement.
    refused = filters.problem(headers, http_path_equal, http_path_prefix, http_path_regex)
    if refused:
        raise UserError(f"{refused}.")
    if replace:
        click.echo(
            "tele: --replace is deprecated and will be removed; use `tele replace` instead.",
            err=True,
        )
        if filtered or mechanism == "http":
            raise UserError("--replace takes the whole container; it cannot filter HTTP requests.")
    _engage(
        "replace" if replace else "intercept",
        _Target(workload, namespace, container, to_pod, mount),
        _Handling(env_file, env_syntax, env_json, unsafe_env, command, output),
        _replace_text if replace else _intercept_text,
        name=name,
        local_address=address,
        local_port=mappings[0].local,
        port=mappings[0].remote,
        ports=mappings if len(mappings) > 1 or replace else [],
        service=service,
        mechanism=mechanism or ("http" if filtered else "tcp"),
        headers=headers,
        path_equal=list(http_path_equal),
        path_prefix=list(http_path_prefix),
        path_regex=list(http_path_regex),
        http_plaintext=http_plaintext,
    )


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("workload")
@command_argument
@namespace_option
@click.option("--container", "-c", default="", help="The container (needed when several).")
@click.option(
    "--port",
    "-p",
    multiple=True,
    help="LOCAL[:CONTAINER_PORT] (name or number; default LOCAL); repeatable. "
    "Default: every TCP port of the container, each to the same local port.",
)
@address_option
@env_options
@to_pod_option
@mount_option
@docker_cmd.docker_options
@output_option
def replace(
    workload: str,
    command: tuple[str, ...],
    namespace: str,
    container: str,
    port: tuple[str, ...],
    address: str,
    env_file: Path | None,
    env_syntax: str,
    env_json: Path | None,
    unsafe_env: bool,
    to_pod: tuple[str, ...],
    mount: str,
    output: str,
) -> None:
    """Replace a container of WORKLOAD with this machine: the container stops running in the
    cluster, its ports (if any) come here; with `-- COMMAND`, run it, then leave."""

    _engage(
        "replace",
        _Target(workload, namespace, container, to_pod, mount),
        _Handling(env_file, env_syntax, env_json, unsafe_env, command, output),
        _replace_text,
        name="",
        local_address=address,
        ports=_port_mappings(port, remote_defaults_to_local=True),
    )


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("workload")
@command_argument
@namespace_option
@click.option("--container", "-c", default="", help="The container (needed when several).")
@env_options
@to_pod_option
@click.option(
    "--mount",
    default="true",
    show_default=True,
    help="Mount the pod's volumes (read-only): true (a temporary directory), false, or DIR. "
    "TELEPRESENCE_ROOT tells the handler where.",
)
@docker_cmd.docker_options
@output_option
def ingest(
    workload: str,
    command: tuple[str, ...],
    namespace: str,
    container: str,
    env_file: Path | None,
    env_syntax: str,
    env_json: Path | None,
    unsafe_env: bool,
    to_pod: tuple[str, ...],
    mount: str,
    output: str,
) -> None:
    """Get a container's environment (and volumes) without its traffic; several clients may
    ingest the same container. With `-- COMMAND`, run it, then leave."""

    _engage(
        "ingest",
        _Target(workload, namespace, container, to_pod, mount),
        _Handling(env_file, env_syntax, env_json, unsafe_env, command, output),
        _ingest_text,
        name="",
    )


def _leave(name: str, *, connect: bool = False) -> None:
    from tele.cli import client
    from tele.rpc import daemon_api

    request = daemon_api.LeaveRequest(name=name)
    client.call_connected(daemon_api.LEAVE, request, timeout=30, connect=connect)


@click.command()
@click.argument("name")
@output_option
def leave(name: str, output: str) -> None:
    """End the engagement NAME (intercept, replace or ingest); the cluster's workload gets its
    traffic (and a replaced container) back."""
    _leave(name, connect=True)  # (connects first when not connected, as Telepresence's does)
    emit({"left": name}, output, lambda d: f"Left {d['left']}.")


@click.command()
@click.argument("workloads", nargs=-1)
@click.option("--agent", "-d", "agents", multiple=True, help="A workload to remove the agent from.")
@click.option("--all-agents", "-a", is_flag=True, help="Every agent in the namespace.")
@click.option("--namespace", "-n", default="", help="The namespace (default: the connected one).")
@output_option
def uninstall(
    workloads: tuple[str, ...],
    agents: tuple[str, ...],
    all_agents: bool,
    namespace: str,
    output: str,
) -> None:
    """Remove the traffic agent from WORKLOADS (or --all-agents); their pods are rolled out
    without it."""
    from tele.cli import client
    from tele.rpc import daemon_api

    agents = tuple(dict.fromkeys((*workloads, *agents)))
    if bool(agents) == all_agents:
        raise UserError("Name workloads (tele uninstall NAME...), or use --all-agents; not both.")

    request = daemon_api.UninstallRequest(
        namespace=namespace, workloads=list(agents), all_agents=all_agents
    )
    reply = client.call_connected(daemon_api.UNINSTALL, request, timeout=60)

    def text(d: dict[str, Any]) -> str:
        if d["removed"]:
            return f"Removed the traffic agent from {', '.join(d['removed'])}."
        return "No traffic agent to remove."

    emit({"removed": list(reply.removed)}, output, text)
