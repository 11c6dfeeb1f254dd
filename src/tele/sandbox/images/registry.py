"""Image name -> Python module run as the container's main program.

The sandbox pulls nothing: an image is known when it is listed here (tag and registry host are
ignored, so `ghcr.io/x/tele-sandbox/echo:1.2` is the echo image too). Other parts of tele register
their own images (manager, agent) with `register`.
"""

from __future__ import annotations

IMAGES: dict[str, str] = {
    "tele-sandbox/echo": "tele.sandbox.images.echo",
    "tele-sandbox/echo-tls": "tele.sandbox.images.echo",
    "tele-sandbox/l4-echo": "tele.sandbox.images.l4echo",
    "tele-sandbox/worker": "tele.sandbox.images.worker",
    "tele-sandbox/frontend": "tele.sandbox.images.frontend",
    # tele's own images: the Helm chart's manager and the injected agent (`agent`/`agent-init`).
    # tele's one image (manager by default, `agent`/`agent-init` by args), under both names.
    "tele/traffic-manager": "tele.sandbox.images.tele_image",
    "tele/traffic-agent": "tele.sandbox.images.tele_image",
}


def register(image: str, module: str) -> None:
    """Make `image` run `python -m module` (for tele's own images)."""
    IMAGES[_repository(image)] = module


def _repository(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def resolve(image: str) -> str | None:
    """The module for `image`, or None when the sandbox does not know it (ErrImagePull)."""
    repo = _repository(image)
    if repo in IMAGES:
        return IMAGES[repo]
    # Strip a registry host and any leading path segments one at a time.
    parts = repo.split("/")
    for i in range(1, len(parts)):
        module = IMAGES.get("/".join(parts[i:]))
        if module is not None:
            return module
    return None
