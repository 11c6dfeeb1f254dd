"""`tele sandbox up|status|kubeconfig|down|run`: a local Kubernetes stand-in to try tele on."""

from __future__ import annotations

import sys
from typing import Any

import click

from tele.cli.output import emit, output_option

name_option = click.option(
    "--name",
    "-n",
    default="sandbox",
    show_default=True,
    help="Which sandbox (several can run side by side).",
)


@click.group()
def sandbox() -> None:
    """Run a local Kubernetes stand-in: the API server, and (as root) pods in network namespaces."""


@sandbox.command()
@name_option
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait until ready.")
@click.option(
    "--with",
    "addons",
    multiple=True,
    type=click.Choice(["argo-rollouts"]),
    help="Install an add-on: argo-rollouts (the Rollout CRD; the sandbox runs Rollouts).",
)
@output_option
def up(name: str, timeout: float, addons: tuple[str, ...], output: str) -> None:
    """Start the sandbox in the background and print how to use it."""
    from tele.sandbox import addons as sandbox_addons
    from tele.sandbox import instance

    instance.check_name(name)
    already = instance.status(name)
    progress = (
        (lambda msg: click.echo(msg, err=True))
        if sys.stderr.isatty() or output == "default"
        else None
    )
    current = instance.start(name, timeout=timeout, progress=progress)
    if addons:
        import trio

        trio.run(sandbox_addons.install, current.kubeconfig, list(addons))

    def text(_: object) -> str:
        lead = (
            f"Sandbox {name!r} is already running."
            if already.running
            else f"Sandbox {name!r} is up."
        )
        return (
            f"{lead}\n  API server: {current.server}\n  kubeconfig: {current.kubeconfig}\n"
            + _registry_text(current.registry)
            + "\n"
            f"Next steps:\n  export KUBECONFIG={current.kubeconfig}\n  kubectl get namespaces\n"
            f"  tele sandbox down --name {name}   # when you are done"
        )

    emit(current.as_dict(), output, text)


def _registry_text(registry: dict[str, Any] | None) -> str:
    if not registry:
        return "  registry:   none (install docker-registry to have one)\n"
    address = registry["address"]
    return (
        f"  registry:   {address} (user {registry['username']}, password "
        f"{registry['password']}, CA {registry['ca_file']})\n"
        f"              push your own: tele image push {address}/NAME --ca-file "
        f"{registry['ca_file']}\n"
        f"              (after: docker login {address} -u {registry['username']})\n"
        f"              pull secret: kubectl create secret docker-registry sandbox-registry "
        f"--docker-server={address} --docker-username={registry['username']} "
        f"--docker-password={registry['password']}\n"
    )


@sandbox.command()
@click.option("--name", "-n", default=None, help="One sandbox (default: all of them).")
@output_option
def status(name: str | None, output: str) -> None:
    """Show whether sandboxes run, their API server address and kubeconfig."""
    from tele.sandbox import instance

    names = [instance.check_name(name)] if name else instance.list_names()
    states = [instance.status(n) for n in names]

    def text(_: object) -> str:
        if not states:
            return "No sandbox is running. Start one with `tele sandbox up`."
        lines = []
        for s in states:
            if s.running:
                lines.append(
                    f"{s.name}: running (pid {s.pid}) at {s.server}, kubeconfig {s.kubeconfig}"
                )
                lines.append(_registry_text(s.registry).rstrip())
            else:
                lines.append(f"{s.name}: not running")
        return "\n".join(lines)

    emit([s.as_dict() for s in states], output, text)


@sandbox.command()
@name_option
@click.option(
    "--path", "path_only", is_flag=True, help="Print the file's path instead of its content."
)
@click.option("--user", help="Mint a kubeconfig for this user instead of the admin.")
@click.option("--group", "groups", multiple=True, help="A group of --user (repeatable).")
@click.option(
    "--token/--cert",
    "use_token",
    default=True,
    help="--user authenticates with a static bearer token (default) or a client certificate.",
)
@click.option(
    "--service-account",
    metavar="NAMESPACE/NAME",
    help="Mint a kubeconfig with a token of this service account.",
)
@click.option(
    "--duration",
    type=click.IntRange(600, 2**32),
    default=86400,
    show_default=True,
    help="Seconds a --service-account token lives.",
)
def kubeconfig(
    name: str,
    path_only: bool,
    user: str | None,
    groups: tuple[str, ...],
    use_token: bool,
    service_account: str | None,
    duration: int,
) -> None:
    """Print the sandbox's kubeconfig (admin user, CA included), or mint one for another
    identity to try RBAC with: --user NAME [--group G]... [--token|--cert], or
    --service-account NAMESPACE/NAME."""
    from pathlib import Path

    from tele.errors import UserError
    from tele.sandbox import instance

    if user and service_account:
        raise click.UsageError("--user and --service-account name different identities: use one.")
    if groups and not user:
        raise click.UsageError("--group goes with --user.")
    if path_only and (user or service_account):
        raise click.UsageError("--path prints the admin kubeconfig's path; minted ones have none.")
    current = instance.status(name)
    if not current.running or not current.kubeconfig:
        raise UserError(
            f"The sandbox {name!r} is not running; start it with `tele sandbox up --name {name}`."
        )
    if user or service_account:
        from tele.sandbox import identities
        from tele.sandbox.apiserver.kubeconfig import dump

        if user:
            directory = instance.instance_dir(name)
            config = identities.user_kubeconfig(
                name,
                directory,
                current.server,
                user,
                list(groups),
                use_certificate=not use_token,
                token_file=directory / instance.TOKEN_FILE,
            )
        else:
            assert service_account is not None
            config = identities.service_account_kubeconfig(
                name, Path(current.kubeconfig), service_account, duration
            )
        click.echo(dump(config).rstrip())
        return
    if path_only:
        click.echo(current.kubeconfig)
    else:
        with open(current.kubeconfig) as f:
            click.echo(f.read().rstrip())


@sandbox.command()
@name_option
def down(name: str) -> None:
    """Stop the sandbox and remove everything it created."""
    from tele.sandbox import instance

    if instance.stop(name):
        click.echo(f"Sandbox {name!r} stopped.")
    else:
        click.echo(f"Sandbox {name!r} was not running.")


@sandbox.command(context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def shell(name: str, command: tuple[str, ...]) -> None:
    """Run a shell, or COMMAND (after --), in the sandbox's laptop namespace.

    Only the API server is reachable there until tele connects; tele's config, cache and
    runtime directories are the laptop's own, so a daemon started there never meets the host's.
    """
    import os

    from tele.errors import UserError
    from tele.sandbox import instance
    from tele.sandbox.network.laptop import shell_command

    current = instance.status(name)
    if not current.running:
        raise UserError(
            f"The sandbox {name!r} is not running; start it with `tele sandbox up --name {name}`."
        )
    if not instance.nodes_supported():
        raise UserError("The sandbox's laptop namespace needs root, iproute2 and nftables.")
    argv, env = shell_command(
        name, instance.instance_dir(name) / "laptop", current.kubeconfig, list(command)
    )
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


@sandbox.command(hidden=True)
@name_option
@click.option("--ready-fd", type=int, default=None, hidden=True)
@click.option("--port", type=int, default=0, help="API server port (0: any free port).")
def run(name: str, ready_fd: int | None, port: int) -> None:
    """Run the sandbox in the foreground (what `up` starts in the background)."""
    from tele.sandbox import instance

    instance.run(name, ready_fd=ready_fd, port=port)
