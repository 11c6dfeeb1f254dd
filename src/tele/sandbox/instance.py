"""Sandbox instances on this machine: their state directory, the background process, start/stop.

Each instance has a name and a private directory `state_dir()/sandbox/<name>/` holding
`state.json` (pid, address), the `kubeconfig` and the CA. `start` spawns `python -m tele.sandbox
run` detached and waits for it to report readiness on a pipe; `stop` ends exactly that process
(checked by pid and command line) and removes the directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tele import paths
from tele.errors import ConnectionFailed, UserError

if TYPE_CHECKING:
    from ..image.assemble import BuiltImage
    from .oci_registry import RegistryInfo

log = logging.getLogger(__name__)

DEFAULT_NAME = "sandbox"
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,18}[a-z0-9])?$")


TOKEN_FILE = "tokens.csv"
"""The instance's static-token file (`tele sandbox kubeconfig --token` adds users to it)."""


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UserError(
            f"The sandbox name {name!r} is not valid: use 1-20 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit."
        )
    return name


def sandboxes_dir() -> Path:
    return paths.state_dir() / "sandbox"


def instance_dir(name: str) -> Path:
    return sandboxes_dir() / check_name(name)


def log_path(name: str) -> Path:
    return paths.logs_dir() / f"sandbox-{name}.log"


@dataclass
class Status:
    name: str
    running: bool
    pid: int | None = None
    server: str = ""
    kubeconfig: str = ""
    started: float | None = None
    registry: dict[str, Any] | None = None
    """The image registry: address, username, password, ca_file (None: it does not run)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "running": self.running,
            "pid": self.pid,
            "server": self.server,
            "kubeconfig": self.kubeconfig,
            "started": self.started,
            "registry": self.registry,
        }


def _is_our_process(pid: int, name: str) -> bool:
    """True when `pid` is a live `tele.sandbox run` process for `name` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    return "tele.sandbox" in args and "run" in args and name in args


def _read_state(name: str) -> dict[str, Any] | None:
    try:
        data = json.loads((instance_dir(name) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def status(name: str) -> Status:
    state = _read_state(name)
    kubeconfig = instance_dir(name) / "kubeconfig"
    if state is None:
        return Status(name, False)
    pid = int(state.get("pid") or 0)
    running = pid > 0 and _is_our_process(pid, name)
    return Status(
        name,
        running,
        pid if running else None,
        str(state.get("server", "")),
        str(kubeconfig) if kubeconfig.exists() else "",
        state.get("started"),
        state.get("registry") if running and isinstance(state.get("registry"), dict) else None,
    )


def list_names() -> list[str]:
    base = sandboxes_dir()
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and _NAME_RE.match(p.name))


def start(
    name: str, *, timeout: float = 30.0, progress: Callable[[str], None] | None = None
) -> Status:
    """Start the sandbox in the background unless it runs; return once its API answers."""
    current = status(name)
    if current.running:
        return current
    directory = instance_dir(name)
    if directory.exists():
        _stop_registry_leftover(directory)
        shutil.rmtree(directory)  # leftovers of a crashed run
    cleanup_namespaces(name)
    paths.ensure_private_dir(directory)
    paths.ensure_private_dir(paths.logs_dir())
    say = progress or (lambda _msg: None)
    if nodes_supported():
        # Before the process starts: a first build takes a minute, which its readiness
        # timeout is not meant to cover; it then only pushes from the cache.
        say("Preparing images (tele's and the sandbox's; cached after the first time)...")
        missing = build_images(say)
        if missing:
            say(f"The sandbox runs without its images: {missing}")
    say(f"Starting sandbox {name!r}...")
    read_fd, write_fd = os.pipe()
    logfile = open(log_path(name), "ab")  # noqa: SIM115 (handed to the child)
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tele.sandbox",
                "run",
                "--name",
                name,
                "--ready-fd",
                str(write_fd),
            ],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            pass_fds=(write_fd,),
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(write_fd)
        logfile.close()
    try:
        line = _read_line(read_fd, timeout, proc)
    finally:
        os.close(read_fd)
    if line is None:
        if proc.poll() is None:
            _terminate(proc.pid, name)
        raise ConnectionFailed(
            f"The sandbox {name!r} did not become ready within {timeout:.0f} s; "
            f"see {log_path(name)}."
        )
    say(f"API server ready at {json.loads(line)['server']}")
    return status(name)


