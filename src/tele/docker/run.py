"""A handler run as a container: `--docker-run -- [docker run flags] IMAGE [ARGS]` (and
`--docker-build DIR` first) for intercept, replace and ingest, and `tele docker-run`.

The container gets the engaged pod's environment, the pod's volumes at the pod's paths (under
`--docker-mount DIR` when given) and the connection's network:
- the daemon on this machine (its TUN device, DNS and the engaged ports' dial-back to
  127.0.0.1): the container runs with the host's network (`--network host`), so the handler
  listens where the daemon sends engaged traffic and reaches the cluster as any local program;
- the daemon in a container (`tele connect --docker`): the handler joins that container's
  network (`--network container:NAME`), where the daemon's routes and DNS live.

`docker run` itself is the docker CLI's (its flags are the user's, all of them, `-it`
included), pointed at the engine tele found (`engine.find`); docker-py does the rest (ping,
build, removal). The pod's variables go in an `--env-file` that is a pipe (`/dev/fd/N`: never
on disk, where a killed tele would leave the pod's secrets); a value with a line break, which
that file cannot hold, goes as `-e NAME` from the CLI's environment, unless the name would
steer the docker CLI itself (DOCKER_*, the loader's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tele.docker import engine as engines
from tele.errors import UserError

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "IMAGE"
"""With --docker-build, the word in the run arguments that the built image replaces (as in
Telepresence: `--docker-build DIR -- --rm IMAGE`)."""

LABEL = "io.tele.engagement"
"""Every handler container carries it (the engagement's name, or `-` for `tele docker-run`)."""

BUILD_OPTIONS = ("tag", "file", "target", "build-arg", "pull", "no-cache", "platform")
"""The keys --docker-build-opt takes (the `docker build` flags of the same names)."""

_NETWORK_FLAGS = ("--network", "--net")
_CLI_ENV_NAMES = ("DOCKER_",)
"""Pod variables never put in the docker CLI's own environment (they would steer it)."""


@dataclass(frozen=True)
class DockerRun:
    """What the --docker-* flags asked for."""

    args: tuple[str, ...]
    """[docker run flags] IMAGE [ARGS] (IMAGE is the placeholder with `build`)."""
    build: str = ""
    build_opts: tuple[str, ...] = ()
    mount_root: str = ""
    """--docker-mount: where in the container the pod's volumes go (default: the pod's paths)."""


@dataclass
class Prepared:
    """A run ready to start: the docker CLI's arguments and environment, and what to remove."""

    argv: list[str]
    env: dict[str, str]
    name: str
    engine: engines.Engine
    env_lines: list[str] = field(default_factory=list)
    """NAME=value lines for docker's --env-file, handed over through a pipe (never a file: the
    pod's variables often hold secrets)."""
    notes: list[str] = field(default_factory=list)


def docker_cli() -> str:
    found = shutil.which("docker")
    if found is None:
        raise UserError(
            "--docker-run needs the docker CLI (docker run takes your flags), and it is not on "
            "PATH: install Docker (Debian/Ubuntu: apt install docker.io)."
        )
    return found


def split_run_args(args: Sequence[str]) -> tuple[list[str], str, list[str]]:
    """(docker run flags, IMAGE, ARGS): IMAGE is the first word that is neither a flag nor a
    flag's value. Flags taking a value are the docker CLI's (`docker run --help`); a flag
    given as `--flag=value` takes none from the next word."""
    flags: list[str] = []
    index = 0
    while index < len(args):
        word = args[index]
        if word == "--":
            index += 1
            break
        if not word.startswith("-") or word == "-":
            break
        flags.append(word)
        index += 1
        if "=" not in word and _takes_value(word) and index < len(args):
            flags.append(args[index])
            index += 1
    if index >= len(args):
        raise UserError(
            "--docker-run needs an image after the docker run flags: "
            "tele intercept NAME --docker-run -- [FLAGS] IMAGE [ARGS]."
        )
    return flags, args[index], list(args[index + 1 :])


_BOOLEAN_SHORT = set("dit")
_BOOLEAN_LONG = {
    "--detach", "--interactive", "--tty", "--rm", "--init", "--privileged", "--read-only",
    "--disable-content-trust", "--no-healthcheck", "--oom-kill-disable", "--publish-all",
    "--quiet", "--sig-proxy", "--help",
}  # fmt: skip


def _takes_value(flag: str) -> bool:
    if flag.startswith("--"):
        return flag not in _BOOLEAN_LONG
    # -it, -d: clusters of boolean letters; -e X, -v X, -p X, -w X, -u X...: a value, in the
    # next word, unless it is attached (-p8080:80); -ite X: booleans, then one that takes X.
    letters = flag[1:]
    if not letters:
        return False
    booleans = 0
    while booleans < len(letters) and letters[booleans] in _BOOLEAN_SHORT:
        booleans += 1
    return booleans == len(letters) - 1


def _has_flag(flags: Sequence[str], names: Sequence[str]) -> bool:
    return any(f in names or f.split("=", 1)[0] in names for f in flags)


def check_flags(flags: Sequence[str]) -> None:
    """Refuse the docker run flags that cannot work with an engagement."""
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in ("-d", "--detach") or (
            name.startswith("-") and not name.startswith("--") and "d" in name[1:]
            and all(c in _BOOLEAN_SHORT for c in name[1:])
        ):  # fmt: skip
            raise UserError(
                "--docker-run cannot detach (-d): the engagement lasts as long as the "
                "container runs in the foreground."
            )


def container_mounts(
    environment: Mapping[str, str], local_mount: str, mount_root: str
) -> list[tuple[str, str]]:
    """(source on this machine, target in the container) for each of the pod's shared
    volumes (TELEPRESENCE_MOUNTS), at the pod's path under `mount_root`."""
    if not local_mount:
        return []
    root = mount_root.rstrip("/")
    pairs = []
    for path in filter(None, environment.get("TELEPRESENCE_MOUNTS", "").split(":")):
        if not path.startswith("/") or "/../" in f"{path}/" or "," in path:
            log.warning("not mounting the volume path %r in the container", path)
            continue
        pairs.append((f"{local_mount.rstrip('/')}{path}", f"{root}{path}"))
    return pairs


def container_environment(
    environment: Mapping[str, str], local_mount: str, mount_root: str
) -> dict[str, str]:
    """The pod's environment as the container sees it: every variable (the container stands in
    for the pod's), TELEPRESENCE_ROOT where the volumes are inside it."""
    env = {k: v for k, v in environment.items() if k and "=" not in k and "\0" not in k + v}
    if local_mount:
        env["TELEPRESENCE_ROOT"] = mount_root.rstrip("/") or "/"
    return env


def _env_file_line_ok(name: str, value: str) -> bool:
    """Whether docker's --env-file reads this back as NAME=value (it cuts lines, trims the
    line's start and refuses names with blanks)."""
    return (
        not any(c in value for c in "\n\r")
        and not any(c.isspace() for c in name)
        and (not name.startswith("#"))
    )


def prepare(
    run: DockerRun,
    *,
    image: str,
    environment: Mapping[str, str],
    local_mount: str,
    network: str,
    engagement: str,
    found: engines.Engine,
) -> Prepared:
    """The `docker run` for `run` with `image` (built or given)."""
    cli = docker_cli()
    flags, _, args = split_run_args(run.args)
    check_flags(flags)
    name = ""
    for index, flag in enumerate(flags):
        if flag == "--name" and index + 1 < len(flags):
            name = flags[index + 1]
        elif flag.startswith("--name="):
            name = flag.split("=", 1)[1]
    suffix = secrets.token_hex(3)
    if not name:
        base = "".join(c if c.isalnum() or c in "_.-" else "-" for c in engagement) or "run"
        name = f"tele-{base[:40]}-{suffix}"
        flags = ["--name", name, *flags]
    argv = [cli, "--host", found.host, *_tls_flags(found), "run", *flags]
    argv += ["--label", f"{LABEL}={engagement or '-'}"]
    if not _has_flag(flags, _NETWORK_FLAGS):
        argv += ["--network", network]

    cli_env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "DOCKER_CONTEXT")}
    pod_env = container_environment(environment, local_mount, run.mount_root)
    prepared = Prepared(argv, cli_env, name, found)
    lines = []
    for key, value in sorted(pod_env.items()):
        if _env_file_line_ok(key, value):
            lines.append(f"{key}={value}\n")
        elif key.startswith(_CLI_ENV_NAMES) or key.startswith(("LD_", "GCONV_")):
            prepared.notes.append(key)
        else:
            argv += ["--env", key]
            cli_env[key] = value
    prepared.env_lines = lines
    for source, target in container_mounts(environment, local_mount, run.mount_root):
        argv += ["--mount", f"type=bind,source={source},target={target}"]
    argv += [image, *args]
    return prepared


