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
import runpy
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


def _shadow(directory: str, scratch: str) -> None:
    """Make `directory` writable for new entries without touching the host's copy: a tmpfs
    holding a bind mount of each existing entry (symlinks copied) goes over it."""
    os.makedirs(scratch, exist_ok=True)
    _mount("tmpfs", scratch, "tmpfs", 0)
    with os.scandir(directory) as entries:
        for entry in entries:
            dst = os.path.join(scratch, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), dst)
            elif entry.is_dir():
                os.mkdir(dst)
                _mount(entry.path, dst, None, _MS_BIND | _MS_REC)
            else:
                open(dst, "w").close()
                _mount(entry.path, dst, None, _MS_BIND)
    _mount(scratch, directory, None, _MS_BIND | _MS_REC)


def _ensure_target(path: str, is_dir: bool, scratch: str) -> None:
    """Make `path` exist inside this mount namespace only: missing directories are created
    in a shadow of the deepest existing ancestor (see `_shadow`)."""
    if os.path.lexists(path):
        return
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    ancestor = os.path.realpath(ancestor)
    _shadow(ancestor, os.path.join(scratch, str(len(os.listdir(scratch)))))
    target = os.path.join(ancestor, _below(path, ancestor))
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()


def _below(path: str, ancestor: str) -> str:
    """`path` relative to its existing ancestor (which may be reached through a symlink)."""
    head = path
    parts: list[str] = []
    while os.path.realpath(head) != ancestor:
        head, tail = os.path.split(head)
        parts.append(tail)
    return os.path.join(*reversed(parts))


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # No PR_SET_PDEATHSIG here: it fires when the *thread* that forked us exits, and trio
    # forks from worker threads that exit after 10 s idle, which SIGKILLed healthy containers.
    # A crashed sandbox's containers are found and killed by namespace instead
    # (instance.cleanup_namespaces, run by the next `tele sandbox up` or `down`).
    fd = os.open(spec["netns"], os.O_RDONLY)
    _check(_libc.setns(fd, _CLONE_NEWNET), "setns")
    os.close(fd)
    _check(_libc.unshare(_CLONE_NEWNS | _CLONE_NEWUTS), "unshare")
    hostname = spec["hostname"].encode()
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    scratch = spec["scratch"]
    for m in sorted(spec["mounts"], key=lambda m: m["path"].count("/")):
        _ensure_target(m["path"], os.path.isdir(m["source"]), scratch)
        _mount(m["source"], m["path"], None, _MS_BIND)
        if m.get("readOnly"):
            _mount(None, m["path"], None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)
    if spec.get("workingDir"):
        _ensure_target(spec["workingDir"], True, scratch)
        os.chdir(spec["workingDir"])
    argv = spec["argv"]
    if argv[:2] == [sys.executable, "-m"] and len(argv) > 2:
        # The image's own Python entry point: run it in this interpreter rather than starting
        # a second one (half of a container's start-up time on a small machine).
        os.environ.clear()
        os.environ.update(spec["env"])
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        return
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as exc:
        print(f'exec: "{argv[0]}": {exc.strerror}', file=sys.stderr, flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main()
