"""Request matching for http engagements (sans-IO): header globs, paths, AND/OR, errors; the
rules are tele.rpc.filters' (the same code the CLI and the manager refuse filters with)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tele.agent.errors import FilterError
from tele.agent.matching import Router, compile_filter
from tele.rpc import filters
from tele.rpc.agent_api import Engagement


def engagement(id: str = "e", **filters: object) -> Engagement:
    return Engagement(id=id, container="c", agent_port=9900, mechanism="http", **filters)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("x-user=anna", ("x-user", "anna")),
        ("X-User: anna", ("x-user", "anna")),
        ("x-env=a=b", ("x-env", "a=b")),
        ("x-url: http://a", ("x-url", "http://a")),
        ("x-any=", ("x-any", "")),
    ],
)
def test_header_filter_forms(text: str, parsed: tuple[str, str]) -> None:
    assert filters.parse_header(text) == parsed


@pytest.mark.parametrize("text", ["novalue", "=v"])
def test_bad_header_filters_are_one_sentence(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--http-header .* must look like NAME=VALUE"):
        filters.parse_header(text)


@pytest.mark.parametrize(
    ("bad", "sentence"),
    [
        ({"headers": [("bad name", "v")]}, "--http-header 'bad name' is not a valid header name"),
        ({"path_prefix": ["api"]}, "--http-path-prefix 'api' must start with /"),
        ({"path_regex": ["(["]}, "--http-path-regex '([' does not compile"),
    ],
)
def test_the_agent_refuses_what_the_cli_and_manager_refuse(
    bad: dict[str, object], sentence: str
) -> None:
    """One implementation: the agent's refusal is the CLI's sentence (it cannot drift)."""
    with pytest.raises(FilterError, match=f"^engagement e: {re.escape(sentence)}"):
        compile_filter(engagement(**bad))
    args = {"headers": [], **bad}
    assert filters.problem(**args).startswith(sentence)  # type: ignore[arg-type]


def test_headers_are_anded_case_insensitive_glob_any_value() -> None:
    f = compile_filter(engagement(headers=[("X-User", "dev-*"), ("x-team", "a*c")]))
    assert f.matches("/", [(b"x-user", b"dev-1"), (b"x-team", b"abc")])
    assert f.matches("/", [(b"x-user", b"ops"), (b"x-user", b"dev-"), (b"x-team", b"ac")])
    assert not f.matches("/", [(b"x-user", b"dev-1")])  # AND: x-team missing
    assert not f.matches("/", [(b"x-user", b"xdev-1"), (b"x-team", b"abc")])  # whole value
    exact = compile_filter(engagement(headers=[("x", "a.b")]))
    assert exact.matches("/", [(b"x", b"a.b")]) and not exact.matches("/", [(b"x", b"axb")])


def test_paths_are_ored_anded_with_headers_query_ignored() -> None:
    f = compile_filter(
        engagement(
            path_equal=["/a"], path_prefix=["/p/"], path_regex=[r"/v\d"], headers=[("h", "1")]
        )
    )
    h = [(b"h", b"1")]
    assert f.matches("/a?x=1", h) and f.matches("/p/q", h) and f.matches("/api/v2/x", h)
    assert not f.matches("/a/", h) and not f.matches("/p", h)
    assert not f.matches("/a", [])


def test_no_filter_takes_everything_and_bad_regex_takes_nothing() -> None:
    router = Router()
    everything, broken = engagement("all"), engagement("bad", path_regex=["("])
    with pytest.raises(FilterError, match="does not compile"):
        compile_filter(broken)
    assert router.route([broken, everything], "/x", []) is everything
    assert router.route([broken], "/x", []) is None
    tcp = Engagement(id="t", container="c", agent_port=9900)
    assert router.route([tcp], "/x", []) is None


def test_router_recompiles_a_changed_engagement() -> None:
    router = Router()
    assert router.route([engagement(path_equal=["/a"])], "/a", []) is not None
    assert router.route([engagement(path_equal=["/b"])], "/a", []) is None


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20))
def test_a_value_without_stars_matches_itself_only(value: str) -> None:
    f = compile_filter(engagement(headers=[("x", value.replace("*", ""))]))
    plain = value.replace("*", "").encode()
    assert f.matches("/", [(b"x", plain)])
    assert not f.matches("/", [(b"x", plain + b"!")])
