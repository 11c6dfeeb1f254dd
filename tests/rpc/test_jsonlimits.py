"""The JSON depth bound every peer-fed decoder checks first (tele.jsonlimits)."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tele.jsonlimits import MAX_DEPTH, TooDeep, check_depth


def nested(depth: int) -> bytes:
    """Objects and arrays in turn, `depth` deep, with brackets in strings at every level."""
    head = b"".join(b'{"s": "[[[{", "k": ' if level % 2 == 0 else b"[" for level in range(depth))
    tail = b"".join(b"}" if level % 2 == 0 else b"]" for level in reversed(range(depth)))
    return head + b"1" + tail


@pytest.mark.parametrize("depth", [1, 10, MAX_DEPTH - 1, MAX_DEPTH])
def test_documents_up_to_the_limit_pass(depth: int) -> None:
    json.loads(nested(depth))
    check_depth(nested(depth))
    check_depth(nested(depth) * 1000)  # many of them side by side: depth, not size


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_deeper_documents_are_refused(depth: int) -> None:
    with pytest.raises(TooDeep):
        check_depth(nested(depth))


def test_brackets_in_strings_do_not_count() -> None:
    check_depth(json.dumps(["[" * 10_000, '\\"{' * 1000]).encode())


def test_the_attack_is_refused_before_a_decoder_recurses() -> None:
    attack = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):
        msgspec.json.decode(attack)
    with pytest.raises(TooDeep):
        check_depth(attack)


documents = st.recursive(
    st.none() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(documents, st.integers(min_value=0, max_value=8))
def test_the_bound_matches_the_real_depth(value: object, limit: int) -> None:
    data = json.dumps(value).encode()
    if depth_of(value) <= limit:
        check_depth(data, limit)
    else:
        with pytest.raises(TooDeep):
            check_depth(data, limit)
