"""The HPACK subset of tele's own header blocks: encoded and decoded without the dynamic table.

What tele sends on a stream's HEADERS (a tunnel OPEN and its ACCEPT/REFUSE, an RPC call and its
`:status 200`) is a few short ASCII fields. Here they are encoded as static-table entries and
literals *without indexing* (RFC 7541 6.1, 6.2.2), which every HPACK decoder accepts and which
neither read nor change the dynamic table, and decoded by a few lines of Python instead of
hpack's and h2's general path (~60 µs a block). The decoder is a whitelist: it answers only for
blocks of exactly the shapes h2 would accept with `validate_inbound_headers=True` (see
`decode_request` and `decode_response`) and returns None for anything else — a dynamic-table
reference or update, an unknown name, a value that is not plain printable ASCII, a misplaced or
repeated pseudo-header, a truncated field — which then goes h2's own way (`tele.net.h2conn`).
"""

from __future__ import annotations

import hpack.exceptions
import hpack.huffman_table
import hpack.table
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple

ACCEPTED_NAMES = frozenset(
    {
        ":method",
        ":scheme",
        ":authority",
        ":path",
        ":status",
        # tele.net.tunnel: OPEN and its answers
        "tele-protocol",
        "tele-session",
        "tele-dial-id",
        "tele-early",
        "tele-reason",
        "tele-detail",
        # tele.rpc.wire: a call's deadline, a trailers-only answer's status
        "tele-timeout",
        "tele-code",
        "tele-message",
    }
)
"""The header names a block may hold and be decoded here: what tele's tunnel and RPC send. None
of them is connection-specific, `te`, `host` or `content-length`, the names h2 checks further."""

_METHOD, _SCHEME, _AUTHORITY, _PATH, _STATUS = 1, 2, 4, 8, 16
_PSEUDO = {":method": _METHOD, ":scheme": _SCHEME, ":authority": _AUTHORITY, ":path": _PATH}
_PSEUDO[":status"] = _STATUS
_STATIC = hpack.table.HeaderTable.STATIC_TABLE  # (name, value) for indexes 1..61
_STATIC_LENGTH = len(_STATIC)
_STATIC_FIELDS: tuple[tuple[str, str] | None, ...] = (
    None,
    *(
        (name.decode(), value.decode()) if name.decode() in ACCEPTED_NAMES else None
        for name, value in _STATIC
    ),
)
"""Index -> (name, value) of the static entries whose name is accepted; None elsewhere."""
_STATIC_NAMES: tuple[str | None, ...] = tuple(
    field[0] if field else None for field in _STATIC_FIELDS
)
_NAMES = {name.encode(): name for name in ACCEPTED_NAMES}
_decode_huffman = hpack.huffman_table.decode_huffman
_HuffmanError = hpack.exceptions.HPACKDecodingError
_new_tuple = tuple.__new__

Fields = list[HeaderTuple]
"""Decoded headers as h2 hands them out with `header_encoding="utf-8"`: `HeaderTuple`s (a
`NeverIndexedHeaderTuple` for a field sent as never indexed) of two str."""


def _string(block: bytes, pos: int, end: int) -> tuple[bytes | None, int]:
    """The string literal at `pos` (RFC 7541 5.2) and where the next field starts."""
    if pos >= end:
        return None, pos
    first = block[pos]
    pos += 1
    length = first & 0x7F
    if length == 0x7F:
        shift = 0
        for _ in range(4):  # 127 + 2**28: past any frame, so a longer integer fails below too
            if pos >= end:
                return None, pos
            byte = block[pos]
            pos += 1
            length += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            return None, pos
    stop = pos + length
    if stop > end:
        return None, pos
    raw = block[pos:stop]
    if first & 0x80:
        try:
            raw = _decode_huffman(raw)
        except _HuffmanError:
            return None, pos
    return raw, stop


def _fields(block: bytes, limit: int) -> tuple[Fields, int, str, str, int] | None:
    """The block's fields if each is one this module takes, with the set of pseudo-headers it
    holds (bits), the value of `:method` (or `:status`) and of `:path`, and the list's size as
    hpack counts it; None otherwise.

    `limit` is the decoder's max_header_list_size, counted as hpack counts it (32 + name +
    value per field: these are all ASCII, so str lengths are byte lengths)."""
    fields: Fields = []
    size = 0
    pos = 0
    end = len(block)
    seen = 0
    regular = False
    method = path = ""
    while pos < end:
        first = block[pos]
        pos += 1
        kind: type[HeaderTuple]
        if first & 0x80:  # indexed field: only the static table's
            index = first & 0x7F
            if not index or index > _STATIC_LENGTH:
                return None
            field = _STATIC_FIELDS[index]
            if field is None:
                return None
            name, value = field
            kind = HeaderTuple
        elif not first & 0xE0:  # literal without indexing (0000), never indexed (0001)
            kind = NeverIndexedHeaderTuple if first & 0x10 else HeaderTuple
            index = first & 0x0F
            if index:
                if index == 0x0F:
                    if pos >= end:
                        return None
                    index += block[pos]  # one byte: 15..61 (a continuation bit means more)
                    pos += 1
                    if index > _STATIC_LENGTH:
                        return None
                known = _STATIC_NAMES[index]
                if known is None:
                    return None
                name = known
            else:
                raw, pos = _string(block, pos, end)
                if raw is None:
                    return None
                literal = _NAMES.get(raw)
                if literal is None:
                    return None
                name = literal
            raw, pos = _string(block, pos, end)
            if raw is None:
                return None
            try:
                value = raw.decode("ascii")
            except UnicodeDecodeError:
                return None
            # h2 refuses NUL, CR, LF and surrounding blanks; this takes printable ASCII only.
            if value and not (value.isprintable() and value[0] != " " and value[-1] != " "):
                return None
        else:  # incremental indexing (01) or a table size update (001): the dynamic table
            return None
        size += 32 + len(name) + len(value)
        if size > limit:
            return None
        if name[0] == ":":
            bit = _PSEUDO[name]
            if regular or seen & bit:
                return None
            seen |= bit
            if bit & (_METHOD | _STATUS):
                method = value
            elif bit == _PATH:
                path = value
        else:
            regular = True
        fields.append(_new_tuple(kind, (name, value)))
    return fields, seen, method, path, size


