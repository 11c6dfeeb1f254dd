"""`tele wiretap`: a read-only copy of a workload's traffic sent to a local handler, while the
app in the cluster keeps serving every request (as Telepresence 2.23's wiretap and mirrord's
mirror mode). Several wiretaps may copy the same port; a slow or absent handler never slows
the app: its copies are dropped and counted (`tele status`).

What callers send goes to the `-p` port, as those two do (the handler can be the service
itself, run locally); with `--response-port`, what the app answers goes to a second local
port, one connection per caller's connection, so both directions are copied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tele.cli.intercept_cmd import (
    _engage,
    _Handling,
    _pod_and_mount_lines,
    _port_mappings,
    _row,
    _Target,
    _traffic_lines,
    address_option,
    command_argument,
    env_options,
    namespace_option,
)
from tele.cli.output import output_option
from tele.errors import UserError


def _wiretap_text(d: dict[str, Any]) -> str:
    lines = _traffic_lines(d, "Wiretap name", "Copy to")
    if d.get("response_local"):
        lines.append(_row("Responses to", f"{d['response_local']} (what the app answers)"))
    lines += _pod_and_mount_lines(d)
    lines.append(
        _row(
            "Wiretapping",
            "a copy of every connection (the app still serves them; the handler's answers "
            "are discarded)",
        )
    )
    return "\n".join(lines)


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("name")
@command_argument
@click.option("--workload", "-w", default="", help="The workload (default: NAME).")
@namespace_option
@click.option(
    "--port",
    "-p",
    multiple=True,
    default=("8080",),
    show_default=True,
    help="LOCAL[:SERVICE_PORT] (name or number): where the copy goes; repeat for several ports.",
)
@click.option(
    "--response-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="LOCAL: also copy what the app answers, to this local port (one connection per "
    "caller's connection, opened alongside its request copy); default: requests only.",
)
@address_option
@click.option("--service", default="", help="The Service, when several select the workload.")
@click.option("--container", default="", help="The container, when several have the port.")
@env_options
@click.option(
    "--mount",
    default="false",
    show_default=True,
    help="Mount the pod's volumes (read-only): true (a temporary directory), false, or DIR.",
)
@output_option
def wiretap(
    name: str,
    command: tuple[str, ...],
    workload: str,
    namespace: str,
    port: tuple[str, ...],
    response_port: int | None,
    address: str,
    service: str,
    container: str,
    env_file: Path | None,
    env_syntax: str,
    env_json: Path | None,
    unsafe_env: bool,
    mount: str,
    output: str,
) -> None:
    """Send a copy of NAME's traffic (what its callers send) to a local handler, while the
    workload keeps serving it; with `-- COMMAND`, run it, then leave.

    With --response-port, what the app answers is copied too: each caller's connection gives
    one connection to the -p port (the bytes the caller sent) and one to the response port
    (the bytes the app answered), raw as they passed (HTTP or any TCP). A copy never waits:
    a slow or absent handler loses copies (counted in `tele status`), never the app's speed.

    With --namespace and no --workload, NAME is the workload and the wiretap is named
    NAME-NAMESPACE (`tele leave` takes either)."""
    if namespace and not workload:
        workload, name = name, f"{name}-{namespace}"
    mappings = _port_mappings(port, remote_defaults_to_local=False)
    if response_port is not None and response_port in {m.local for m in mappings}:
        raise UserError(
            f"--response-port {response_port} is also a --port: the copies of the two "
            "directions need local ports of their own."
        )
    _engage(
        "wiretap",
        _Target(workload, namespace, container, (), mount),
        _Handling(env_file, env_syntax, env_json, unsafe_env, command, output),
        _wiretap_text,
        name=name,
        local_address=address,
        local_port=mappings[0].local,
        port=mappings[0].remote,
        ports=mappings if len(mappings) > 1 else [],
        service=service,
        response_port=response_port or 0,
    )
