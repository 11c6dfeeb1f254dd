"""The CLI side of Docker mode: the --docker-* flags of intercept, replace and ingest (a
decorator that keeps them out of those commands' signatures), running the handler container
once engaged, and `tele docker-run` / `tele curl`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
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
            raise UserError("--docker-build-opt and --docker-mount go with --docker-run.")
        if wanted:
            if docker_mount is not None and not docker_mount.startswith("/"):
                raise UserError(f"--docker-mount {docker_mount!r} must be an absolute path.")
            if docker_build_opt and docker_build is None:
                raise UserError("--docker-build-opt goes with --docker-build DIR.")
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


ENGAGEMENT_POLL = 2.0
"""How often a handler container's engagement is looked for while it runs (`tele leave` from
another terminal, a session that ended): when it is gone, so is the container."""


def _follow_engagement(engagement: str, container: str, stop: Any) -> None:
    """Remove `container` once the daemon no longer has `engagement` (a thread)."""
    from tele.cli import quick
    from tele.docker import engine, run
    from tele.errors import TeleError
    from tele.rpc import daemon_api

    while not stop.wait(ENGAGEMENT_POLL):
        try:
            reply = quick.ask_daemon(daemon_api.STATUS, daemon_api.Empty(), timeout=5)
        except TeleError:
            continue  # the daemon is busy or reconnecting: ask again
        session = None if reply is None else reply.session
        if session is not None and any(e.name == engagement for e in session.engagements):
            continue
        click.echo(f"tele: {engagement} has ended; removing its container", err=True)
        try:
            docker_client = engine.connect()
        except TeleError:
            return
        try:
            run.remove(docker_client, container)
        finally:
            docker_client.close()
        return


def run_handler(prepared_engine: Any, data: Mapping[str, Any], engagement: str) -> int:
    """Run the handler container for an engagement (`data`: its InterceptInfo as builtins);
    its exit status. The container goes when the engagement does; the caller leaves the
    engagement afterwards (when it is still there)."""
    import threading

    from tele.docker import engine, run

    client, wanted = prepared_engine
    stop = threading.Event()
    try:
        _, image, _ = run.split_run_args(wanted.args)
        prepared = run.prepare(
            wanted,
            image=image,
            environment=data.get("environment") or {},
            local_mount=str(data.get("local_mount") or ""),
            network=_network(),
            engagement=engagement,
            found=engine.find(),
        )
        if prepared.notes:
            click.echo(
                "tele: left out of the container's environment (a line break in the value, "
                f"and the name would steer the docker CLI): {', '.join(prepared.notes)}",
                err=True,
            )
        threading.Thread(
            target=_follow_engagement,
            args=(engagement, prepared.name, stop),
            daemon=True,
            name="tele-follow-engagement",
        ).start()
        return run.run(prepared, client)
    finally:
        stop.set()
        client.close()


VOLUMES_ONLY_IN_CONTAINERS = (
    "tele: The pod's volumes{which} are not mounted on this machine: with tele connect --docker "
    "they go only into a --docker-run container, at the pod's paths."
)


def daemon_in_container() -> bool:
    """Whether the connected daemon runs in a container (connect --docker) right now."""
    from tele.errors import TeleError

    if not daemon_container():
        return False
    try:
        return _network().startswith("container:")
    except TeleError:
        return False


def mount_request(value: str, handler_container: bool) -> str:
    """The --mount value to ask a daemon in a container for: none without a --docker-run
    handler (as Telepresence, nothing is mounted on this machine), else a mount point of its
    own (a DIR of this machine means nothing in there), read-only if asked."""
    if not handler_container or value.strip().lower() in ("false", "no"):
        return "false"
    return "true:ro" if value.endswith(":ro") else "true"


def mount_dir_note(value: str) -> str | None:
    """`--mount DIR` while the daemon runs in a container: one sentence that DIR is not used."""
    text = value.removesuffix(":ro").strip().lower()
    if text in ("", "true", "yes", "false", "no"):
        return None
    return (
        f"tele: --mount {value.removesuffix(':ro')} is not used: with tele connect --docker the "
        "volumes are mounted in the daemon's container, for the --docker-run container only."
    )


def volumes_note(data: Mapping[str, Any], handler_container: bool) -> str | None:
    """What becomes of the engagement's volumes while the daemon runs in a container, in one
    sentence (None: they are in the --docker-run container, or there are none)."""
    environment = data.get("environment") or {}
    paths = [p for p in str(environment.get("TELEPRESENCE_MOUNTS") or "").split(":") if p]
    which = f" ({', '.join(paths)})" if paths else ""
    if not paths:
        return None
    if not handler_container:
        return VOLUMES_ONLY_IN_CONTAINERS.format(which=which)
    if data.get("local_mount"):
        return None
    why = str(_marker().get("no_mounts") or data.get("mount_error") or "").rstrip(".")
    if not data.get("mount_error"):
        return None  # --mount=false
    return f"tele: The pod's volumes{which} are not mounted in the --docker-run container: {why}."


def host_mount(local_mount: str) -> str:
    """Where the daemon container's mount point `local_mount` is on this machine (its mounts
    directory is bound there with shared propagation), or '' when it is not in there."""

    inside = f"{MOUNTS_INSIDE}/"
    name = local_mount.removeprefix(inside)
    if not local_mount.startswith(inside) or not name.startswith("telfs-") or "/" in name:
        return ""  # only the mount points tele.daemon.mounts makes there
    where = _marker().get("mounts")
    return f"{where}/{local_mount.removeprefix(inside)}" if isinstance(where, str) else ""


def show_host_mounts(session: dict[str, Any], mounted_here: Callable[[str], bool]) -> None:
    """connect --docker, for `tele status`: each engagement's mount point (one in the daemon's
    container) becomes the path on this machine that its --docker-run container binds (under
    the runtime directory's docker-mounts), in `local_mount`; `mounted_for` says the volumes
    are mounted for that container only. A mount point that does not show on this machine
    keeps the container's path, and `mounted_for` says so (`mounted_here`: whether a path is a
    mount point here, tele.cli.intercept_cmd.mounted_here)."""
    import re

    marker = _marker()
    if not marker.get("container"):
        return
    for engagement in session.get("engagements") or []:
        inside = str(engagement.get("local_mount") or "")
        if not inside:
            continue
        here = host_mount(inside)
        if here and mounted_here(here):
            engagement["local_mount"] = here
            engagement["mounted_for"] = "docker-run"  # its --docker-run container only
            said = f", volumes at {here} (for its --docker-run container)"
        elif not inside.startswith(f"{MOUNTS_INSIDE}/"):
            continue  # not a daemon container's mount point: a daemon on this machine made it
        else:
            engagement["mounted_for"] = "daemon-container"  # not on this machine at all
            said = f", volumes at {inside} in the daemon's container"
        # The daemon's line of the engagement (tele.daemon.engagements) says its own path.
        session["intercepts"] = [
            re.sub(rf", volumes at {re.escape(inside)}(?=,|;|$)", said.replace("\\", r"\\"), line)
            for line in session.get("intercepts") or []
        ]


def show_host_files(daemon: dict[str, Any]) -> None:
    """connect --docker, for `tele status`: the daemon's log file and socket as this machine
    sees them (the container's paths are bound from the user's logs and runtime directories)."""
    from tele import paths

    if not _marker().get("container"):
        return
    for key, inside, here in (
        ("log_file", f"{CACHE_INSIDE}/tele/logs", paths.logs_dir()),
        ("socket", f"{RUNTIME_INSIDE}/tele", paths.runtime_dir()),
    ):
        value = str(daemon.get(key) or "")
        if value.startswith(f"{inside}/"):
            daemon[key] = f"{here}{value.removeprefix(inside)}"


def mount_lines(session: dict[str, Any]) -> list[str]:
    """`tele status`'s words for show_host_mounts's engagements."""
    lines = []
    for e in session.get("engagements") or []:
        if e.get("mounted_for") == "docker-run":
            lines.append(
                f"  Volumes:            {e['name']}'s at {e['local_mount']}, mounted only for "
                "its --docker-run container (at the pod's paths in there)"
            )
        elif e.get("mounted_for") == "daemon-container":
            lines.append(
                f"  Volumes:            {e['name']}'s at {e['local_mount']} in the daemon's "
                "container only (not on this machine)"
            )
    return lines


DOCKER_DIRS = ("docker-mounts", "docker-relay")
"""What connect --docker makes in the runtime directory (for the containers to bind)."""


def tidy_runtime(wait_relay: float) -> None:
    """After `tele quit`, no daemon running: remove the runtime directory's docker-mounts and
    docker-relay, each only when it is empty and not a mount point (a mount left in there, or
    a live mount, stays; `tele quit` again removes a dead daemon's), and then the marker of
    the daemon container. The relay container removes its socket when it sees the daemon's
    process gone: that is waited for, up to `wait_relay` seconds."""
    import os
    import time

    from tele import paths

    runtime = paths.runtime_dir()
    relay = runtime / "docker-relay"
    deadline = time.monotonic() + wait_relay
    while time.monotonic() < deadline:
        try:
            if not os.listdir(relay):
                break
        except OSError:
            break
        time.sleep(0.05)  # the relay's exit: no event this process can wait on
    for name in DOCKER_DIRS:
        directory = runtime / name
        if os.path.ismount(directory):
            continue  # never a live mount
        try:
            os.rmdir(directory)  # only when empty
        except OSError:
            pass
    if not (runtime / "docker-mounts").exists():  # nothing left for leftover_mounts to do
        (runtime / "docker-daemon.json").unlink(missing_ok=True)


def _marker() -> dict[str, Any]:
    """What connect --docker wrote of the daemon container it started ({} when none)."""
    import json

    from tele import paths

    try:
        data = json.loads((paths.runtime_dir() / "docker-daemon.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def shared_mount_problem(directory: Path) -> str | None:
    """Why mounts made in a container under `directory` (bound with rshared propagation) would
    not show on this machine, for a --docker-run container to bind, in words; or None. Docker
    propagates them only when the mount holding `directory` is shared (systemd makes every
    mount shared; a plain init leaves / private)."""
    import os

    if not os.path.exists("/dev/fuse"):
        return "this machine has no /dev/fuse (FUSE), which the daemon's container needs"
    target = os.path.realpath(directory)
    best, shared = "", False
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as exc:
        return f"cannot read /proc/self/mountinfo: {exc.strerror or exc}"
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 7 or "-" not in fields:
            continue
        point = fields[4].replace("\\040", " ").replace("\\134", "\\")
        under = target == point or target.startswith(point.rstrip("/") + "/")
        if under and len(point) >= len(best):
            best = point
            shared = any(f.startswith("shared:") for f in fields[6 : fields.index("-")])
    if shared:
        return None
    return (
        f"Docker passes the daemon container's mounts on only from a shared mount, and {target} "
        f"is on {best or '/'}, which is not shared (as root, `mount --make-rshared /` makes it "
        "so; systemd does it at boot)"
    )


def _connected_network() -> str:
    """The network a container gets to reach the cluster: connects first when not connected
    (saying so, as intercept does). The daemon runs on this machine: the host's."""
    from tele.cli import client
    from tele.rpc import daemon_api

    client.call_connected(daemon_api.STATUS, daemon_api.Empty(), timeout=30, connect=True)
    return _network()


def _network() -> str:
    """The daemon's network: its container's (connect --docker) while that runs, else the
    host's."""
    container = daemon_container()
    if container:
        from tele.docker import engine

        docker_client = engine.connect()
        try:
            if _container_running(docker_client, container):
                return f"container:{container}"
        finally:
            docker_client.close()
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


# --- tele connect --docker ---------------------------------------------------------------------


def use_connection(name: str) -> None:
    """Make this process (and what it starts) talk to the named connection's daemon."""
    import os

    from tele import paths

    if not name or name.startswith(".") or not all(c.isalnum() or c in "_.-" for c in name):
        raise UserError(f"{name!r} is not a connection name: use letters, digits, '_', '.', '-'.")
    os.environ[paths.USE_ENV] = name


KUBECONFIG_INSIDE = "/tele/kubeconfig"
MOUNTS_INSIDE = "/tele/mounts"
"""The daemon container's mount points (tele.paths.MOUNTS_DIR_ENV), bound from the
runtime directory's docker-mounts with shared propagation."""
RUNTIME_INSIDE = "/tele/run"
RELAY_INSIDE = "/tele/relay"
CACHE_INSIDE = "/tele/cache"
DAEMON_START_TIMEOUT = 60.0


def connect_options(command: F) -> F:
    """Adds --docker and --name to `tele connect`: with --docker the daemon is started in a
    container first, and the connect goes on as usual with the container's kubeconfig path."""

    @functools.wraps(command)
    def wrapper(*args: Any, docker: bool, name: str, **kwargs: Any) -> Any:
        if name and not docker:
            raise UserError("--name names a connection made with --docker.")
        if docker:
            from tele import paths

            name = name or paths.connection_name()  # --name, or --use, or "default"
            use_connection(name)
            kwargs["kubeconfig"] = start_daemon_container(
                kwargs.get("kubeconfig") or "", kwargs.get("context") or "", name, owner()
            )
            kwargs["vif"] = True  # the container's own network namespace: routes, DNS there
        return command(*args, **kwargs)

    wrapper = click.option(
        "--name",
        default="",
        help="With --docker: the connection's name (its containers are tele-daemon-NAME and "
        "tele-relay-NAME; default: default).",
    )(wrapper)
    wrapper = click.option(
        "--docker",
        is_flag=True,
        help="Run the daemon in a container: the cluster's routes and DNS exist only in its "
        "network namespace (this machine's stay as they are); --docker-run handlers and "
        "`tele docker-run`/`tele curl` join it.",
    )(wrapper)
    return wrapper  # type: ignore[return-value]


def _kubeconfig_file(given: str) -> Path:
    import os

    text = given or os.environ.get("KUBECONFIG", "") or str(Path.home() / ".kube" / "config")
    files = [f for f in text.split(os.pathsep) if f]
    if len(files) != 1:
        raise UserError(
            "connect --docker takes one kubeconfig file (KUBECONFIG lists several): "
            "`kubectl config view --flatten > FILE` makes one."
        )
    path = Path(files[0]).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"The kubeconfig {path} does not exist.")
    return path