_MAX_DECODED = 256
"""Blocks whose fields are remembered, per kind (a tunnel's OPENs repeat: the same session, a
few destinations); emptied when full, so a peer sending ever new blocks only keeps it small."""
_MAX_DECODED_BLOCK = 512
"""Longest block remembered: the caches hold at most ~2 x 256 x (512 + its fields) bytes."""
_requests: dict[bytes, tuple[tuple[HeaderTuple, ...], int]] = {}
_responses: dict[bytes, tuple[tuple[HeaderTuple, ...], int]] = {}


def _remember(
    cache: dict[bytes, tuple[tuple[HeaderTuple, ...], int]], block: bytes, fields: Fields, size: int
) -> None:
    if len(block) <= _MAX_DECODED_BLOCK and type(block) is bytes:
        if len(cache) >= _MAX_DECODED:
            cache.clear()
        cache[block] = (tuple(fields), size)


def decode_request(block: bytes, limit: int) -> Fields | None:
    """A request's fields, if the block is a plain CONNECT (`:method CONNECT`, `:authority`, no
    `:scheme` or `:path`: a tunnel OPEN) or another method with `:scheme`, a non-empty `:path`
    and `:authority` (an RPC call); None for anything else (h2 decides)."""
    known = _requests.get(block) if type(block) is bytes else None
    if known is not None:
        # A block's fields do not depend on the limit; whether they fit it does.
        return list(known[0]) if known[1] <= limit else None
    decoded = _fields(block, limit)
    if decoded is None:
        return None
    fields, seen, method, path, size = decoded
    if seen & _STATUS or not seen & _METHOD or not seen & _AUTHORITY:
        return None
    if method == "CONNECT":
        if seen & (_SCHEME | _PATH):
            return None
    elif not seen & _SCHEME or not path:
        return None
    _remember(_requests, block, fields, size)
    return fields


def decode_response(block: bytes, limit: int) -> Fields | None:
    """A final response's fields (`:status` not 1xx, no other pseudo-header); None otherwise."""
    known = _responses.get(block) if type(block) is bytes else None
    if known is not None:
        return list(known[0]) if known[1] <= limit else None
    decoded = _fields(block, limit)
    if decoded is None:
        return None
    fields, seen, status, _, size = decoded
    if seen != _STATUS or status.startswith("1"):
        return None
    _remember(_responses, block, fields, size)
    return fields


# -- encoding ------------------------------------------------------------------------------------

_FULL: dict[tuple[str, str], bytes] = {}
_NAME_INDEX: dict[str, int] = {}
for _index, (_name, _value) in enumerate(_STATIC, 1):
    if _value:
        _FULL.setdefault((_name.decode(), _value.decode()), bytes([0x80 | _index]))
    _NAME_INDEX.setdefault(_name.decode(), _index)

_MAX_CACHED = 1024
"""Encoded fields remembered (the session, the statuses, the recent authorities); the cache is
emptied when full, so its memory stays bounded whatever is sent."""
_cache: dict[tuple[str, str], bytes] = {}


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with `flags` in the first byte's high bits."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([flags | value])
    out = bytearray([flags | top])
    value -= top
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(raw: bytes) -> bytes:
    return _integer(len(raw), 7, 0) + raw  # plain, not Huffman-coded


def _encode_field(name: str, value: str) -> bytes:
    full = _FULL.get((name, value))
    if full is not None:
        return full
    index = _NAME_INDEX.get(name)
    head = _integer(index, 4, 0) if index else b"\x00" + _literal(name.encode())
    return head + _literal(value.encode())


def encode_block(headers: object) -> bytes | None:
    """`headers` (a list of (str, str) tuples) as one header block that leaves both sides'
    dynamic tables alone; None for anything else (bytes, `HeaderTuple`s that ask for never
    indexed, other containers): h2's encoder takes those."""
    if type(headers) is not list:
        return None
    parts = []
    cache = _cache
    for header in headers:
        if type(header) is not tuple or len(header) != 2:
            return None
        name, value = header
        if type(name) is not str or type(value) is not str:
            return None
        encoded = cache.get(header)
        if encoded is None:
            try:
                encoded = _encode_field(name, value)
            except UnicodeEncodeError:
                return None  # a lone surrogate: h2 raises its own error for it
            if len(cache) >= _MAX_CACHED:
                cache.clear()
            cache[header] = encoded
        parts.append(encoded)
    return b"".join(parts)
