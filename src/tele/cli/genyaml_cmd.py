"""`tele genyaml`: the YAML to inject the traffic agent into a workload by hand (for clusters
where the webhook may not mutate pods): its configuration, the agent container, the init
container and the volumes, from the workload's own YAML (and its Services').

    tele genyaml config -i app.yaml -o config.yaml     # app.yaml: the workload and its Services
    tele genyaml container -c config.yaml -i app.yaml   # into spec.template.spec.containers
    tele genyaml initcontainer -c config.yaml           # into spec.template.spec.initContainers
    tele genyaml volume -c config.yaml                  # into spec.template.spec.volumes

and the pod template's annotation `telepresence.io/manually-injected: "true"`, so that the
webhook leaves its pods alone and the traffic manager never rolls them. Every port is reached
through the init container's redirect (it needs NET_ADMIN): the app's ports keep their names.
Offline: nothing here talks to the cluster. The traffic manager engages such an agent by the
configuration its pod template carries (its agent ports need not be the Helm agent.port), and
`tele helm uninstall` leaves it in place.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from tele.errors import UserError

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "ReplicaSet", "Rollout")
DEFAULT_MANAGER_PORT = 8081
"""Helm apiPort's default (as Telepresence's)."""
DEFAULT_MANAGER_NAMESPACE = "ambassador"
MAX_INPUT = 4 * 1024 * 1024


def _read_yaml(path: str, what: str) -> list[dict[str, Any]]:
    """The objects of a YAML file ("-": stdin), Lists and multi-document files flattened."""
    import yaml

    try:
        text = sys.stdin.read(MAX_INPUT + 1) if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UserError(f"Cannot read the {what} {path}: {exc.strerror or exc}.") from None
    if len(text) > MAX_INPUT:
        raise UserError(f"The {what} {path} is larger than {MAX_INPUT // 1024 // 1024} MiB.")
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "not YAML"
        raise UserError(f"The {what} {path} is not valid YAML ({first}).") from None
    objects: list[dict[str, Any]] = []
    for document in documents:
        if isinstance(document, dict) and document.get("kind") == "List":
            objects += [o for o in document.get("items") or [] if isinstance(o, dict)]
        elif isinstance(document, dict):
            objects.append(document)
    return objects


def _workload(objects: list[dict[str, Any]], name: str, path: str) -> dict[str, Any]:
    found = [
        o
        for o in objects
        if o.get("kind") in WORKLOAD_KINDS
        and (not name or (o.get("metadata") or {}).get("name") == name)
    ]
    if not found:
        which = f"named {name} " if name else ""
        raise UserError(
            f"{path} has no workload {which}(a {', '.join(WORKLOAD_KINDS)}); "
            "give its YAML with -i (kubectl get deploy/NAME svc/SERVICE -o yaml)."
        )
    if len(found) > 1:
        names = ", ".join(str((o.get("metadata") or {}).get("name")) for o in found)
        raise UserError(f"{path} has several workloads ({names}); choose one with --workload.")
    return found[0]


def _config(path: str) -> Any:
    import msgspec

    from tele.contracts.agentconfig import AgentConfig

    objects = _read_yaml(path, "configuration")
    if len(objects) != 1:
        raise UserError(f"{path} is not one agent configuration (from `tele genyaml config`).")
    try:
        return msgspec.convert(objects[0], AgentConfig)
    except msgspec.ValidationError as exc:
        raise UserError(
            f"{path} is not an agent configuration from `tele genyaml config` ({exc})."
        ) from None


def _write(data: Any, output: str) -> None:
    import yaml

    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    if output == "-":
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text)
    except OSError as exc:
        raise UserError(f"Cannot write {output}: {exc.strerror or exc}.") from None


output_file_option = click.option(
    "--output", "-o", default="-", show_default=True, help="Where to write the YAML (-: stdout)."
)
config_option = click.option(
    "--config",
    "-c",
    "config_path",
    required=True,
    help="The configuration `tele genyaml config` wrote.",
)


@click.group()
def genyaml() -> None:
    """Write the YAML that injects the traffic agent into a workload by hand."""


@genyaml.command("config")
@click.option("--input", "-i", "input_path", required=True, help="The workload's YAML (-: stdin).")
@click.option("--workload", "-w", default="", help="The workload, when the file has several.")
@click.option(
    "--agent-port",
    type=click.IntRange(1, 65535),
    default=9900,
    show_default=True,
    help="The agent's first port (one more per engaged port). Any free port works: the "
    "traffic manager engages a hand-injected agent by the configuration in its pod template.",
)
@click.option(
    "--agent-image",
    default="",
    help="The agent's image (default: the traffic manager's image of this tele version).",
)
@click.option(
    "--manager-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="The traffic manager's API port (Helm apiPort), where the agent reaches it. Default: "
    f"the connected traffic manager's; {DEFAULT_MANAGER_PORT} when not connected.",
)
@click.option(
    "--manager-namespace",
    default=None,
    help="The traffic manager's namespace. Default: the connected traffic manager's; "
    f"{DEFAULT_MANAGER_NAMESPACE} when not connected.",
)
@click.option(
    "--loglevel",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@output_file_option
def config(
    input_path: str,
    workload: str,
    agent_port: int,
    agent_image: str,
    manager_port: int | None,
    manager_namespace: str | None,
    loglevel: str,
    output: str,
) -> None:
    """The agent configuration of a workload (the Services in the file lead to its ports)."""
    import msgspec

    from tele.contracts import agentconfig

    manager_namespace, manager_port, unchecked = _manager(manager_namespace, manager_port)
    objects = _read_yaml(input_path, "input")
    found = _workload(objects, workload, input_path)
    namespace = (found.get("metadata") or {}).get("namespace") or "default"
    services = [
        o
        for o in objects
        if o.get("kind") == "Service"
        and ((o.get("metadata") or {}).get("namespace") or namespace) == namespace
    ]
    try:
        generated = agentconfig.generate(
            workload={**found, "metadata": {**found.get("metadata", {}), "namespace": namespace}},
            services=services,
            manager_namespace=manager_namespace,
            agent_image=agent_image or _default_image(),
            manager_port=manager_port,
            agent_port=agent_port,
            log_level=loglevel,
        )
    except agentconfig.NotInterceptable as exc:
        name = (found.get("metadata") or {}).get("name")
        raise UserError(f"{name} cannot get a traffic agent: {str(exc).rstrip('.')}.") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{input_path} has a malformed workload or Service ({exc}).") from None
    _write(msgspec.to_builtins(agentconfig.for_manual_injection(generated)), output)
    if unchecked:
        click.echo(f"tele: {unchecked}", err=True)


def _manager(namespace: str | None, port: int | None) -> tuple[str, int, str]:
    """Where the agent is to reach the traffic manager (its namespace and API port): the
    connected manager's (a different --manager-namespace or --manager-port is refused: its
    agent would never arrive), else the ones given or the defaults, with a sentence saying
    that the port was not checked."""
    from tele.cli import quick
    from tele.errors import TeleError
    from tele.rpc import daemon_api

    try:
        status = quick.ask_daemon(daemon_api.STATUS, daemon_api.Empty(), timeout=5)
    except TeleError:
        status = None
    connected = status is not None and status.connection in ("connected", "reconnecting")
    session = status.session if status is not None and connected else None
    installed = session.manager_api_port if session is not None else 0
    if session is not None and installed:
        ours = session.manager_namespace
        if namespace is not None and namespace != ours:
            raise UserError(
                f"The connected traffic manager is in namespace {ours}, not {namespace}: leave "
                f"out --manager-namespace or give {ours}."
            )
        if port is not None and port != installed:
            raise UserError(
                f"The traffic manager in namespace {ours} listens on port {installed} (its "
                f"Helm apiPort), not {port}: leave out --manager-port or give {installed}."
            )
        return ours, installed, ""
    port = DEFAULT_MANAGER_PORT if port is None else port
    return (
        namespace or DEFAULT_MANAGER_NAMESPACE,
        port,
        f"--manager-port {port} was not checked (not connected to a cluster): it must be the "
        "traffic manager's Helm apiPort.",
    )


def _default_image() -> str:
    import tele

    return f"tele/traffic-manager:{tele.__version__}"


@genyaml.command("container")
@config_option
@click.option(
    "--input", "-i", "input_path", required=True, help="The workload's YAML (its containers' env)."
)
@click.option("--workload", "-w", default="", help="The workload, when the file has several.")
@output_file_option
def container(config_path: str, input_path: str, workload: str, output: str) -> None:
    """The traffic-agent container (it carries the configuration in its env)."""
    from tele.contracts import agentconfig

    settings = _config(config_path)
    found = _workload(_read_yaml(input_path, "input"), workload, input_path)
    app = ((found.get("spec") or {}).get("template") or {}).get("spec") or {}
    ports = [
        {"containerPort": i.agent_port, "protocol": i.protocol}
        for _, i in settings.intercepts()
        if i.agent_port != i.container_port
    ]
    agent = agentconfig.agent_container(settings, list(app.get("containers") or []), ports)
    agent["env"] = [
        agentconfig.literal_config_env(settings) if e.get("name") == "_TEL_AGENT_CONFIG" else e
        for e in agent["env"]
    ]
    _write(agent, output)


@genyaml.command("initcontainer")
@config_option
@output_file_option
def initcontainer(config_path: str, output: str) -> None:
    """The init container that redirects the ports to the agent (NET_ADMIN)."""
    from tele.contracts import agentconfig

    settings = _config(config_path)
    _write(
        agentconfig.init_container(settings, config_env=agentconfig.literal_config_env(settings)),
        output,
    )


@genyaml.command("volume")
@config_option
@output_file_option
def volume(config_path: str, output: str) -> None:
    """The volumes the agent container mounts (its token for the traffic manager)."""
    from tele.contracts import agentconfig

    _write(agentconfig.agent_volumes(_config(config_path)), output)