def _read_line(fd: int, timeout: float, proc: subprocess.Popen[bytes]) -> str | None:
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], min(0.5, max(0.0, deadline - time.monotonic())))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return None  # the child closed the pipe without reporting: it failed
            data += chunk
            if b"\n" in data:
                return data.split(b"\n", 1)[0].decode()
        elif proc.poll() is not None:
            return None
    return None


def _terminate(pid: int, name: str, timeout: float = 10.0) -> None:
    if not _is_our_process(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_our_process(pid, name) or _zombie(pid):
            return
        time.sleep(0.05)
    if _is_our_process(pid, name):
        os.kill(pid, signal.SIGKILL)


def nodes_supported() -> bool:
    """Pods need root, iproute2 and nftables; without them the sandbox serves the API only."""
    return os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("nft"))


def laptop_netns(name: str) -> str:
    return f"{name}-laptop"


def cleanup_namespaces(name: str) -> None:
    """Remove the containers, their mounts and cgroups, and the network namespaces (and what
    runs in them) of sandbox `name`, e.g. after a crash of its process."""
    if nodes_supported():
        from .kubelet.runtime import cleanup_sync as cleanup_containers
        from .network.relay import cleanup_sync

        cleanup_containers(name, instance_dir(name) / "node" / "containers")
        cleanup_sync(name)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def stop(name: str) -> bool:
    """Stop the sandbox and remove its state; False when it was not running."""
    current = status(name)
    if current.running and current.pid:
        _terminate(current.pid, name)
    cleanup_namespaces(name)
    directory = instance_dir(name)
    if directory.exists():
        _stop_registry_leftover(directory)
        shutil.rmtree(directory)
    return current.running


def _stop_registry_leftover(directory: Path) -> None:
    from .oci_registry import stop_leftover

    stop_leftover(directory / "registry")


# --- the sandbox process itself -------------------------------------------------------------


def run(name: str, *, ready_fd: int | None = None, port: int = 0) -> None:
    """Run the sandbox in the foreground until SIGTERM/SIGINT (`tele sandbox run`)."""
    check_name(name)
    directory = paths.ensure_private_dir(instance_dir(name))
    import trio  # imported here: `tele sandbox status/down` stay quick without it

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    trio.run(_serve, name, directory, ready_fd, port)


