"""Container launcher: `python -m tele.sandbox.kubelet.launch SPEC.json` becomes the container.

It joins the pod's network namespace, takes a mount namespace (and a UTS namespace, for the
pod's hostname) of its own, bind-mounts /etc/hosts, /etc/resolv.conf and the volumes at their
mountPath, changes to workingDir and execs the container's program. It imports only the standard
library so that a container starts fast.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_MS_RDONLY = 1
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(
            src.encode() if src else None,
            dst.encode(),
            fstype.encode() if fstype else None,
            flags,
            None,
        ),
        f"mount {dst}",
    )


def _ensure_target(path: str, is_dir: bool) -> None:
    """Make `path` exist without writing to the host's file system: when a parent is missing,
    an empty tmpfs goes over the deepest existing ancestor (inside this mount namespace only)."""
    if os.path.lexists(path):
        return
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if os.path.realpath(ancestor) != "/":
        _mount("tmpfs", os.path.realpath(ancestor), "tmpfs", 0)
    if is_dir:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").close()


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # Die with the kubelet: a crashed sandbox must not leave containers behind.
    _check(_libc.prctl(1, 9, 0, 0, 0), "prctl")  # PR_SET_PDEATHSIG, SIGKILL
    fd = os.open(spec["netns"], os.O_RDONLY)
    _check(_libc.setns(fd, _CLONE_NEWNET), "setns")
    os.close(fd)
    _check(_libc.unshare(_CLONE_NEWNS | _CLONE_NEWUTS), "unshare")
    hostname = spec["hostname"].encode()
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    for m in sorted(spec["mounts"], key=lambda m: m["path"].count("/")):
        _ensure_target(m["path"], os.path.isdir(m["source"]))
        _mount(m["source"], m["path"], None, _MS_BIND)
        if m.get("readOnly"):
            _mount(None, m["path"], None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)
    if spec.get("workingDir"):
        os.makedirs(spec["workingDir"], exist_ok=True)
        os.chdir(spec["workingDir"])
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as exc:
        print(f'exec: "{argv[0]}": {exc.strerror}', file=sys.stderr, flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main()
