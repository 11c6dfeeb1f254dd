"""`tele gather-logs`: this machine's logs (daemon, CLI, helper, rotated ones) and, through the
connected traffic manager, the cluster's (the manager's log with its `audit {json}` lines, the
traffic agents'), zipped for a bug report; `--anonymize` replaces names and addresses."""

from __future__ import annotations

import getpass
import os
import socket
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from tele.cli.output import GLOBAL_OUTPUT, OUTPUT_CHOICES, emit
from tele.errors import UserError


@dataclass
class _Gathered:
    files: dict[str, str | Path] = field(default_factory=dict)
    """zip name -> a local file, or a cluster log's text."""
    problems: list[str] = field(default_factory=list)
    names: list[tuple[str, str]] = field(default_factory=list)
    """(kind, name) of what --anonymize replaces."""


def _local(gathered: _Gathered, target: Path) -> None:
    from tele import paths

    logs_dir = paths.logs_dir()
    files = sorted(p for p in logs_dir.glob("*") if p.is_file()) if logs_dir.is_dir() else []
    for path in files:
        if path.resolve() != target:
            gathered.files[f"tele_logs/{path.name}"] = path


def _cluster(gathered: _Gathered, *, traffic_manager: bool, traffic_agents: str) -> bool:
    """The cluster's logs through the daemon's session; False when there is no session."""
    from tele.cli import client
    from tele.rpc import daemon_api
    from tele.rpc.errors import RpcError

    async def gather() -> bool:
        async with client.daemon_client(start=False) as rpc:
            if rpc is None:
                return False
            status = await rpc.call(daemon_api.STATUS, daemon_api.Empty(), timeout=10)
            session = status.session
            if status.connection == "not connected" or session is None:
                return False
            gathered.names += [
                ("context", session.kube_context),
                ("namespace", session.namespace),
                ("namespace", session.manager_namespace),
                ("server", _host_of(session.kube_server)),
                *(("namespace", ns) for ns in session.managed_namespaces),
            ]
            request = daemon_api.ClusterLogsRequest(
                traffic_manager=traffic_manager, traffic_agents=traffic_agents
            )
            found = await rpc.call(daemon_api.CLUSTER_LOG_SOURCES, request, timeout=60)
            gathered.problems += found.problems
            for source in found.sources:
                gathered.names += [
                    ("namespace", source.namespace),
                    ("pod", source.pod),
                    ("workload", source.workload),
                ]
                if source.kind == "traffic-manager":
                    name = f"tele_logs/cluster/traffic-manager/{source.pod}.log"
                else:
                    name = f"tele_logs/cluster/traffic-agents/{source.namespace}/{source.pod}.log"
                try:
                    log = await rpc.call(daemon_api.CLUSTER_LOG, source, timeout=120)
                except RpcError as exc:
                    gathered.problems.append(
                        f"No log of {source.namespace}/{source.pod}: {exc.message}."
                    )
                    continue
                if log.truncated:
                    gathered.problems.append(
                        f"Only the end of {source.namespace}/{source.pod}'s log (it is long)."
                    )
                gathered.files[name] = log.text
            return True

    return client.run(gather)


def _host_of(server: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(server).hostname or ""


def _write_zip(target: Path, gathered: _Gathered, anonymize: Callable[[str], str]) -> list[str]:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    written = []
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, content in sorted(gathered.files.items()):
                if isinstance(content, Path):
                    try:
                        text = content.read_text(encoding="utf-8", errors="replace")
                    except FileNotFoundError:
                        continue  # rotated away meanwhile
                else:
                    text = content
                archive.writestr(anonymize(name), anonymize(text))
                written.append(anonymize(name))
            if gathered.problems:
                text = "".join(f"{anonymize(p)}\n" for p in gathered.problems)
                archive.writestr("tele_logs/problems.txt", text)
                written.append("tele_logs/problems.txt")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"Cannot write {target}: {exc.strerror or exc}.") from exc
    return written


@click.command(name="gather-logs")
@click.option(
    "--output-file",
    "output_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The zip file to write (default: tele_logs.zip).",
)
@click.option(
    "--output",
    "-o",
    "output",
    default=None,
    help="json or yaml: print the result for programs. Any other value is the zip file "
    "(as --output-file; tele's earlier habit).",
)
@click.option(
    "--traffic-manager/--no-traffic-manager",
    default=None,
    help="The traffic manager's log (with its audit lines); default: yes when connected.",
)
@click.option(
    "--traffic-agents",
    default=None,
    is_flag=False,
    flag_value="all",
    help="The traffic agents' logs: all, none, or those whose pod or workload name contains "
    "a NAME; default: all when connected.",
)
@click.option(
    "--anonymize",
    is_flag=True,
    help="Replace namespace, pod, workload, context, user and host names and IP addresses "
    "with stand-ins (the same original always gets the same one).",
)
@click.pass_context
def gather_logs(
    ctx: click.Context,
    output_file: Path | None,
    output: str | None,
    traffic_manager: bool | None,
    traffic_agents: str | None,
    anonymize: bool,
) -> None:
    """Zip tele's logs for a bug report: this machine's (daemon, CLI, rotated ones) and, when
    connected, the traffic manager's and the traffic agents' (read through the manager)."""
    from tele.cli.anonymize import Anonymizer

    if output is not None and output not in OUTPUT_CHOICES:
        if output_file is not None:
            raise click.UsageError("Give the zip file once: -o FILE or --output-file FILE.")
        output_file, output = Path(output), None
    output = output or str(ctx.meta.get(GLOBAL_OUTPUT, "default"))
    target = (output_file or Path("tele_logs.zip")).resolve()
    if target.suffix != ".zip":
        target = target.with_name(target.name + ".zip")
    asked_for_cluster = traffic_manager is not None or traffic_agents is not None
    want_manager = traffic_manager is not False
    agents = traffic_agents if traffic_agents is not None else "all"

    gathered = _Gathered()
    _local(gathered, target)
    connected = False
    if want_manager or agents != "none":
        connected = _cluster(gathered, traffic_manager=want_manager, traffic_agents=agents)
        if not connected:
            if asked_for_cluster:
                raise UserError(
                    "Not connected; run `tele connect` first (the cluster's logs come through "
                    "the traffic manager)."
                )
            gathered.problems.append(
                "Not connected: only this machine's logs (connect first for the traffic "
                "manager's and the agents')."
            )
    if not gathered.files:
        from tele import paths

        raise UserError(f"There are no log files in {paths.logs_dir()} yet.")
    if anonymize:
        gathered.names += [("user", getpass.getuser()), ("host", socket.gethostname())]
    replace: Callable[[str], str] = Anonymizer(gathered.names) if anonymize else str

    written = _write_zip(target, gathered, replace)
    problems = [replace(p) for p in gathered.problems]
    for problem in problems:
        click.echo(f"tele: {problem}", err=True)
    result = {
        "file": str(target),
        "files": written,
        "connected": connected,
        "anonymized": anonymize,
        "problems": problems,
    }
    emit(result, output, lambda d: d["file"])
