"""The HTTP filters of an engagement as every side reads them: the CLI and the manager refuse a
filter the agent could not use (so that no engagement is reported ACTIVE that cannot match a
request), and `describe` is how status, list and intercept output show one.

Semantics are the agent's (tele.agent.matching): headers `NAME=VALUE` or `NAME: VALUE` with a
valid header name, paths as exact, prefix or Python regex.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def problem(
    headers: Sequence[tuple[str, str]],
    path_equal: Sequence[str] = (),
    path_prefix: Sequence[str] = (),
    path_regex: Sequence[str] = (),
) -> str:
    """Why these filters cannot be used (one sentence, the flag named), or "" when they can."""
    for name, _ in headers:
        if not _HEADER_NAME.fullmatch(name):
            return f"--http-header {name!r} is not a valid header name"
    for path in (*path_equal, *path_prefix):
        if not path.startswith("/"):
            flag = "--http-path-equal" if path in path_equal else "--http-path-prefix"
            return f"{flag} {path!r} must start with /"
    for pattern in path_regex:
        try:
            re.compile(pattern)
        except re.error as exc:
            where = f"at position {exc.pos}"
            return f"--http-path-regex {pattern!r} does not compile: {exc.msg} {where}"
    return ""


def describe(
    mechanism: str,
    headers: Sequence[tuple[str, str]],
    path_equal: Sequence[str] = (),
    path_prefix: Sequence[str] = (),
    path_regex: Sequence[str] = (),
) -> str:
    """`tcp`, `http (all requests)` or `http: header x-dev=me, path prefix /api`."""
    if mechanism != "http":
        return mechanism
    parts = [f"header {name}={value}" for name, value in headers]
    parts += [f"path {p}" for p in path_equal]
    parts += [f"path prefix {p}" for p in path_prefix]
    parts += [f"path regex {p}" for p in path_regex]
    return f"http: {', '.join(parts)}" if parts else "http (all requests)"
