"""TCP header codec (RFC 9293) with the options this stack reads and writes.

Options understood: MSS, window scale (RFC 7323), SACK-permitted and SACK blocks (RFC 2018),
timestamps (RFC 7323). Unknown options, and known ones with a wrong length, are skipped the way
Linux skips them; a length byte that runs past the header is an integrity error. Writing emits
the known options in Linux's order, padded with EOL to a multiple of 4 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeAlias

from tele.net.errors import IntegrityError, SanityError

TCP_HEADER_LEN = 20
MAX_OPTIONS_LEN = 40

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMPS = 8

_TCP = struct.Struct("!HHIIBBHHH")
_MSS = struct.Struct("!BBH")
_TS = struct.Struct("!BBII")
_BLOCK = struct.Struct("!II")

_FLAG_NAMES = ((FIN, "F"), (SYN, "S"), (RST, "R"), (PSH, "P"), (ACK, "A"), (URG, "U"))


@dataclass(frozen=True, slots=True)
class TCPHeader:
    """A TCP header. `checksum` is whatever the wire said (or 0 before a builder fills it)."""

    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    checksum: int = 0
    urgent: int = 0
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamps: tuple[int, int] | None = None
    sack: tuple[tuple[int, int], ...] = ()

    @property
    def header_length(self) -> int:
        if not _has_options(self):
            return TCP_HEADER_LEN
        return TCP_HEADER_LEN + len(self.options_bytes())

    def flag_names(self) -> str:
        """Flags as in tcpdump ("S", "SA", "FA", "R" ...), for logs and test messages."""
        return "".join(name for bit, name in _FLAG_NAMES if self.flags & bit) or "."

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> TCPHeader:
        """Parse the header at the start of `buf`; the payload is `buf[header_length:]`.

        The checksum needs the IP pseudo-header and is checked by `tele.net.packet`.
        """
        # Integrity: the header and its options fit the buffer.
        if len(buf) < TCP_HEADER_LEN:
            raise IntegrityError(f"TCP: {len(buf)} bytes is shorter than a header")
        sport, dport, seq, ack, off, flags, window, csum, urgent = _TCP.unpack_from(buf)
        header_length = (off >> 4) * 4
        if header_length < TCP_HEADER_LEN or header_length > len(buf):
            raise IntegrityError(f"TCP: data offset {header_length} outside 20..{len(buf)}")
        # Parse the options (their lengths are part of the integrity check).
        options = _parse_options(buf, header_length) if header_length > TCP_HEADER_LEN else None
        # Sanity: values no real stack sends.
        if sport == 0 or dport == 0:
            raise SanityError("TCP: port 0")
        if flags & SYN and flags & (FIN | RST):
            raise SanityError("TCP: SYN combined with FIN or RST")
        if options is None:
            return cls(sport, dport, seq, ack, flags, window, csum, urgent)
        return cls(sport, dport, seq, ack, flags, window, csum, urgent, *options)

    def options_bytes(self) -> bytes:
        """The options as written on the wire, padded to a multiple of 4 bytes."""
        parts: list[bytes] = []
        if self.mss is not None:
            parts.append(_MSS.pack(OPT_MSS, 4, self.mss))
        if self.timestamps is not None:
            head = b"\x04\x02" if self.sack_permitted else b"\x01\x01"
            parts.append(head + _TS.pack(OPT_TIMESTAMPS, 10, *self.timestamps))
        elif self.sack_permitted:
            parts.append(b"\x01\x01\x04\x02")
        if self.wscale is not None:
            parts.append(bytes((OPT_NOP, OPT_WSCALE, 3, self.wscale)))
        if self.sack:
            parts.append(bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(self.sack))))
            parts.extend(_BLOCK.pack(left, right) for left, right in self.sack)
        options = b"".join(parts)
        if len(options) > MAX_OPTIONS_LEN:
            raise ValueError(f"TCP options need {len(options)} bytes, more than 40")
        if len(options) & 3:
            options += b"\x00" * (4 - (len(options) & 3))
        return options

    def __bytes__(self) -> bytes:
        options = self.options_bytes() if _has_options(self) else b""
        off = (TCP_HEADER_LEN + len(options)) << 2
        fixed = _TCP.pack(
            self.sport,
            self.dport,
            self.seq,
            self.ack,
            off,
            self.flags,
            self.window,
            self.checksum,
            self.urgent,
        )
        return fixed + options


def _has_options(h: TCPHeader) -> bool:
    return (
        h.mss is not None
        or h.wscale is not None
        or h.sack_permitted
        or h.timestamps is not None
        or bool(h.sack)
    )


_Options: TypeAlias = tuple[
    int | None, int | None, bool, tuple[int, int] | None, tuple[tuple[int, int], ...]
]


def _parse_options(buf: bytes | bytearray | memoryview, end: int) -> _Options:
    """(mss, wscale, sack_permitted, timestamps, sack) from the options before `end`."""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted = False
    timestamps: tuple[int, int] | None = None
    sack: tuple[tuple[int, int], ...] = ()
    i = TCP_HEADER_LEN
    while i < end:
        kind = buf[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise IntegrityError(f"TCP: option {kind} has no length byte")
        length = buf[i + 1]
        if length < 2 or i + length > end:
            raise IntegrityError(f"TCP: option {kind} length {length} runs past the header")
        if kind == OPT_MSS and length == 4:
            mss = _MSS.unpack_from(buf, i)[2]
        elif kind == OPT_WSCALE and length == 3:
            wscale = buf[i + 2]
        elif kind == OPT_SACK_PERMITTED and length == 2:
            sack_permitted = True
        elif kind == OPT_TIMESTAMPS and length == 10:
            _, _, tsval, tsecr = _TS.unpack_from(buf, i)
            timestamps = (tsval, tsecr)
        elif kind == OPT_SACK and length >= 10 and (length - 2) % 8 == 0:
            sack = tuple(_BLOCK.iter_unpack(bytes(buf[i + 2 : i + length])))
        i += length
    return mss, wscale, sack_permitted, timestamps, sack
