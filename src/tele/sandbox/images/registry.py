"""Image name -> Python module of this venv, for the images that do not run from their image yet.

Every other image is pulled and run by runc. These still run as modules (tag and registry host
ignored) because their images lack something the module gets from this venv or this machine:
`tele-sandbox/worker` is used as a shell with this machine's tools (sh, curl, socat).
"""

from __future__ import annotations

IMAGES: dict[str, str] = {
    "tele-sandbox/worker": "tele.sandbox.images.worker",
}


def _repository(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def resolve(image: str, args: list[str] | None = None) -> str | None:
    """The module for `image` (run with `args`), or None when it runs from its image."""
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
