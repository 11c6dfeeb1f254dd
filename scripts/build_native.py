#!/usr/bin/env python3
"""Compile tele's hottest pure modules (`tele.net.NATIVE_MODULES`: the packet codecs and the
userspace TCP) with mypyc into src/tele/net/_native/, with a manifest of the sources compiled.

tele uses the build only while those sources are unchanged and the interpreter is the same
(`tele.net.native_usable`); otherwise, or with TELE_NATIVE=0, the same modules run as Python.
`scripts/setup.sh` runs this when the build is missing or stale; a failure there is a warning
(tele is complete without it). Needs mypy (its mypyc), setuptools, a C compiler and the
interpreter's headers. Run with the venv's Python:  .venv/bin/python scripts/build_native.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "tele" / "net"
GROUP = "tele.net._native"  # the shared library: tele.net._native__mypyc, found in _native/

SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
paths, group, out, temp = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4]
setup(
    name="tele-native",
    packages=[],
    ext_modules=mypycify(paths, group_name=group, opt_level="3"),
    script_args=["build_ext", "--build-lib", out, "--build-temp", temp],
)
"""


def main() -> int:
    sys.path.insert(0, str(SRC))
    from tele.net import MANIFEST, NATIVE_DIR, NATIVE_MODULES, native_manifest

    before = native_manifest(PACKAGE)
    paths = [str(PACKAGE / f"{name}.py") for name in NATIVE_MODULES]
    with tempfile.TemporaryDirectory(prefix="tele-native-") as tmp:
        out, temp = Path(tmp) / "lib", Path(tmp) / "temp"
        # Run from the temporary directory: setuptools would read tele's own pyproject.toml,
        # and mypyc writes its C sources under ./build.
        env = {**os.environ, "MYPYPATH": str(SRC)}
        done = subprocess.run(
            [sys.executable, "-c", SETUP, ",".join(paths), GROUP, str(out), str(temp)],
            cwd=tmp, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            print(f"build_native: mypyc failed:\n{tail}", file=sys.stderr)
            return 1
        built = sorted((out / "tele" / "net").glob("*.so"))
        names = {path.name.split(".", 1)[0] for path in built}
        if not set(NATIVE_MODULES) <= names:
            print(f"build_native: missing from the build: {set(NATIVE_MODULES) - names}",
                  file=sys.stderr)  # fmt: skip
            return 1
        if native_manifest(PACKAGE) != before:
            print("build_native: the sources changed while compiling; run it again",
                  file=sys.stderr)  # fmt: skip
            return 1
        staging = NATIVE_DIR.with_name("_native.new")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for path in built:
            shutil.copy2(path, staging / path.name)
        (staging / MANIFEST).write_text(json.dumps(before, indent=1) + "\n")
        shutil.rmtree(NATIVE_DIR, ignore_errors=True)
        staging.rename(NATIVE_DIR)
    print(f"build_native: {len(built)} modules in {NATIVE_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
