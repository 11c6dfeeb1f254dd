"""Image references (`[registry/]repository[:tag][@digest]`) parsed and normalised as Docker does.

A name without a registry is on docker.io, and a one-component name there is under `library/`:
`busybox` is `docker.io/library/busybox`. `str()` gives the fully qualified form, which parses
back to the same reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidReference

DOCKER_HUB = "docker.io"
"""The registry a name without one refers to (its API lives at `registry-1.docker.io`)."""

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_NAME = 255
"""Docker's limit on the repository name (registry included)."""


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest, else the tag or latest."""
        return self.digest or self.tag or "latest"

    @property
    def familiar(self) -> str:
        """The short form people type: `busybox:1.36` for `docker.io/library/busybox:1.36`."""
        text = str(self)
        if self.registry == DOCKER_HUB:
            text = text.removeprefix(f"{DOCKER_HUB}/").removeprefix("library/")
        return text

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)


def parse_reference(text: str) -> Reference:
    """Parse an image name; raise `InvalidReference` (one sentence) when it is not one."""
    if not isinstance(text, str) or not text or len(text) > 4 * _MAX_NAME:
        raise InvalidReference(f"{text!r} is not a valid image name.")
    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise InvalidReference(
                f"{text!r} is not a valid image name: the digest must be sha256: and 64 "
                "lowercase hex digits."
            )
    tag: str | None = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(f"{text!r} is not a valid image name: bad tag {tag!r}.")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, repository = first, remainder
        if not _DOMAIN.fullmatch(registry):
            raise InvalidReference(
                f"{text!r} is not a valid image name: bad registry {registry!r}."
            )
    else:
        registry, repository = DOCKER_HUB, rest
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    components = repository.split("/")
    if not repository or not all(_PATH_COMPONENT.fullmatch(c) for c in components):
        raise InvalidReference(
            f"{text!r} is not a valid image name: the repository must be lowercase letters, "
            "digits and separators (. _ -) between /."
        )
    if len(registry) + 1 + len(repository) > _MAX_NAME:
        raise InvalidReference(f"{text!r} is not a valid image name: it is too long.")
    return Reference(registry, repository, tag, digest)
