"""Library internals tele replaces for speed, all in one place, applied on purpose.

`apply()` runs at the entry points of the processes that carry traffic (the daemon, the
manager, the agent, the sandbox, the benches) and in the test suite. Each patch names the
library versions it was checked against; for any other version it logs one line and leaves the
library alone, which is slower but correct. tests/test_patches.py compares every replacement's
output with the stock function's, so a library release that changes what the stock code does
fails there before it reaches a user.

| library    | what                                    | why                                      |
|------------|-----------------------------------------|------------------------------------------|
| hyperframe | `frame._raw_data_repr`                  | h2 builds `repr(frame)` for a trace line |
|            |                                         | per received frame; the hex dump cost    |
|            |                                         | ~30% of a tunnel's receive CPU           |
| wsproto    | `frame_protocol.XorMaskerSimple`        | client masking in C (websockets'         |
|            |                                         | `apply_mask`, ~8 GB/s vs ~380 MB/s)      |
| wsproto    | `FrameProtocol._serialize_frame`        | two copies of a payload instead of five  |

Not patched but bound to internals: h2's `H2Connection` and `FrameBuffer` are subclassed by
tele.net.h2conn; pyproject.toml bounds h2 to the versions checked, and tests/test_patches.py
checks that the internals it overrides are still there.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

TESTED: dict[str, tuple[str, ...]] = {
    "hyperframe": ("6.0.", "6.1."),
    "wsproto": ("1.2.", "1.3."),
}
"""Version prefixes each patched library was checked against (see tests/test_patches.py)."""

_applied: dict[str, bool] = {}
_stock: dict[str, Any] = {}


def _tested(library: str) -> bool:
    try:
        version = importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    if version.startswith(TESTED[library]):
        return True
    log.warning(
        "not patching %s %s (tested with %s): using it as it is, which is slower",
        library,
        version,
        ", ".join(p + "x" for p in TESTED[library]),
    )
    return False


def apply() -> dict[str, bool]:
    """Apply every patch whose library version was tested (once; later calls do nothing);
    which ones are in place, by library."""
    if not _applied:
        _applied["hyperframe"] = _tested("hyperframe") and _patch_hyperframe()
        _applied["wsproto"] = _tested("wsproto") and _patch_wsproto()
    return dict(_applied)


def revert() -> None:
    """Put the stock functions back (for tests that compare the two)."""
    if "hyperframe" in _stock:
        import hyperframe.frame

        hyperframe.frame._raw_data_repr = _stock.pop("hyperframe")
    if "wsproto.masker" in _stock:
        import wsproto.frame_protocol

        wsproto.frame_protocol.XorMaskerSimple = _stock.pop("wsproto.masker")  # type: ignore[misc]
        wsproto.frame_protocol.FrameProtocol._serialize_frame = _stock.pop(  # type: ignore[method-assign]
            "wsproto.serialize"
        )
    _applied.clear()


def stock(name: str) -> Any:
    """The library's own object that a patch replaced: "hyperframe", "wsproto.masker" or
    "wsproto.serialize" (only while the patch is applied)."""
    return _stock[name]


# -- hyperframe --------------------------------------------------------------------------------


def _cheap_data_repr(data: bytes | None) -> str:
    """hyperframe's `_raw_data_repr` without the hex dump: the length instead."""
    return "None" if not data else f"<{len(data)} bytes>"


def _patch_hyperframe() -> bool:
    import hyperframe.frame

    _stock["hyperframe"] = hyperframe.frame._raw_data_repr
    hyperframe.frame._raw_data_repr = _cheap_data_repr
    return True


# -- wsproto -----------------------------------------------------------------------------------


def _unset_mask(data: bytes | bytearray, key: bytes) -> bytes:
    raise RuntimeError("the wsproto patch is not applied")


_apply_mask: Callable[[bytes | bytearray, bytes], bytes] = _unset_mask
"""websockets' C `apply_mask`, once the wsproto patch is applied."""


class _FastXorMasker:
    """wsproto's masker with the XOR done in C by websockets' `apply_mask`.

    wsproto masks with strided `bytearray.translate`; a client must mask every byte it sends
    (RFC 6455 5.3), which made masking the largest cost of a tunnel inside the port-forward
    websocket. The key rotates across calls exactly as wsproto's does, because a received
    frame's payload is unmasked in pieces.
    """

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytes:
        # wsproto annotates bytearray but only concatenates the result: bytes saves a copy.
        if not data:
            return b""
        masked = _apply_mask(data, self._key)
        rotation = len(data) % 4
        self._key = self._key[rotation:] + self._key[:rotation]
        return masked


def _patch_wsproto() -> bool:
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # no compiled speedups for this platform: keep wsproto's own code
        log.info("websockets has no compiled apply_mask here: wsproto masks on its own")
        return False
    import wsproto.frame_protocol
    from wsproto.frame_protocol import FrameProtocol, Opcode

    global _apply_mask
    _apply_mask = apply_mask

    stock_serialize = FrameProtocol._serialize_frame

    def _lean_serialize_frame(
        self: FrameProtocol, opcode: Opcode, payload: bytes | bytearray = b"", fin: bool = True
    ) -> bytes:
        """wsproto's frame serialiser with two copies of the payload instead of five.

        wsproto copies a payload into a bytearray twice, masks a third copy, joins header and
        payload and copies that into another bytearray; its caller then adds the frame to b"",
        one more copy unless the frame is exactly bytes. Here: the masking (a client's) or one
        join, and the frame is returned as bytes. Frames with extensions go the stock way.
        """
        if self.extensions:
            return bytes(stock_serialize(self, opcode, payload, fin))
        length = len(payload)
        if opcode.iscontrol() and length > 125:
            raise ValueError("payload too long for control frame")
        first = (0x80 if fin else 0) | int(opcode)
        mask_bit = 0x80 if self.client else 0
        if length <= 125:
            header = bytes((first, mask_bit | length))
        elif length <= 0xFFFF:
            header = struct.pack("!BBH", first, mask_bit | 126, length)
        else:
            header = struct.pack("!BBQ", first, mask_bit | 127, length)
        if self.client:
            key = os.urandom(4)
            return b"".join((header, key, apply_mask(payload, key)))
        return b"".join((header, payload))

    _stock["wsproto.masker"] = wsproto.frame_protocol.XorMaskerSimple
    _stock["wsproto.serialize"] = stock_serialize
    wsproto.frame_protocol.XorMaskerSimple = _FastXorMasker  # type: ignore[misc,assignment]
    FrameProtocol._serialize_frame = _lean_serialize_frame  # type: ignore[method-assign,assignment]
    return True
