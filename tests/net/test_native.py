"""tele.net's mypyc build (scripts/build_native.py) is used only when built from the sources as
they are, and the same tests pass with it and without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tele.net
from tele.net import MANIFEST, NATIVE_DIR, NATIVE_MODULES, native_manifest, native_usable

ROOT = Path(__file__).resolve().parents[2]
SOURCES = Path(tele.net.__file__).resolve().parent

needs_build = pytest.mark.skipif(
    not tele.net.NATIVE,
    reason="tele.net's native build is not in use (scripts/build_native.py; TELE_NATIVE=0)",
)


def _fake_build(tmp_path: Path) -> Path:
    """A copy of tele.net's sources with a `_native` directory that records them."""
    package = tmp_path / "net"
    package.mkdir(parents=True)
    for name in NATIVE_MODULES:
        shutil.copy(SOURCES / f"{name}.py", package / f"{name}.py")
    native = package / "_native"
    native.mkdir()
    for name in NATIVE_MODULES:
        (native / f"{name}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (native / MANIFEST).write_text(json.dumps(native_manifest(package)))
    return native


def test_a_build_of_these_sources_is_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TELE_NATIVE", raising=False)
    assert native_usable(_fake_build(tmp_path))


def test_an_edited_source_makes_the_build_unusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TELE_NATIVE", raising=False)
    native = _fake_build(tmp_path)
    source = native.parent / "tcpstate.py"
    source.write_text(source.read_text() + "\n# edited\n")
    assert not native_usable(native)


def test_another_interpreter_a_missing_module_or_a_bad_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TELE_NATIVE", raising=False)
    native = _fake_build(tmp_path)
    manifest = json.loads((native / MANIFEST).read_text())
    (native / MANIFEST).write_text(json.dumps({**manifest, "python": "cpython-399"}))
    assert not native_usable(native)

    native = _fake_build(tmp_path / "b")
    next(native.glob("packet.*.so")).unlink()
    assert not native_usable(native)

    native = _fake_build(tmp_path / "c")
    (native / MANIFEST).write_text("{not json")
    assert not native_usable(native)
    assert not native_usable(tmp_path / "nowhere")


def test_turned_off_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELE_NATIVE", "0")
    assert not native_usable(_fake_build(tmp_path))


def _module_files(src: Path, env: dict[str, str]) -> dict[str, object]:
    """Where a fresh interpreter with `src` first on its path finds tele.net's modules."""
    code = (
        "import json, tele.net, tele.net.tcpstate, tele.net.packet; "
        "print(json.dumps({'native': tele.net.NATIVE, "
        "'tcpstate': tele.net.tcpstate.__file__, 'packet': tele.net.packet.__file__}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PYTHONPATH": str(src)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout)
    return result


@needs_build
def test_the_build_runs_until_a_source_changes(tmp_path: Path) -> None:
    """A copy of tele with the real build: its modules are the compiled ones; after an edit
    of one source, all of them are the .py files again (never a stale build)."""
    src = tmp_path / "src"
    (src / "tele").mkdir(parents=True)
    shutil.copy(SOURCES.parent / "__init__.py", src / "tele" / "__init__.py")
    shutil.copytree(SOURCES, src / "tele" / "net", ignore=shutil.ignore_patterns("__pycache__"))
    clean = {k: v for k, v in os.environ.items() if k != "TELE_NATIVE"}

    found = _module_files(src, clean)
    assert found["native"] is True
    assert str(found["tcpstate"]).endswith(".so") and str(found["packet"]).endswith(".so")

    off = _module_files(src, {**clean, "TELE_NATIVE": "0"})
    assert off["native"] is False and str(off["tcpstate"]).endswith("tcpstate.py")

    source = src / "tele" / "net" / "packet.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    stale = _module_files(src, clean)
    assert stale["native"] is False
    assert str(stale["tcpstate"]).endswith("tcpstate.py")
    assert str(stale["packet"]).endswith("packet.py")


@needs_build
def test_the_tcp_tests_pass_as_python_too() -> None:
    """The suite runs on the build; the userspace TCP's and codecs' tests run here once more
    on the .py modules, which the images and any machine without a compiler run."""
    assert NATIVE_DIR.is_dir()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/net/test_tcpstate.py", "tests/net/test_codecs.py", "tests/vif/test_stack.py"],
        cwd=ROOT, env={**os.environ, "TELE_NATIVE": "0"}, capture_output=True, text=True,
        check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
