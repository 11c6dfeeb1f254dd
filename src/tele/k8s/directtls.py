"""The data phase of an established trio `SSLStream` driven on its `ssl.SSLObject`, memory BIOs
and socket directly: a port-forward's reads and writes, on both ends (the daemon's client, the
sandbox API server's websocket).

trio's SSLStream gives one TLS record (16 KiB at most) per `receive_some`, each through its
retry loop with its locks and conflict detectors, and reads the socket 64 KiB at a time: with
the records decrypted in one go (`more_decrypted`) a relay still spent ~0.9 ms of CPU per MB
where the same loop on the SSLObject spends ~0.5 (decryption itself ~0.28, measured on this
machine). `DirectTLS` reads the socket 256 KiB at a time and decrypts every whole record it
holds; a write is one `SSLObject.write` and one socket send. Ciphertext the TLS layer wants to
send after a read (a TLS 1.3 KeyUpdate answer) goes out behind the same lock as the writes, in
the order it was made.

It reaches into SSLStream's private attributes (`_ssl_object`, `_incoming`, `_outgoing`):
`DirectTLS.of` checks their types and returns None when a trio version keeps them otherwise
(the caller then uses the stream as it is). Only used once the handshake is done and while
nothing else drives the SSLStream; closing still goes through the stream (`aclose`).
"""

from __future__ import annotations

import ssl
from typing import Final

import trio

SOCKET_READ: Final = 256 * 1024
"""Bytes of ciphertext per socket read."""
RECORD: Final = 16 * 1024
"""Largest plaintext of one TLS record: what one `SSLObject.read` can return."""


class DirectTLS:
    """Reads and writes of one established TLS connection (see the module). One reader and
    one writer at a time, as for a trio Stream; errors come out as trio's stream errors."""

    def __init__(
        self,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        transport: trio.abc.Stream,
        delayed: bytes = b"",
    ) -> None:
        self._tls = tls
        # Ciphertext trio held back to go before the first write (a TLS 1.3 server's session
        # tickets: trio delays them until then, for OpenSSL's sake).
        self._delayed = delayed
        self._incoming = incoming
        self._outgoing = outgoing
        self._transport = transport
        self._send_lock = trio.StrictFIFOLock()
        self._eof = False
        self._broken = False  # a send failed part way: the TLS stream cannot go on

    @classmethod
    def of(cls, stream: trio.abc.Stream) -> DirectTLS | None:
        """For a trio SSLStream whose handshake is done; None for anything else."""
        if not isinstance(stream, trio.SSLStream):
            return None
        tls = getattr(stream, "_ssl_object", None)
        incoming = getattr(stream, "_incoming", None)
        outgoing = getattr(stream, "_outgoing", None)
        delayed = getattr(stream, "_delayed_outgoing", None)
        if not (
            isinstance(tls, ssl.SSLObject)
            and isinstance(incoming, ssl.MemoryBIO)
            and isinstance(outgoing, ssl.MemoryBIO)
            and (delayed is None or isinstance(delayed, bytes))
        ):
            return None
        if delayed is not None:
            stream._delayed_outgoing = None  # ours to send now, ahead of anything else
        return cls(tls, incoming, outgoing, stream.transport_stream, delayed or b"")

    async def receive_some(self, limit: int) -> bytes:
        """Plaintext: what the TLS layer holds already, else one socket read's worth, up to
        about `limit` bytes (whole records); b"" at the end of the connection (a close_notify
        or the peer's FIN: https-compatible, as the SSLStreams here are)."""
        parts: list[bytes] = []
        size = 0
        tls = self._tls
        while size < limit:
            try:
                piece = tls.read(RECORD)
            except ssl.SSLWantReadError:
                if parts or self._eof:
                    break
                if self._outgoing.pending:
                    await self._flush()
                data = await self._transport.receive_some(SOCKET_READ)
                if not data:
                    self._eof = True
                    self._incoming.write_eof()
                else:
                    self._incoming.write(data)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                break
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            if not piece:
                self._eof = True
                break
            parts.append(piece)
            size += len(piece)
        if self._outgoing.pending:  # made by the reads (a KeyUpdate's answer, an alert)
            try:
                await self._flush()
            except trio.BrokenResourceError:
                if not self._eof:
                    raise  # at the end, the peer is gone: what it has not read is moot
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send `data`."""
        if self._broken:
            raise trio.BrokenResourceError("an earlier send on this TLS connection failed")
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        await self._flush()

    async def _flush(self) -> None:
        """Send the ciphertext made so far, in the order it was made (a FIFO lock, taken in the
        same step as the bytes are taken from the BIO)."""
        if not (self._outgoing.pending or self._delayed):
            return
        lock = self._send_lock
        if lock.locked():
            data = self._take_output()
            await lock.acquire()
        else:
            lock.acquire_nowait()
            data = self._take_output()
        try:
            if data:
                await self._transport.send_all(data)
        except BaseException:
            self._broken = True  # some of the ciphertext may have gone: nothing can follow it
            raise
        finally:
            lock.release()

    def _take_output(self) -> bytes:
        data = self._outgoing.read()
        if self._delayed:
            data, self._delayed = self._delayed + data, b""
        return data
