"""HTTP/2 flow control on consume, sans-IO: DATA received on one stream is held for its consumer,
and its credit (the WINDOW_UPDATE the peer waits for) is owed back only as it is read or thrown
away. A slow reader so holds at most the window it advertised; nothing here does I/O."""

from __future__ import annotations

from collections import deque


class ReceiveBuffer:
    """One stream's received DATA, in order, not yet read; `buffered` bytes of credit owed.

    Every byte `receive`d is owed back exactly once: the caller acknowledges the length of
    what `take` returns, and what `discard` returns (h2's `acknowledge_received_data`).
    """

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._buffered = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read: credit not yet returned to the peer."""
        return self._buffered

    def receive(self, data: bytes) -> None:
        """Hold DATA from the peer for the consumer. An empty DATA frame holds nothing: to a
        reader an empty read means the end of the stream, which only END_STREAM says."""
        if data:
            self._chunks.append(data)
            self._buffered += len(data)

    def take(self, limit: int) -> bytes:
        """Up to `limit` buffered bytes (some must be buffered); their length is the credit
        the caller now returns to the peer. Whole chunks are joined up to the limit; only the
        first is ever split."""
        chunks = self._chunks
        first = chunks[0]
        if len(first) >= limit:
            data = first[:limit]
            if len(first) == limit:
                chunks.popleft()
            else:
                chunks[0] = first[limit:]
        else:
            parts = [chunks.popleft()]
            size = len(first)
            while chunks and size + len(chunks[0]) <= limit:
                chunk = chunks.popleft()
                parts.append(chunk)
                size += len(chunk)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._buffered -= len(data)
        return data

    def discard(self) -> int:
        """Throw away what was not read; returns the credit the caller now returns."""
        credit = self._buffered
        self._chunks.clear()
        self._buffered = 0
        return credit