def _loopback_server(path: Path, context: str) -> tuple[str, int] | None:
    """(host, port) of the context's API server when it is on this machine's loopback (the
    container needs a relay to it), else None."""
    import ipaddress
    import urllib.parse

    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"Cannot read the kubeconfig {path}: {exc}.") from exc
    if not isinstance(config, dict):
        raise UserError(f"The kubeconfig {path} is not a kubeconfig.")
    name = context or config.get("current-context") or ""
    contexts = {c.get("name"): c.get("context") or {} for c in config.get("contexts") or []}
    clusters = {c.get("name"): c.get("cluster") or {} for c in config.get("clusters") or []}
    if name not in contexts:
        raise UserError(f"The kubeconfig {path} has no context {name!r}.")
    server = str(clusters.get(contexts[name].get("cluster"), {}).get("server") or "")
    url = urllib.parse.urlsplit(server)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    if host == "localhost":
        return host, port
    try:
        return (host, port) if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


def owner() -> int | None:
    """The uid the daemon container (root in there) serves: this user's, unless root."""
    import os

    return None if os.getuid() == 0 else os.getuid()


def start_daemon_container(
    kubeconfig: str, context: str, name: str, owner: int | None = None
) -> str:
    """Start the daemon (and, for an API server on the loopback, the relay) in containers;
    return once the daemon answers on its socket. The kubeconfig path inside the container.
    With `owner`, the daemon gives that uid its files and trusts it (tele.unixsock)."""
    import json
    import time

    import docker.errors

    from tele import paths, unixsock
    from tele.cli import quick
    from tele.docker import engine, image
    from tele.rpc import daemon_api

    if not all(c.isalnum() or c in "_.-" for c in name) or not name:
        raise UserError(f"--name {name!r}: use letters, digits, '_', '.' and '-'.")
    config = _kubeconfig_file(kubeconfig)
    server = _loopback_server(config, context)
    found = engine.find()
    client = engine.connect(found)
    try:
        running = quick.ask_daemon(daemon_api.STATUS, daemon_api.Empty(), timeout=5)
        daemon_name, relay_name = f"tele-daemon-{name}", f"tele-relay-{name}"
        if running is not None:
            if _container_running(client, daemon_name):
                return KUBECONFIG_INSIDE  # connect goes on: already connected, or connects
            raise UserError(
                "A tele daemon already runs on this machine: `tele quit` it before "
                "`tele connect --docker`."
            )
        tag = image.ensure_daemon_image(client, lambda line: click.echo(line, err=True))
        runtime = paths.ensure_private_dir(paths.runtime_dir())
        relay_dir = paths.ensure_private_dir(runtime / "docker-relay")
        for stale in (daemon_name, relay_name):
            from tele.docker.run import remove

            remove(client, stale)
        labels = {"io.tele.connection": name}
        serving = {} if owner is None else {unixsock.OWNER_ENV: str(owner)}
        listen = [f"--listen={server[0]}:{server[1]}={RELAY_INSIDE}/api.sock"] if server else []
        logs = paths.ensure_private_dir(paths.logs_dir())
        host_mounts = paths.ensure_private_dir(runtime / "docker-mounts")
        no_mounts = shared_mount_problem(host_mounts)
        fuse = _fuse_options(host_mounts) if no_mounts is None else {}
        mounts = {
            str(logs): {"bind": f"{CACHE_INSIDE}/tele/logs", "mode": "rw"},  # gather-logs
            str(config): {"bind": KUBECONFIG_INSIDE, "mode": "ro"},
            str(relay_dir): {"bind": RELAY_INSIDE, "mode": "rw"},
        }
        try:
            client.containers.run(
                tag,
                [*listen, "--", "daemon", "run"],
                name=daemon_name,
                detach=True,
                auto_remove=True,
                pid_mode="host",  # its pid is this machine's: `tele quit` waits for it
                cap_add=["NET_ADMIN", *fuse.get("cap_add", [])],
                devices=["/dev/net/tun:/dev/net/tun:rwm", *fuse.get("devices", [])],
                environment={
                    "XDG_RUNTIME_DIR": RUNTIME_INSIDE,
                    "XDG_CACHE_HOME": CACHE_INSIDE,
                    **serving,  # root in there, serving this user (its socket and peer check)
                    **fuse.get("environment", {}),
                },
                volumes=mounts,
                mounts=[_runtime_bind(runtime, read_only=False), *fuse.get("mounts", [])],
                security_opt=fuse.get("security_opt"),
                labels=labels,
            )
            if server:
                client.containers.run(
                    tag,
                    [
                        f"--serve={RELAY_INSIDE}/api.sock={server[0]}:{server[1]}",
                        f"--while-pid-file={RUNTIME_INSIDE}/tele/daemon.pid",
                    ],
                    name=relay_name,
                    detach=True,
                    auto_remove=True,
                    network_mode="host",
                    pid_mode="host",
                    volumes={str(relay_dir): {"bind": RELAY_INSIDE, "mode": "rw"}},
                    mounts=[_runtime_bind(runtime, read_only=True)],
                    labels=labels,
                )
        except docker.errors.APIError as exc:
            for started in (daemon_name, relay_name):
                from tele.docker.run import remove

                remove(client, started)
            raise UserError(f"The Docker engine could not start the daemon: {exc}.") from exc
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while quick.ask_daemon(daemon_api.STATUS, daemon_api.Empty(), timeout=5) is None:
            if not _container_running(client, daemon_name) or time.monotonic() > deadline:
                raise UserError(
                    f"The daemon container {daemon_name} did not start: "
                    f"`docker logs {daemon_name}` says why."
                )
            time.sleep(0.1)  # the socket appears when the daemon is ready
        marker = runtime / "docker-daemon.json"
        marker.write_text(
            json.dumps(
                {
                    "container": daemon_name,
                    "engine": found.host,
                    "mounts": str(host_mounts) if no_mounts is None else None,
                    "no_mounts": no_mounts,
                    "image": tag,  # what `tele quit` cleans up with (leftover_mounts)
                }
            )
        )
        return KUBECONFIG_INSIDE
    finally:
        client.close()


