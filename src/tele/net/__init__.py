"""Sans-IO protocol cores: bytes in, events out. Nothing here imports trio, sockets or tele.

The hottest pure modules (`NATIVE_MODULES`: the packet codecs and the userspace TCP) may also
be present compiled with mypyc (`scripts/build_native.py`, run by `scripts/setup.sh`) in
`_native/`, with a manifest of the sources they were built from. They are used only when every
one of those sources is what was compiled (its size and CRC-32: a check against edits, cheap
at start-up, where hashlib's OpenSSL would cost ~2 ms) and the build is for this interpreter:
an edited .py never runs as a stale build, it runs as Python. TELE_NATIVE=0 turns them off.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

NATIVE_MODULES = ("checksum", "ip", "packet", "tcp", "tcpstate")
NATIVE_DIR = Path(__file__).resolve().parent / "_native"
MANIFEST = "manifest.json"


def native_manifest(package: Path) -> dict[str, object]:
    """What a native build of `package`'s sources as they are now records: the interpreter's
    tag and each module's size and CRC-32."""
    return {
        "python": sys.implementation.cache_tag,
        "sources": {name: _fingerprint(package / f"{name}.py") for name in NATIVE_MODULES},
    }


def _fingerprint(path: Path) -> str:
    data = path.read_bytes()
    return f"{len(data)}:{zlib.crc32(data):08x}"


def native_usable(directory: Path = NATIVE_DIR) -> bool:
    """Is the native build in `directory` there, for this interpreter, from these sources?"""
    if os.environ.get("TELE_NATIVE", "1") == "0":
        return False
    try:
        recorded = json.loads((directory / MANIFEST).read_text())
        built = {entry.name.split(".", 1)[0] for entry in directory.iterdir()}
        current = native_manifest(directory.parent)
    except (OSError, ValueError):
        return False
    return recorded == current and set(NATIVE_MODULES) <= built


# Submodules are looked up along __path__ in order, an extension module before a .py file: the
# native directory first makes `tele.net.tcpstate` its build.
NATIVE = native_usable()
if NATIVE:
    __path__.insert(0, str(NATIVE_DIR))
