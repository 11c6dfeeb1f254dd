"""`tele helm install|upgrade|uninstall|lint`: the traffic manager's chart, shipped inside tele.

The chart is rendered by the real Helm (helm-python-sdk) and applied with tele's Kubernetes
client (tele.helm.ops); nothing here talks to the daemon. Progress goes to stderr when it is a
terminal; results are one line on stdout; failures one line on stderr with the exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tele.cli.output import emit, output_option

if TYPE_CHECKING:
    from tele.helm.chart import Chart
    from tele.helm.ops import Outcome, Progress
    from tele.helm.values import ValueSources
    from tele.k8s.client import KubeClient

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_NAMESPACE = "ambassador"
DEFAULT_RELEASE = "traffic-manager"


def _value_options(func: F) -> F:
    options = [
        click.option(
            "-f",
            "--values",
            "value_files",
            multiple=True,
            metavar="FILE",
            help="A YAML file of values (repeatable; '-' reads stdin).",
        ),
        click.option(
            "--set", "set_", multiple=True, metavar="K=V", help="Set values like helm --set."
        ),
        click.option(
            "--set-string", multiple=True, metavar="K=V", help="Set values, always as strings."
        ),
        click.option("--set-json", multiple=True, metavar="K=JSON", help="Set values from JSON."),
        click.option(
            "--set-file", multiple=True, metavar="K=PATH", help="Set values from file contents."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _target_options(func: F) -> F:
    options = [
        click.option(
            "-n",
            "--namespace",
            "--manager-namespace",
            "namespace",
            default=DEFAULT_NAMESPACE,
            show_default=True,
            help="The namespace of the traffic manager (the release namespace).",
        ),
        click.option(
            "--release-name",
            default=DEFAULT_RELEASE,
            show_default=True,
            help="The name of the release.",
        ),
        click.option("--kubeconfig", metavar="PATH", help="Path to the kubeconfig file to use."),
        click.option("--context", metavar="NAME", help="The kubeconfig context to use."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _sources(kwargs: dict[str, Any]) -> ValueSources:
    from tele.helm.values import ValueSources

    return ValueSources(
        files=kwargs.pop("value_files"),
        set=kwargs.pop("set_"),
        set_string=kwargs.pop("set_string"),
        set_json=kwargs.pop("set_json"),
        set_file=kwargs.pop("set_file"),
    )


def _check_release_name(name: str) -> None:
    from tele.helm.chart import _helm
    from tele.helm.errors import ValuesError

    helm = _helm()
    try:
        helm.validate_release_name(name)
    except helm.HelmError:
        raise ValuesError(
            f"Invalid release name {name!r}: use at most 53 lowercase letters, digits and '-'."
        ) from None


class _RichProgress:
    """A transient progress bar on stderr (only used when stderr is a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[last]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self._task: Any = None

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def begin(self, action: str, total: int) -> None:
        self._task = self._progress.add_task(action, total=total, last="")

    def advance(self, text: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=1, last=text)


def _run(operation: Callable[[Progress], Any]) -> Any:
    """Run an async operation under trio with progress shown when stderr is a terminal."""
    import trio

    from tele.helm.ops import QuietProgress

    if sys.stderr.isatty():
        with _RichProgress() as progress:
            return trio.run(operation, progress)
    return trio.run(operation, QuietProgress())


def _summary(verb: str, outcome: Outcome) -> str:
    record = outcome.record
    return (
        f"{verb} release {record.name} in namespace {record.namespace} "
        f"(revision {record.revision}): the traffic manager manages {outcome.scope}."
    )


def _ref(ref: Any) -> str:
    return "/".join(part for part in (ref.kind, ref.namespace, ref.name) if part)


def _outcome_data(outcome: Outcome) -> dict[str, Any]:
    """install/upgrade -o json|yaml."""
    record = outcome.record
    return {
        "release": record.name,
        "namespace": record.namespace,
        "revision": record.revision,
        "chart_version": record.chart_version,
        "scope": outcome.scope,
        "applied": [_ref(r) for r in outcome.applied],
        "pruned": [_ref(r) for r in outcome.pruned],
    }


@click.group()
def helm() -> None:
    """Install, upgrade, uninstall or lint the traffic manager (Helm chart inside tele)."""


def _apply_chart(
    kwargs: dict[str, Any],
    apply: Callable[
        [KubeClient, Chart, dict[str, Any], ValueSources, Progress], Awaitable[Outcome]
    ],
) -> Outcome:
    """What install and upgrade share: the release name and values checked, the chart
    rendered with them (bad values fail before any cluster access), then `apply` with a client
    for the chosen context, with progress on a terminal."""
    from tele.helm.chart import Chart
    from tele.k8s.client import open_kube_client

    sources = _sources(kwargs)
    _check_release_name(kwargs["release_name"])
    values = sources.build()

    async def operation(progress: Progress) -> Outcome:
        chart = await Chart.load()
        await chart.merged(values)
        async with open_kube_client(kwargs["kubeconfig"], kwargs["context"]) as kube:
            return await apply(kube, chart, values, sources, progress)

    outcome: Outcome = _run(operation)
    return outcome


_no_hooks_option = click.option(
    "--no-hooks",
    is_flag=True,
    help="Run no chart hooks (Telepresence's flag; tele's chart has none, so none run anyway).",
)


@helm.command(short_help="Install the traffic manager.")
@_target_options
@_value_options
@click.option(
    "--create-namespace/--no-create-namespace",
    default=True,
    show_default=True,
    help="Create the release namespace when it does not exist.",
)
@_no_hooks_option
@output_option
def install(**kwargs: Any) -> None:
    """Install the traffic manager, refusing namespaces another manager already manages."""
    from tele.helm import ops

    outcome = _apply_chart(
        kwargs,
        lambda kube, chart, values, sources, progress: ops.install(
            kube,
            chart,
            values,
            release=kwargs["release_name"],
            namespace=kwargs["namespace"],
            create_namespace=kwargs["create_namespace"],
            progress=progress,
        ),
    )
    emit(_outcome_data(outcome), kwargs["output"], lambda _: _summary("Installed", outcome))


@helm.command(short_help="Change the installed traffic manager's values or chart.")
@_target_options
@_value_options
@click.option("--reuse-values", is_flag=True, help="Merge the new values over the last ones.")
@click.option("--reset-values", is_flag=True, help="Start from the chart's default values.")
@_no_hooks_option
@output_option
def upgrade(**kwargs: Any) -> None:
    """Upgrade the traffic manager: apply the chart with new values and prune what it dropped."""
    from tele.helm import ops

    outcome = _apply_chart(
        kwargs,
        lambda kube, chart, values, sources, progress: ops.upgrade(
            kube,
            chart,
            values,
            release=kwargs["release_name"],
            namespace=kwargs["namespace"],
            reuse_values=kwargs["reuse_values"],
            reset_values=kwargs["reset_values"],
            values_given=not sources.empty,
            progress=progress,
        ),
    )
    pruned = f" Removed {len(outcome.pruned)} objects it no longer needs." if outcome.pruned else ""
    emit(_outcome_data(outcome), kwargs["output"], lambda _: _summary("Upgraded", outcome) + pruned)


@helm.command(short_help="Remove the traffic manager and everything it installed.")
@_target_options
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for the objects to be gone.",
)
@click.option(
    "--no-hooks",
    is_flag=True,
    help="Leave the traffic agents in the workloads' pods (Telepresence's chart removes them "
    "in a pre-delete hook).",
)
@output_option
def uninstall(**kwargs: Any) -> None:
    """Uninstall the traffic manager: end your engagements through it, delete what its release
    owns, then restart the workloads whose pods carry a traffic agent so that they run without
    it (as Telepresence's uninstall removes the agents), waiting until all is gone."""
    from tele.helm import ops
    from tele.helm import release as records
    from tele.helm.errors import ReleaseError
    from tele.k8s.client import ApiError, open_kube_client

    _check_release_name(kwargs["release_name"])
    release, namespace = kwargs["release_name"], kwargs["namespace"]

    async def operation(progress: Progress) -> tuple[Outcome, list[ops.AgentWorkload], list[str]]:
        async with open_kube_client(kwargs["kubeconfig"], kwargs["context"]) as kube:
            if await records.read(kube, release, namespace) is None:
                raise ReleaseError(f"Release {release} is not installed in namespace {namespace}.")
            try:
                agents = await ops.agent_workloads(kube)
            except ApiError as exc:
                if exc.code != 403:
                    raise
                click.echo(
                    "tele: you may not list pods in every namespace, so the traffic agents in "
                    "workloads' pods are left as they are (`tele uninstall --all-agents -n NS` "
                    "removes a namespace's before uninstalling)",
                    err=True,
                )
                agents = []
            left = await _leave_engagements_through(kube.connection.server, namespace)
            if left:
                click.echo(
                    "tele: uninstalling the traffic manager ends your engagements: "
                    + ", ".join(left),
                    err=True,
                )
            if kwargs["no_hooks"] and agents:
                click.echo(
                    "tele: the traffic agent stays in the pods of "
                    f"{', '.join(a.describe() for a in agents)} (--no-hooks); it cannot reach "
                    "a manager until one is installed again",
                    err=True,
                )
                agents = []
            doomed = [a.describe() for a in agents if not a.by_template and not a.by_hand]
            if doomed:
                click.echo(
                    "tele: uninstalling the traffic manager removes the traffic agent from "
                    f"{', '.join(doomed)} (their pods restart; engagements on them end)",
                    err=True,
                )
            for kept in (a for a in agents if a.by_template):
                click.echo(
                    f"tele: {kept.describe()} keeps its traffic agent: its pod template's "
                    "inject-traffic-agent annotation asks for one (remove the annotation)",
                    err=True,
                )
            for kept in (a for a in agents if a.by_hand):
                click.echo(
                    f"tele: {kept.describe()} keeps its traffic agent: it was injected by hand "
                    "(manually-injected; remove the agent from its pod template)",
                    err=True,
                )
            outcome = await ops.uninstall(
                kube,
                release=release,
                namespace=namespace,
                wait=kwargs["timeout"],
                progress=progress,
            )
            removed = await ops.remove_agents(
                kube, agents, wait=kwargs["timeout"], progress=progress
            )
            return outcome, removed, left

    outcome, removed, left = _run(operation)
    agents = (
        f"; removed the traffic agent from {', '.join(a.describe() for a in removed)}"
        if removed
        else ""
    )
    data = {
        "release": outcome.record.name,
        "namespace": outcome.record.namespace,
        "deleted": [_ref(r) for r in outcome.pruned],
        "agents_removed": [a.describe() for a in removed],
        "engagements_ended": left,
    }
    emit(
        data,
        kwargs["output"],
        lambda _: (
            f"Uninstalled release {outcome.record.name} from namespace "
            f"{outcome.record.namespace}: {len(outcome.pruned)} objects deleted{agents}."
        ),
    )


