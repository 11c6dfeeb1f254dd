"""tele._patches against the stock library code it replaces: same bytes out (or, for the repr,
the same text without the hex dump), applied only to tested versions, and the h2 internals
that tele.net.h2conn subclasses still where it expects them."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.frame_buffer
import hyperframe.frame
import pytest
import wsproto.frame_protocol
from wsproto.frame_protocol import FrameProtocol, Opcode

from tele import _patches
from tele.net import h2conn

pytest.importorskip("websockets.speedups", reason="websockets' compiled apply_mask is missing")


@pytest.fixture(autouse=True)
def patched() -> Iterator[None]:
    assert _patches.apply() == {"hyperframe": True, "wsproto": True}
    yield
    _patches.apply()


def test_the_installed_versions_are_the_tested_ones() -> None:
    # pyproject.toml bounds these; a version outside TESTED would run unpatched (and slower).
    assert _patches.apply() == {"hyperframe": True, "wsproto": True}


@pytest.mark.parametrize("data", [None, b"", b"\x00", b"abc", bytes(range(256)) * 40])
def test_frame_repr_is_stock_without_the_hex_dump(data: bytes | None) -> None:
    stock = _patches.stock("hyperframe")(data)
    ours = hyperframe.frame._raw_data_repr(data)
    if stock == "None":
        assert ours == "None"
    else:
        assert stock.startswith("<hex:")
        assert data is not None
        assert ours == f"<{len(data)} bytes>"


def test_hyperframe_still_builds_reprs_with_the_patched_function() -> None:
    frame = hyperframe.frame.DataFrame(1, data=b"x" * 1000)
    assert repr(frame).endswith(": <1000 bytes>")


def test_the_masker_masks_and_rotates_like_stock() -> None:
    stock_masker = _patches.stock("wsproto.masker")(bytearray(b"\x9a\x01\xff\x37"))
    ours = wsproto.frame_protocol.XorMaskerSimple(b"\x9a\x01\xff\x37")
    for size in [0, 1, 2, 3, 5, 4096, 7, 65537, 0, 4]:
        chunk = os.urandom(size)
        assert bytes(ours.process(bytearray(chunk))) == bytes(stock_masker.process(chunk))


@pytest.mark.parametrize("client", [False, True])
@pytest.mark.parametrize("fin", [False, True])
@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70001])
@pytest.mark.parametrize("opcode", [Opcode.BINARY, Opcode.TEXT, Opcode.CONTINUATION])
def test_data_frames_serialise_like_stock(
    monkeypatch: pytest.MonkeyPatch, client: bool, fin: bool, length: int, opcode: Opcode
) -> None:
    monkeypatch.setattr(os, "urandom", lambda n: b"\x12\x34\x56\x78"[:n])
    payload = bytes(i % 251 for i in range(length))
    protocol = FrameProtocol(client=client, extensions=[])
    ours = protocol._serialize_frame(opcode, payload, fin)
    stock = _patches.stock("wsproto.serialize")(protocol, opcode, payload, fin)
    assert type(ours) is bytes
    assert ours == bytes(stock)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 1 << 20])
def test_masked_frames_read_back_as_stock_wsproto_reads_them(size: int) -> None:
    # With a fresh random key, as a client sends them: a stock server reads the payload back.
    payload = bytes(i % 253 for i in range(size))
    client = FrameProtocol(client=True, extensions=[])
    reader = FrameProtocol(client=False, extensions=[])
    reader.receive_bytes(client._serialize_frame(Opcode.BINARY, payload, True))
    frames = list(reader.received_frames())
    assert [f.opcode for f in frames] == [Opcode.BINARY]
    assert bytes(frames[0].payload) == payload
    assert frames[0].frame_finished


@pytest.mark.parametrize("client", [False, True])
@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_control_frames_serialise_and_refuse_like_stock(
    monkeypatch: pytest.MonkeyPatch, client: bool, opcode: Opcode
) -> None:
    monkeypatch.setattr(os, "urandom", lambda n: b"\xa1\xb2\xc3\xd4"[:n])
    protocol = FrameProtocol(client=client, extensions=[])
    stock = _patches.stock("wsproto.serialize")
    assert protocol._serialize_frame(opcode, b"ping") == bytes(stock(protocol, opcode, b"ping"))
    with pytest.raises(ValueError, match="too long for control frame"):
        stock(protocol, opcode, b"x" * 126)
    with pytest.raises(ValueError, match="too long for control frame"):
        protocol._serialize_frame(opcode, b"x" * 126)


def test_an_untested_version_is_left_alone_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stock_masker = _patches.stock("wsproto.masker")
    _patches.revert()
    assert wsproto.frame_protocol.XorMaskerSimple is stock_masker
    monkeypatch.setitem(_patches.TESTED, "wsproto", ("0.1.",))
    with caplog.at_level(logging.WARNING, logger="tele._patches"):
        assert _patches.apply() == {"hyperframe": True, "wsproto": False}
    assert wsproto.frame_protocol.XorMaskerSimple is stock_masker
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("not patching wsproto ")
    assert "tested with 0.1.x" in lines[0]
    _patches.revert()  # the fixture applies everything again


@pytest.mark.parametrize(
    ("ours", "base"),
    [
        (h2conn.FrameBuffer, h2.frame_buffer.FrameBuffer),
        (h2conn.Connection, h2.connection.H2Connection),
    ],
)
def test_the_h2_internals_h2conn_overrides_are_still_there(ours: type, base: type) -> None:
    for name, member in vars(ours).items():
        if not callable(member) or name in ("__init__",) or not hasattr(base, name):
            continue
        ours_params = list(inspect.signature(member).parameters)
        base_params = list(inspect.signature(getattr(base, name)).parameters)
        assert ours_params == base_params, f"h2 changed {base.__name__}.{name}"
    overridden = (
        {"add_data", "__next__"}
        if base is h2.frame_buffer.FrameBuffer
        else {
            "_prepare_for_sending",
            "_receive_frame",
            "receive_data",
            "send_headers",
            "_open_streams",
            "send_data",
            "data_to_send",
            "clear_outbound_data_buffer",
        }
    )
    assert overridden <= set(vars(base)) | {n for k in base.__mro__ for n in vars(k)}


def test_the_h2_state_h2conn_reads_is_still_there() -> None:
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    for name in ("_data_to_send", "_inbound_flow_control_window_manager", "incoming_buffer"):
        assert hasattr(connection, name), name
    buffer = h2.frame_buffer.FrameBuffer(server=True)
    for name in ("_data", "_preamble_len", "max_frame_size", "_validate_frame_length"):
        assert hasattr(buffer, name), name
