"""The HTTP filters of an engagement, one implementation for every side: the CLI parses the
flags (`parse_header`), the CLI and the manager refuse a filter that could not match (`problem`,
so that no engagement is reported ACTIVE that takes no request), the agent matches requests
with the same rules (`RequestFilter`), and `describe` is how status, list and intercept show one.

Semantics (reference §8): `--http-header` filters are ANDed, each `K=V` or `K: V` with the name
case-insensitive and the value exact or a `*` glob (`*` matches any run of characters); a header
sent several times matches if any of its values does. `--http-path-equal|prefix|regex` filters
are ORed with each other and ANDed with the headers; paths start with `/` and are matched
without the query string, a regex anywhere in the path (anchor it with ^…$ to match the whole
path). An engagement with no filter takes every request.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_header(text: str) -> tuple[str, str]:
    """`NAME=VALUE` or `NAME: VALUE` (Telepresence's two forms; the first `=` or `:` separates)
    -> (lower-case name, value); ValueError (one sentence naming the flag) otherwise."""
    cuts = [i for i in (text.find("="), text.find(":")) if i > 0]
    name, value = (text[: min(cuts)], text[min(cuts) + 1 :]) if cuts else ("", "")
    if not name.strip():
        raise ValueError(f"--http-header {text!r} must look like NAME=VALUE or 'NAME: VALUE'")
    return name.strip().lower(), value.strip()


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


def _glob(value: str) -> re.Pattern[bytes]:
    parts = (re.escape(p.encode()) for p in value.split("*"))
    return re.compile(b".*".join(parts), re.DOTALL)


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """One engagement's filters, compiled (`compile`), matching requests (`matches`)."""

    headers: tuple[tuple[bytes, re.Pattern[bytes]], ...] = ()
    path_equal: frozenset[str] = frozenset()
    path_prefix: tuple[str, ...] = ()
    path_regex: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def compile(
        cls,
        headers: Sequence[tuple[str, str]],
        path_equal: Sequence[str] = (),
        path_prefix: Sequence[str] = (),
        path_regex: Sequence[str] = (),
    ) -> RequestFilter:
        """ValueError with `problem`'s sentence for filters that could not match."""
        refused = problem(headers, path_equal, path_prefix, path_regex)
        if refused:
            raise ValueError(refused)
        return cls(
            headers=tuple((name.lower().encode(), _glob(value)) for name, value in headers),
            path_equal=frozenset(path_equal),
            path_prefix=tuple(path_prefix),
            path_regex=tuple(re.compile(p) for p in path_regex),
        )

    def matches(self, path: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """`path` is the request target (query string included or not); names in lower case."""
        for name, pattern in self.headers:
            if not any(n == name and pattern.fullmatch(v) for n, v in headers):
                return False
        if not (self.path_equal or self.path_prefix or self.path_regex):
            return True
        path = path.split("?", 1)[0]
        return (
            path in self.path_equal
            or any(path.startswith(p) for p in self.path_prefix)
            or any(r.search(path) for r in self.path_regex)
        )