def _tls_flags(found: engines.Engine) -> list[str]:
    if found.tls_dir is None:
        return []
    flags = ["--tlsverify" if found.tls_verify else "--tls"]
    for flag, file in (
        ("--tlscacert", "ca.pem"),
        ("--tlscert", "cert.pem"),
        ("--tlskey", "key.pem"),
    ):
        if (found.tls_dir / file).is_file():
            flags += [flag, str(found.tls_dir / file)]
    return flags


def build(client: docker.DockerClient, directory: str, options: Sequence[str], echo: Any) -> str:
    """`docker build DIR` with --docker-build-opt KEY=VALUE options; the image id. `echo`
    gets each line of the build's output."""
    import docker.errors

    if not Path(directory).is_dir():
        raise UserError(f"--docker-build {directory!r} is not a directory.")
    kwargs: dict[str, Any] = {"path": directory, "rm": True, "decode": True}
    build_args: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in BUILD_OPTIONS:
            raise UserError(
                f"--docker-build-opt {option!r} must be KEY=VALUE with KEY one of "
                f"{', '.join(BUILD_OPTIONS)}."
            )
        if key == "build-arg":
            name, sep, arg = value.partition("=")
            if not sep:
                raise UserError(f"--docker-build-opt build-arg={value} must be NAME=VALUE.")
            build_args[name] = arg
        elif key in ("pull", "no-cache"):
            kwargs["nocache" if key == "no-cache" else "pull"] = value.lower() in ("true", "1")
        elif key == "file":
            kwargs["dockerfile"] = value
        else:
            kwargs[key] = value
    if build_args:
        kwargs["buildargs"] = build_args
    image_id = ""
    tail: list[str] = []
    try:
        for chunk in client.api.build(**kwargs):
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                detail = str(chunk.get("error") or "").strip()
                raise UserError(f"docker build {directory} failed: {detail[:500].rstrip('.')}.")
            text = str(chunk.get("stream") or "")
            for line in text.splitlines():
                if line.strip():
                    tail = [*tail[-20:], line]
                    echo(line)
            aux = chunk.get("aux")
            if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
                image_id = aux["ID"]
    except docker.errors.APIError as exc:
        why = str(exc.explanation or exc).rstrip(".")
        raise UserError(f"docker build {directory} failed: {why}.") from exc
    if not image_id:
        raise UserError(f"docker build {directory} named no image: {' '.join(tail[-3:])}.")
    return image_id


