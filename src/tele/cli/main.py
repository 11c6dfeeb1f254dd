"""The `tele` entry point: a click group whose subcommands are imported only when invoked.

Keeping imports lazy is what keeps `tele --help` fast: each command module pulls in trio, h2,
kubernetes or cryptography itself. Every TeleError becomes one line on stderr and its exit code;
anything unexpected is logged with its traceback and reported as one line too.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

# name -> "module:attribute" of a click.Command; add a line here to register a command.
COMMANDS: dict[str, str] = {
    "version": "tele.cli.basic:version",
    "status": "tele.cli.basic:status",
    "quit": "tele.cli.basic:quit_",
    "loglevel": "tele.cli.basic:loglevel",
    "gather-logs": "tele.cli.logs_cmd:gather_logs",
    "config": "tele.cli.config_cmd:config",
    "daemon": "tele.cli.daemon_cmd:daemon",
    "sandbox": "tele.cli.sandbox_cmd:sandbox",
    "connect": "tele.cli.cluster_cmd:connect",
    "list": "tele.cli.cluster_cmd:list_",
    "list-namespaces": "tele.cli.cluster_cmd:list_namespaces",
    "list-contexts": "tele.cli.cluster_cmd:list_contexts",
    "current-cluster-id": "tele.cli.cluster_cmd:current_cluster_id",
    "intercept": "tele.cli.intercept_cmd:intercept",
    "leave": "tele.cli.intercept_cmd:leave",
    "replace": "tele.cli.intercept_cmd:replace",
    "ingest": "tele.cli.intercept_cmd:ingest",
    "wiretap": "tele.cli.wiretap_cmd:wiretap",
    "genyaml": "tele.cli.genyaml_cmd:genyaml",
    "demo": "tele.cli.demo_cmd:demo",
    "uninstall": "tele.cli.intercept_cmd:uninstall",
    "helm": "tele.cli.helm_cmd:helm",
    "image": "tele.cli.image_cmd:image",
    "completion": "tele.cli.completion_cmd:completion",
    "docker-run": "tele.cli.docker_cmd:docker_run",
    "curl": "tele.cli.docker_cmd:curl",
}

# One-line help shown by `tele --help` without importing the command modules.
SHORT_HELP: dict[str, str] = {
    "version": "Show the client and daemon versions.",
    "status": "Show whether the daemon runs and what it is connected to.",
    "quit": "Stop the daemon (and end its session).",
    "loglevel": "Change the log level (daemon, traffic manager, agents) for a while.",
    "gather-logs": "Zip the logs of tele and of the cluster's side for a bug report.",
    "config": "Show the effective client configuration.",
    "daemon": "Run the daemon in the foreground, or start it in the background.",
    "sandbox": "Run a local Kubernetes stand-in to try tele without a cluster.",
    "connect": "Connect this machine to the cluster through its traffic manager.",
    "list": "List a namespace's workloads and whether they can be engaged.",
    "list-namespaces": "List the namespaces the traffic manager manages.",
    "list-contexts": "List the kubeconfig's contexts.",
    "current-cluster-id": "Show the cluster's ID (its kube-system namespace's UID).",
    "intercept": "Send a workload's traffic to a handler on this machine.",
    "leave": "End an intercept, replace or ingest.",
    "replace": "Replace a workload's container with this machine.",
    "ingest": "Get a workload container's environment and volumes, without its traffic.",
    "wiretap": "Copy a workload's traffic to a handler here; the workload still serves it.",
    "genyaml": "Write the YAML that injects the traffic agent into a workload by hand.",
    "demo": "See tele at work on a sandbox cluster, start to finish.",
    "uninstall": "Remove the traffic agent from workloads.",
    "helm": "Install, upgrade, uninstall or lint the traffic manager.",
    "image": "Build tele's container image and push it to a registry.",
    "completion": "Print the shell completion script (bash, zsh or fish).",
    "docker-run": "Run a container with the cluster's network (docker run's flags).",
    "curl": "Run curl in a container with the cluster's network.",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            import difflib

            close = difflib.get_close_matches(name, self.list_commands(ctx), n=2, cutoff=0.6)
            prefixed = [c for c in self.list_commands(ctx) if c.startswith(name)]
            choices = close or prefixed[:2]
            hint = f" Did you mean {' or '.join(choices)}?" if choices else ""
            ctx.fail(f"No such command {name!r}.{hint} `tele --help` lists them.")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SHORT_HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tele", message="tele %(version)s")
@click.option(
    "--output",
    "-o",
    type=click.Choice(["default", "json", "yaml"]),
    default="default",
    help="json or yaml for every command that prints a result (also after the command).",
)
@click.option(
    "--use",
    default="",
    metavar="NAME",
    help="Talk to the named connection's daemon (tele connect --docker --name NAME).",
)
@click.pass_context
def cli(ctx: click.Context, output: str, use: str) -> None:
    """tele: join a Kubernetes cluster's network and handle a workload's traffic locally."""
    from tele.cli.output import GLOBAL_OUTPUT

    ctx.meta[GLOBAL_OUTPUT] = output
    if use:
        from tele.cli.docker_cmd import use_connection

        use_connection(use)


def main(argv: list[str] | None = None) -> Any:
    """Run the CLI; map tele's errors to one line on stderr and their exit codes."""
    from tele.errors import TeleError

    try:
        return cli.main(args=argv, prog_name="tele", standalone_mode=False)
    except click.exceptions.Abort:  # click's form of Ctrl-C (KeyboardInterrupt)
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except TeleError as exc:
        click.echo(f"tele: {exc}", err=True)
        from tele.cli.output import asked_output, emit_error

        emit_error(str(exc), exc.exit_code, asked_output(sys.argv[1:] if argv is None else argv))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: log the traceback, show one line
        from tele.cli.output import report_unexpected

        report_unexpected(exc)
        sys.exit(4)
