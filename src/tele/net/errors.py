"""Exceptions of the packet codecs in `tele.net`.

Parsing goes integrity check -> parse -> sanity check (the PyTCP order); each stage fails with
its own type so that the runtime can count drops by cause. All derive from `PacketError`, the one
type a caller of a parser has to catch.
"""

from __future__ import annotations


class PacketError(ValueError):
    """A buffer could not be taken as the packet it was parsed as."""


class IntegrityError(PacketError):
    """The bytes are not a well-formed packet: too short, inconsistent lengths, bad version."""


class ChecksumError(IntegrityError):
    """A header or transport checksum does not match the bytes."""


class SanityError(PacketError):
    """Well-formed, but the field values make no sense (e.g. SYN with FIN, port 0)."""


class UnsupportedError(PacketError):
    """Valid, but something this stack does not handle (e.g. an unknown transport)."""


class FragmentError(UnsupportedError):
    """An IP fragment: there is no reassembly here; the runtime drops and counts it.

    `ident`, `offset` (bytes) and `more` describe the fragment; `first` says whether it carries
    the start of the upper-layer header (an ICMP error could quote it).
    """

    def __init__(self, message: str, *, ident: int, offset: int, more: bool) -> None:
        super().__init__(message)
        self.ident = ident
        self.offset = offset
        self.more = more

    @property
    def first(self) -> bool:
        return self.offset == 0
