"""The image `tele connect --docker` runs the daemon from: tele's image with sshfs (for the
pod's volumes; tele.image.build's daemon image, loaded into the engine from its archive) plus
what only the laptop side loads (kubernetes for the kubeconfig, pyroute2 for the TUN device,
dnslib for its DNS server and what they need, as wheels for the image's Python 3.11), run as
root with `python -m tele.docker.relay` as its entry point. Tagged by the digest of what went
in, so an engine that has it skips the build.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tele.errors import UserError

if TYPE_CHECKING:
    import docker

DAEMON_ONLY = frozenset({"kubernetes", "pyroute2", "dnslib"})
"""Distributions tele's cluster image leaves out and the daemon needs."""
REPOSITORY = "tele/daemon"


def _extra_pins() -> dict[str, str]:
    from tele.image.build import IMAGE_EXCLUDED_DISTRIBUTIONS, resolved_dependencies

    cluster = resolved_dependencies()
    daemon = resolved_dependencies(excluded=IMAGE_EXCLUDED_DISTRIBUTIONS - DAEMON_ONLY)
    return {name: version for name, version in daemon.items() if name not in cluster}


def _pip_target(pins: dict[str, str], target: Path) -> None:
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    requirements = target.parent / "requirements.txt"
    requirements.write_text("".join(f"{k}=={v}\n" for k, v in sorted(pins.items())))
    argv = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--no-compile", "--only-binary=:all:", "--python-version", "3.11",
        "--implementation", "cp", "--abi", "cp311",
        *[arg for p in platforms for arg in ("--platform", p)],
        "--target", str(target), "-r", str(requirements),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise UserError(
            f"Could not run pip ({sys.executable}) for the daemon image's Python packages: "
            f"{exc.strerror or exc}."
        ) from exc
    if done.returncode != 0:
        raise UserError(
            "Could not fetch the daemon image's Python packages "
            f"({', '.join(sorted(pins))}): {done.stderr.strip()[-300:].rstrip('.')}."
        )


def ensure_daemon_image(client: docker.DockerClient, echo: Callable[[str], None]) -> str:
    """The daemon image's tag in the engine of `client`, built and loaded when missing."""
    import docker.errors

    from tele.image.archive import write_archive
    from tele.image.build import PYTHON, SITE_PACKAGES, build_daemon_image

    built = build_daemon_image()
    pins = _extra_pins()
    key = hashlib.sha256(
        "\n".join([built.image.digest, *(f"{k}=={v}" for k, v in sorted(pins.items()))]).encode()
    ).hexdigest()[:16]
    tag = f"{REPOSITORY}:{key}"
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    echo(f"Loading tele's image into the Docker engine and adding the daemon's packages ({tag})")
    with tempfile.TemporaryDirectory(prefix="tele-daemon-image-") as tmp:
        base_tag = f"{REPOSITORY}-base:{built.image.digest.removeprefix('sha256:')[:16]}"
        archive = Path(tmp) / "tele.tar"
        write_archive(archive, [(built.image, base_tag)])
        try:
            with archive.open("rb") as data:
                client.images.load(data)
        except docker.errors.APIError as exc:
            raise UserError(
                f"The Docker engine refused tele's image: {str(exc.explanation).rstrip('.')}."
            ) from exc
        context = Path(tmp) / "context"
        (context / "site").mkdir(parents=True)
        _pip_target(pins, context / "site")
        (context / "Dockerfile").write_text(
            f"FROM {base_tag}\n"
            f"COPY site/ /{SITE_PACKAGES}/\n"
            "USER 0:0\n"
            f'ENTRYPOINT ["{PYTHON}", "-m", "tele.docker.relay"]\n'
            'CMD ["--", "daemon", "run"]\n'
        )
        from tele.docker.run import build

        build(client, str(context), [f"tag={tag}"], lambda line: None)
    return tag