async def _leave_engagements_through(server: str, manager_namespace: str) -> list[str]:
    """End this user's engagements when its daemon is connected to the manager that is being
    uninstalled (same API server, same manager namespace); their names."""
    from tele.cli.client import daemon_client
    from tele.rpc import daemon_api
    from tele.rpc.errors import RpcError

    async with daemon_client(start=False) as rpc:
        if rpc is None:
            return []
        status = await rpc.call(daemon_api.STATUS, daemon_api.Empty(), timeout=10)
        session = status.session
        if (
            session is None
            or status.connection == "not connected"
            or session.kube_server != server
            or session.manager_namespace != manager_namespace
        ):
            return []
        left = []
        for engagement in session.engagements:
            try:
                await rpc.call(
                    daemon_api.LEAVE, daemon_api.LeaveRequest(name=engagement.name), timeout=120
                )
            except RpcError as exc:
                click.echo(f"tele: could not leave {engagement.name}: {exc.message}", err=True)
                continue
            left.append(engagement.name)
        return left


@helm.command(short_help="Check the chart and values with Helm's linter.")
@_value_options
@click.option(
    "-n",
    "--namespace",
    default=DEFAULT_NAMESPACE,
    show_default=True,
    help="The namespace to lint for.",
)
@click.option("--strict/--no-strict", default=True, show_default=True, help="Fail on warnings too.")
@output_option
def lint(**kwargs: Any) -> None:
    """Lint the chart inside tele with Helm, with the given values (schema included)."""
    from tele.errors import UserError
    from tele.helm.chart import lint_blocking, values_error

    values = _sources(kwargs).build()
    messages = lint_blocking(values, namespace=kwargs["namespace"], strict=kwargs["strict"])
    threshold = 2 if kwargs["strict"] else 3
    problems: list[str] = []
    found: list[dict[str, str]] = []
    for message in messages:
        lines = [line for line in message.text.splitlines() if line.lstrip().startswith("- at ")]
        if message.path == "templates/" and lines:
            continue  # Helm reports a schema failure twice; values.yaml's copy is enough
        texts = [str(values_error(line)) for line in lines] or [" ".join(message.text.split())]
        for text in texts:
            found.append({"severity": message.label, "path": message.path, "message": text})
            if kwargs["output"] == "default":
                click.echo(f"[{message.label}] {message.path}: {text}")
            if message.severity >= threshold:
                problems.append(text)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"The chart does not lint: {problems[0].rstrip('.')}{more}.")
    emit(
        {"linted": 1, "failed": 0, "messages": found},
        kwargs["output"],
        lambda _: "1 chart linted, 0 failed.",
    )