_RECOVER = "from tele.daemon import mounts\nfor line in mounts.recover(): print(line)\n"


def leftover_mounts() -> list[str]:
    """No daemon answers: the volume mounts a killed daemon container left on this machine
    (dead, their sshfs gone with it; root's, which this user may not unmount) are removed by a
    short-lived container of the daemon's image, root in there, as the next daemon would do.
    What was done, in words."""
    import os

    import docker.errors

    from tele import paths
    from tele.docker import engine
    from tele.errors import TeleError
    from tele.image.build import PYTHON

    host_mounts = paths.runtime_dir() / "docker-mounts"
    try:
        left = [name for name in os.listdir(host_mounts) if name.startswith("telfs-")]
    except OSError:
        return []
    tag = str(_marker().get("image") or "")
    if not left or not tag:
        return []
    try:
        client = engine.connect(timeout=30)
    except TeleError as exc:
        return [f"could not remove the volume mounts left in {host_mounts}: {exc}"]
    fuse = _fuse_options(host_mounts)
    try:
        output = client.containers.run(
            tag,
            ["-c", _RECOVER],
            entrypoint=[PYTHON],
            environment={**fuse["environment"], "XDG_STATE_HOME": "/tmp"},
            cap_add=fuse["cap_add"],
            security_opt=fuse["security_opt"],
            mounts=fuse["mounts"],
            network_mode="none",
            remove=True,
            labels={"io.tele.connection": paths.connection_name()},
        )
    except docker.errors.DockerException as exc:
        return [f"could not remove the volume mounts left in {host_mounts}: {exc}"]
    finally:
        client.close()
    lines = bytes(output or b"").decode(errors="replace").splitlines()
    return [line.replace(MOUNTS_INSIDE, str(host_mounts)) for line in lines if line.strip()]