async def _serve(name: str, directory: Path, ready_fd: int | None, port: int) -> None:
    import trio
    import yaml

    from .apiserver.certs import CertificateAuthority, KeyPair
    from .cluster import serve_cluster
    from .oci_registry import registry_available

    ca_cert, ca_key = directory / "ca.crt", directory / "ca.key"
    if ca_cert.exists() and ca_key.exists():
        ca = CertificateAuthority.load(KeyPair(ca_cert.read_bytes(), ca_key.read_bytes()))
    else:
        ca = CertificateAuthority.create(f"tele-sandbox-{name}-ca")
        _write_private(ca_key, ca.pair.key_pem)
        ca_cert.write_bytes(ca.cert_pem)
    state_file = directory / "state.json"
    tokens = directory / TOKEN_FILE
    tokens.unlink(missing_ok=True)  # a new cluster: the last one's users are gone
    started = time.monotonic()
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nodes = nodes_supported()
                registry_dir = directory / "registry" if registry_available() is None else None
                images: _Images | None = None
                if registry_dir is not None and nodes:
                    # Found in the cache and laid into the registry's storage while the
                    # registry, the API server and the node start.
                    images = _Images()
                    nursery.start_soon(images.prepare, registry_dir / "data")
                info = await nursery.start(
                    lambda **kw: serve_cluster(
                        name,
                        ca=ca,
                        port=port,
                        nodes=nodes,
                        state_dir=directory / "node",
                        registry_dir=registry_dir,
                        token_file=tokens,
                        **kw,
                    )
                )
                if info.registry is not None and images is not None:
                    await images.publish(info.registry)
                if nodes:
                    from .network.laptop import serve_laptop

                    assert info.api_server is not None
                    await nursery.start(
                        serve_laptop,
                        name,
                        info.host,
                        info.port,
                        info.api_server.serve_listeners,
                    )
                kubeconfig = directory / "kubeconfig"
                _write_private(
                    kubeconfig, yaml.safe_dump(info.kubeconfig(), sort_keys=False).encode()
                )
                state = {
                    "pid": os.getpid(),
                    "server": info.server,
                    "started": time.time(),
                    "kubeconfig": str(kubeconfig),
                    "laptop": laptop_netns(name) if nodes else "",
                    "registry": info.registry.to_json() if info.registry else None,
                }
                _write_private(state_file, json.dumps(state).encode())
                log.info(
                    "sandbox %s ready at %s (%.2f s)", name, info.server, time.monotonic() - started
                )
                if ready_fd is not None:
                    os.write(ready_fd, json.dumps(state).encode() + b"\n")
                    os.close(ready_fd)
                async for _ in signals:
                    log.info("sandbox %s stopping", name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        state_file.unlink(missing_ok=True)


class _Images:
    """tele's and the sandbox's images (built or cached) for the sandbox registry.

    A failure (no network for a first build, say) leaves the sandbox up without them: the log
    says why, and pods that need them report ErrImagePull.
    """

    def __init__(self) -> None:
        import trio

        self.done = trio.Event()
        self.images: list[tuple[BuiltImage, list[str]]] = []

    async def prepare(self, storage: Path) -> None:
        import trio

        from tele.errors import TeleError

        from .publish import sandbox_images, seed

        try:
            start = time.monotonic()
            self.images = await trio.to_thread.run_sync(sandbox_images)
            found = time.monotonic()
            placed = await trio.to_thread.run_sync(seed, storage, self.images)
            log.info(
                "sandbox images: %d found in the cache (%.2f s), %d names laid into the "
                "registry's storage (%.2f s)",
                len(self.images),
                found - start,
                placed,
                time.monotonic() - found,
            )
        except TeleError as exc:
            log.warning("sandbox images not published: %s", exc)
        except OSError as exc:
            log.warning("sandbox images not laid into the registry's storage (pushed): %s", exc)
        finally:
            self.done.set()

    async def publish(self, registry: RegistryInfo) -> None:
        from tele.errors import TeleError

        from .publish import publish

        await self.done.wait()
        if not self.images:
            return
        try:
            await publish(registry, self.images)
        except TeleError as exc:
            log.warning("sandbox images not published: %s", exc)


def build_images(progress: Callable[[str], None] | None = None) -> str | None:
    """Build (or find cached) the images the sandbox serves, before it starts; None when done,
    else why not (the sandbox then runs without them)."""
    from tele.errors import TeleError

    from .oci_registry import registry_available
    from .publish import sandbox_images

    if registry_available() is not None:
        return f"no image registry: {registry_available()} is missing"
    if not nodes_supported():
        return "no node runs pods here (the sandbox serves the API only)"
    say = progress or (lambda _msg: None)
    start = time.monotonic()
    try:
        images = sandbox_images()
    except TeleError as exc:
        return str(exc)
    took = time.monotonic() - start
    if took > 2:
        say(f"Built {len(images)} images in {took:.0f} s (cached from now on)")
    return None


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
