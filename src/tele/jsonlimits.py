"""Bounds on JSON a peer sends, checked before any decoder sees it.

Decoders recurse per nesting level (the stdlib's and msgspec's alike): 100,000 `[` raise
RecursionError, which a handler that expects ValueError lets through. `check_depth` rejects
such a document in time linear in its size, without recursion.
"""

from __future__ import annotations

import re
from typing import Final

MAX_DEPTH: Final = 64
"""Nesting deeper than any Kubernetes object or tele message (a pod is ~10 levels)."""

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_REDUCTIONS = 8
"""Passes that drop innermost `[]` pairs at C speed before the counting loop (a flat
`[][][]...` of megabytes collapses in one)."""


class TooDeep(ValueError):
    """The document nests deeper than allowed (or its brackets do not match)."""


def check_depth(data: bytes | bytearray | memoryview, max_depth: int = MAX_DEPTH) -> None:
    """Raise TooDeep when `data`, read as JSON, nests deeper than `max_depth` arrays/objects.

    Strings are skipped (brackets inside them do not count). Not a validator: a document that
    passes may still be invalid JSON for the decoder to reject."""
    # Objects and arrays nest alike: count both as `[`...`]`.
    brackets = _STRINGS.sub(b"", bytes(data)).translate(_BRACKETS_ONLY, _NOT_BRACKETS)
    if len(brackets) <= max_depth:
        return
    passes = 0  # a pass removes exactly the innermost level: what remains is that much shallower
    while brackets and passes < _REDUCTIONS:
        reduced = brackets.replace(b"[]", b"")
        if len(reduced) == len(brackets):
            break
        brackets = reduced
        passes += 1
    depth = passes
    for byte in brackets:
        if byte == 0x5B:  # [
            depth += 1
            if depth > max_depth:
                break
        else:
            depth -= 1
    if depth > max_depth:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels")
