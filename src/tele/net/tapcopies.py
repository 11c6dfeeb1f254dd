"""The records of a wiretap's copy stream (sans-IO): the copies of many connections on one
tunnel stream, instead of a stream per copied connection.

An agent sends, for each connection it copies, OPEN, then DATA records (what passed), then END
(it passed whole: the local handler gets an end of stream) or DROP (the copy was dropped: the
handler's connection is reset). The client answers each copy with DONE (the handler got all of
it and its end) or FAILED (the handler was absent, too slow or broke it off), which the agent
counts. Every record is a 9-byte header (kind, copy id, payload length; network order) and
the payload; only DATA has one, of 1..MAX_DATA bytes.

A malformed record (an unknown kind, a length out of bounds for its kind) cannot be skipped
safely: `RecordReader.feed` raises `TapFrameError` and the stream ends (every copy on it is
dropped and counted; the app never waits on a copy). A well-formed record about a copy that is
not open, or an OPEN of one that is, ends that copy only (see tele.rpc.tapcopies).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

HEADER: Final = struct.Struct("!BII")
MAX_DATA: Final = 64 * 1024
"""Bytes of one DATA record (a copy's bytes go in records of at most this)."""


class Kind(IntEnum):
    OPEN = 1
    DATA = 2
    END = 3
    DROP = 4
    DONE = 5
    FAILED = 6


FROM_AGENT: Final = frozenset({Kind.OPEN, Kind.DATA, Kind.END, Kind.DROP})
FROM_CLIENT: Final = frozenset({Kind.DONE, Kind.FAILED})


class TapFrameError(ValueError):
    """A malformed record: the stream it came on cannot be read further."""


def record(kind: Kind, copy_id: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One record (DATA: 1..MAX_DATA bytes of payload; the other kinds: none)."""
    return HEADER.pack(kind, copy_id, len(payload)) + bytes(payload)


Record = tuple[Kind, int, bytes]


class RecordReader:
    """Records out of a stream's bytes, as they arrive; holds at most one record's bytes."""

    def __init__(self, kinds: frozenset[Kind]) -> None:
        self._kinds = kinds
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[Record]:
        """The records completed by `data`; raises TapFrameError on a malformed one."""
        self._buffer += data
        records: list[Record] = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= HEADER.size:
            code, copy_id, length = HEADER.unpack_from(buffer, start)
            if code not in self._kinds:
                raise TapFrameError(f"a wiretap copy record of an unexpected kind ({code})")
            kind = Kind(code)
            if (kind is Kind.DATA) != (length > 0) or length > MAX_DATA:
                raise TapFrameError(f"a wiretap {kind.name} record of {length} bytes")
            end = start + HEADER.size + length
            if len(buffer) < end:
                break
            records.append((kind, copy_id, bytes(buffer[start + HEADER.size : end])))
            start = end
        del buffer[:start]
        return records

    @property
    def partial(self) -> bool:
        """Whether a record was begun and not finished (at the stream's end: truncated)."""
        return bool(self._buffer)
