"""The CLI side of Docker mode: the --docker-* flags of intercept, replace and ingest (a
decorator that keeps them out of those commands' signatures), running the handler container
once engaged, and `tele docker-run` / `tele curl`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from tele.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

_META_KEY = "tele.docker"

CURL_IMAGE = "curlimages/curl"
"""What `tele curl` runs (as Telepresence's: the curl project's image)."""


def docker_options(command: F) -> F:
    """Adds --docker-run, --docker-build, --docker-build-opt and --docker-mount; the command
    finds what they asked for with `requested()` (None when none was given)."""

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        docker_run: bool,
        docker_build: str | None,
        docker_build_opt: tuple[str, ...],
        docker_mount: str | None,
        **kwargs: Any,
    ) -> Any:
        from tele.docker.run import DockerRun

        wanted = docker_run or docker_build is not None
        if not wanted and (docker_build_opt or docker_mount is not None):
            raise UserError("--docker-build-opt and --docker-mount go with --docker-run")
        if wanted:
            if docker_mount is not None and not docker_mount.startswith("/"):
                raise UserError(f"--docker-mount {docker_mount!r} must be an absolute path")
            if docker_build_opt and docker_build is None:
                raise UserError("--docker-build-opt goes with --docker-build DIR")
            command_args = kwargs.get("command") or ()
            if not command_args:
                raise UserError(
                    "--docker-run takes docker run's flags and the image after --: "
                    "--docker-run -- [FLAGS] IMAGE [ARGS]"
                )
            click.get_current_context().meta[_META_KEY] = DockerRun(
                tuple(command_args),
                build=docker_build or "",
                build_opts=docker_build_opt,
                mount_root=docker_mount or "",
            )
        return command(*args, **kwargs)

    for option in reversed(
        [
            click.option(
                "--docker-run",
                is_flag=True,
                help="Run the handler as a container: the arguments after -- are docker run's "
                "flags, then IMAGE [ARGS]. It gets the pod's environment and volumes (at the "
                "pod's paths) and this connection's network; removed when it ends.",
            ),
            click.option(
                "--docker-build",
                metavar="DIR",
                default=None,
                help="Build an image from DIR first and run it (implies --docker-run; write "
                "IMAGE where the image goes: -- [FLAGS] IMAGE [ARGS]).",
            ),
            click.option(
                "--docker-build-opt",
                multiple=True,
                metavar="KEY=VALUE",
                help="A docker build option for --docker-build: tag, file, target, "
                "build-arg=NAME=VALUE, pull, no-cache, platform; repeatable.",
            ),
            click.option(
                "--docker-mount",
                metavar="DIR",
                default=None,
                help="Where in the container the pod's volumes go (default: at the pod's own "
                "paths); TELEPRESENCE_ROOT says where.",
            ),
        ]
    ):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def requested() -> Any:
    """The DockerRun the current command's --docker-* flags asked for, or None."""
    context = click.get_current_context(silent=True)
    return None if context is None else context.meta.get(_META_KEY)


def before_engaging() -> Any:
    """With --docker-*: a client of the engine that answers, and the run with its image
    built; done before the engagement so that a missing engine or a failed build leaves
    nothing in the cluster. (client, DockerRun) or None."""
    wanted = requested()
    if wanted is None:
        return None
    from tele.docker import engine, run

    run.docker_cli()
    client = engine.connect()
    try:
        if wanted.build:
            click.echo(f"Building the image in {wanted.build}...", err=True)
        echo = functools.partial(click.echo, err=True) if wanted.build else None
        resolved = run.resolve_image(wanted, client, echo or (lambda line: None))
    except BaseException:
        client.close()
        raise
    return client, resolved


def run_handler(prepared_engine: Any, data: Mapping[str, Any], engagement: str) -> int:
    """Run the handler container for an engagement (`data`: its InterceptInfo as builtins);
    its exit status. The caller leaves the engagement afterwards."""
    from tele.docker import engine, run

    client, wanted = prepared_engine
    try:
        _, image, _ = run.split_run_args(wanted.args)
        prepared = run.prepare(
            wanted,
            image=image,
            environment=data.get("environment") or {},
            local_mount=str(data.get("local_mount") or ""),
            network="host",
            engagement=engagement,
            found=engine.find(),
        )
        if prepared.notes:
            click.echo(
                "tele: left out of the container's environment (a line break in the value, "
                f"and the name would steer the docker CLI): {', '.join(prepared.notes)}",
                err=True,
            )
        return run.run(prepared, client)
    finally:
        client.close()


def _connected_network() -> str:
    """The network a container gets to reach the cluster: connects first when not connected
    (saying so, as intercept does). The daemon runs on this machine: the host's."""
    from tele.cli import client
    from tele.rpc import daemon_api

    client.call_connected(daemon_api.STATUS, daemon_api.Empty(), timeout=30, connect=True)
    return "host"


def _run_container(args: tuple[str, ...], engagement: str) -> int:
    from tele.docker import engine, run

    wanted = run.DockerRun(args)
    _, image, _ = run.split_run_args(args)
    found = engine.find()
    docker_client = engine.connect(found)
    try:
        network = _connected_network()
        prepared = run.prepare(
            wanted,
            image=image,
            environment={},
            local_mount="",
            network=network,
            engagement=engagement,
            found=found,
        )
        return run.run(prepared, docker_client)
    finally:
        docker_client.close()


def _exit_status(returncode: int) -> int:
    """As a shell gives it: killed by signal N -> 128+N."""
    return 128 - returncode if returncode < 0 else returncode


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED, required=True)
def docker_run(args: tuple[str, ...]) -> None:
    """Run a container with the cluster's network (no engagement): `tele docker-run --
    [docker run flags] IMAGE [ARGS]`; it is removed when it ends, and its status is tele's."""
    raise SystemExit(_exit_status(_run_container(args, "")))


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def curl(args: tuple[str, ...]) -> None:
    """curl from inside the connection (the cluster's names and addresses): `tele curl
    [curl args] URL` runs the curlimages/curl image with the connection's network."""
    raise SystemExit(_exit_status(_run_container(("--rm", CURL_IMAGE, *args), "")))
