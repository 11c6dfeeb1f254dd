"""Tiny images for tests (the image client's and the kubelet's).

`tiny_image` builds an image of a few in-memory files; `busybox_image` one of Debian's static
busybox (a shell and coreutils in one 2 MB file). The registry to push them to is
`tele.sandbox.oci_registry.open_registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .assemble import BuiltImage, assemble
from .layers import LayerBuilder
from .oci import ContainerConfig

BUSYBOX = Path("/bin/busybox")
"""Debian's busybox-static installs here."""


def tiny_image(
    store: Path,
    files: Sequence[tuple[str, bytes, int]],
    config: ContainerConfig | None = None,
) -> BuiltImage:
    """An image of one layer holding `files` (`(path, data, mode)`)."""
    builder = LayerBuilder()
    for path, data, mode in files:
        builder.add_file(path, data, mode)
    layer = builder.write(store)
    return assemble(store, [layer], config or ContainerConfig(cmd=["/hello"]))


def busybox_available() -> bool:
    return BUSYBOX.is_file()


def busybox_image(store: Path, config: ContainerConfig | None = None) -> BuiltImage:
    """busybox-static as `/bin/busybox` with `/bin/sh` and the usual applets as symlinks."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    builder = LayerBuilder()
    builder.add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in ("sh", "cat", "echo", "ls", "sleep", "id", "env", "pwd", "test", "wget", "nc"):
        builder.add_symlink(f"bin/{applet}", "busybox")
    builder.add_dir("tmp", 0o1777)
    builder.add_file(
        "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"
    )
    builder.add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    layer = builder.write(store)
    return assemble(
        store,
        [layer],
        config or ContainerConfig(cmd=["/bin/sh"], env=["PATH=/bin"]),
        history=["busybox-static"],
    )