def resolve_image(run: DockerRun, client: docker.DockerClient, echo: Any) -> DockerRun:
    """`run` with IMAGE replaced by the image --docker-build made (nothing to do without it)."""
    if not run.build:
        split_run_args(run.args)  # an image is named: check before engaging
        return run
    flags, image, args = split_run_args(run.args)
    if image != IMAGE_PLACEHOLDER:
        raise UserError(
            f"With --docker-build, write {IMAGE_PLACEHOLDER} where the image goes: "
            f"--docker-build {run.build} -- [FLAGS] {IMAGE_PLACEHOLDER} [ARGS]."
        )
    built = build(client, run.build, run.build_opts, echo)
    return DockerRun((*flags, "--", built, *args), "", (), run.mount_root)


def remove(client: docker.DockerClient, name: str) -> None:
    """Remove the container `name` (running or not); gone already is fine."""
    import docker.errors

    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: its removal is already in progress
            log.warning("could not remove the container %s: %s", name, exc)


@contextlib.contextmanager
def running(prepared: Prepared, client: docker.DockerClient) -> Iterator[list[str]]:
    """The docker CLI's argv with `--env-file /dev/fd/N`, a pipe a thread fills with the pod's
    variables; the container is removed and the pipe closed at the end, whatever happened."""
    import threading

    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    data = "".join(prepared.env_lines).encode()

    def feed() -> None:
        with contextlib.suppress(OSError), os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=feed, daemon=True, name="tele-docker-env")
    writer.start()
    at = prepared.argv.index("run") + 1
    argv = [*prepared.argv[:at], "--env-file", f"/dev/fd/{read_end}", *prepared.argv[at:]]
    try:
        yield argv
    finally:
        os.close(read_end)  # a writer still blocked (the CLI never read) gets EPIPE and ends
        writer.join(5)
        remove(client, prepared.name)


def _pipe_fds(argv: list[str]) -> tuple[int, ...]:
    return tuple(int(a.removeprefix("/dev/fd/")) for a in argv if a.startswith("/dev/fd/"))


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(prepared: Prepared, client: docker.DockerClient) -> int:
    """Run the container in the foreground; its exit status (125: docker could not run it).
    SIGTERM is taken as Ctrl-C: the container is removed and the caller leaves."""
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        with running(prepared, client) as argv:
            try:
                return subprocess.run(
                    argv, env=prepared.env, check=False, pass_fds=_pipe_fds(argv)
                ).returncode
            except OSError as exc:
                raise UserError(f"Cannot run {prepared.argv[0]}: {exc.strerror or exc}.") from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