def _runtime_bind(runtime: Path, *, read_only: bool) -> Any:
    """The runtime directory in a container, without the mounts under it (non-recursive): a
    dead daemon's mount left in its docker-mounts would otherwise be copied in, and keep the
    next daemon from removing its directory (busy while mounted in that namespace)."""
    from docker.types import Mount

    bind = Mount(f"{RUNTIME_INSIDE}/tele", str(runtime), type="bind", read_only=read_only)
    bind.setdefault("BindOptions", {})["NonRecursive"] = True
    return bind


def _fuse_options(host_mounts: Path) -> dict[str, Any]:
    """What the daemon container needs to mount the pod's volumes with sshfs where --docker-run
    containers can bind them: /dev/fuse, CAP_SYS_ADMIN (mount(2)), no AppArmor profile (Docker's
    default one refuses mounts), and `host_mounts` bound with rshared propagation (its mounts
    show on this machine; their unmounting too)."""
    from docker.types import Mount

    from tele.paths import MOUNTS_DIR_ENV

    try:
        apparmor = Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        apparmor = False
    return {
        "cap_add": ["SYS_ADMIN"],
        "devices": ["/dev/fuse:/dev/fuse:rwm"],
        "environment": {MOUNTS_DIR_ENV: MOUNTS_INSIDE},
        "mounts": [Mount(MOUNTS_INSIDE, str(host_mounts), type="bind", propagation="rshared")],
        "security_opt": ["apparmor=unconfined"] if apparmor else None,
    }


def _container_running(client: Any, name: str) -> bool:
    import docker.errors

    try:
        return bool(client.containers.get(name).status in ("running", "created"))
    except docker.errors.NotFound:
        return False


def daemon_container() -> str:
    """The container the connected daemon runs in (connect --docker), or ''."""
    return str(_marker().get("container") or "")
