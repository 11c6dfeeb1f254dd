"""Containers as OCI runtime bundles run by runc: the node's container runtime.

A container's root filesystem is an overlayfs of its image's unpacked layers (shared,
read-only) and an upper directory of its own; config.json combines the image config with the
pod spec by Kubernetes' rules (`build_process`, `build_config`, pure functions). `Container`
runs one with `runc run` in the foreground, so the kubelet reads its output and exit code, and
removes everything (runc state, mount, cgroups, bundle) on every path. Container ids are
`<sandbox>.<pod>.<container>.<run>` (a sandbox name has no dot): `cleanup_sync` finds what a
crashed kubelet left behind.

Cgroups (measured on this machine's v1 + v2 hybrid layout, where crun refuses to run): runc puts
a container at `<own cgroup>/tele-sandbox-<cluster>/<id>/c` in every hierarchy. The memory limit
is set on the `<id>` parent, which the kubelet creates, because runc removes the leaf when the
container stops and the v1 `oom_kill` counter is not propagated upwards: a container killed by
SIGKILL whose parent's `memory.failcnt` is non-zero was OOM-killed. CPU limits are set by runc.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .imagestore import Image

log = logging.getLogger(__name__)

Obj = dict[str, Any]
RUNC_ROOT = Path("/run/tele-runc")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# containerd's default capability set for a container that is not privileged.
DEFAULT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
ALL_CAPS = (
    *DEFAULT_CAPS,
    "CAP_DAC_READ_SEARCH",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_LEASE",
    "CAP_AUDIT_CONTROL",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


class ContainerConfigError(Exception):
    """The pod spec cannot be applied to the image (waiting reason CreateContainerConfigError)."""


class ContainerCreateError(Exception):
    """The runtime could not create the container (waiting reason CreateContainerError)."""


def runc_available() -> bool:
    return os.geteuid() == 0 and shutil.which("runc") is not None


# --- the process: command, environment, user (Kubernetes' rules) ------------------------------


def image_env(image: Image) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in image.process_config.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            key, value = item.split("=", 1)
            env[key] = value
    return env


def argv_for(image: Image, container: Obj, expand: Any) -> list[str]:
    """Kubernetes' rules: command replaces Entrypoint (and drops Cmd); args replace Cmd."""
    config = image.process_config
    command = [expand(a) for a in container.get("command") or []]
    args = [expand(a) for a in container.get("args") or []]
    if command:
        argv = command + args
    else:
        argv = list(config.get("Entrypoint") or []) + (args or list(config.get("Cmd") or []))
    if not argv:
        raise ContainerCreateError(
            f'failed to generate container "{container.get("name", "")}" spec: failed to '
            "generate spec: no command specified"
        )
    return argv


def read_image_file(layers: Sequence[Path], rel: str) -> str | None:
    """`rel` (like etc/passwd) as the merged image shows it, top layer first; a file reached
    through a symlink is not followed (it could point at the host's copy)."""
    for layer in layers:
        path = layer / rel
        parts = Path(rel).parts
        if any((layer / Path(*parts[: i + 1])).is_symlink() for i in range(len(parts))):
            return None
        if os.path.lexists(path):
            if not path.is_file():
                return None  # a whiteout (character device) or something else: not there
            try:
                return path.read_text(errors="replace")[: 1 << 20]
            except OSError:
                return None
    return None


def _table(text: str | None) -> list[list[str]]:
    return [line.split(":") for line in (text or "").splitlines() if line and line[0] != "#"]


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]


def resolve_user(layers: Sequence[Path], pod: Obj, container: Obj, image: Image) -> User:
    """uid/gid of the container's process from the image's User and the securityContexts."""
    pod_sc = (pod.get("spec") or {}).get("securityContext") or {}
    sc = {**pod_sc, **(container.get("securityContext") or {})}
    passwd = _table(read_image_file(layers, "etc/passwd"))
    groups = _table(read_image_file(layers, "etc/group"))
    name = ""
    image_user = str(image.process_config.get("User") or "")
    if sc.get("runAsUser") is not None:
        uid = int(sc["runAsUser"])
        entry = next((p for p in passwd if len(p) > 3 and p[2] == str(uid)), None)
        gid = int(entry[3]) if entry and entry[3].isdigit() else 0
        name = entry[0] if entry else ""
    else:
        user, _, group = image_user.partition(":")
        if not user:
            uid, gid = 0, 0
            name = "root"
        elif user.isdigit():
            uid = int(user)
            entry = next((p for p in passwd if len(p) > 3 and p[2] == user), None)
            gid = int(entry[3]) if entry and entry[3].isdigit() else 0
            name = entry[0] if entry else ""
        else:
            if sc.get("runAsNonRoot"):
                raise ContainerConfigError(
                    f"container has runAsNonRoot and image has non-numeric user ({user}), "
                    f'cannot verify user is non-root (pod: "{_pod_name(pod)}", container: '
                    f"{container.get('name', '')})"
                )
            entry = next((p for p in passwd if len(p) > 3 and p[0] == user), None)
            if entry is None or not entry[2].isdigit():
                raise ContainerConfigError(
                    f"unable to find user {user}: no matching entries in passwd file"
                )
            uid, gid, name = int(entry[2]), int(entry[3]) if entry[3].isdigit() else 0, user
        if group:
            if group.isdigit():
                gid = int(group)
            else:
                match = next((g for g in groups if len(g) > 2 and g[0] == group), None)
                if match is None or not match[2].isdigit():
                    raise ContainerConfigError(
                        f"unable to find group {group}: no matching entries in group file"
                    )
                gid = int(match[2])
    if sc.get("runAsGroup") is not None:
        gid = int(sc["runAsGroup"])
    if sc.get("runAsNonRoot") and uid == 0:
        raise ContainerConfigError(
            "container has runAsNonRoot and image will run as root "
            f'(pod: "{_pod_name(pod)}", container: {container.get("name", "")})'
        )
    extra = [int(g[2]) for g in groups if len(g) > 3 and name and name in g[3].split(",")]
    extra += [int(g) for g in pod_sc.get("supplementalGroups") or []]
    if pod_sc.get("fsGroup") is not None:
        extra.append(int(pod_sc["fsGroup"]))
    return User(uid, gid, tuple(sorted({g for g in extra if g != gid})))


def _pod_name(pod: Obj) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('name', '')}_{meta.get('namespace', '')}({meta.get('uid', '')})"


def capabilities(container: Obj) -> list[str]:
    sc = container.get("securityContext") or {}
    if sc.get("privileged"):
        return list(ALL_CAPS)
    caps = list(DEFAULT_CAPS)
    wanted = sc.get("capabilities") or {}
    drop = {_cap(c) for c in wanted.get("drop") or []}
    if "CAP_ALL" in drop:
        caps = []
    caps = [c for c in caps if c not in drop]
    for c in wanted.get("add") or []:
        cap = _cap(c)
        if cap == "CAP_ALL":
            return list(ALL_CAPS)
        if cap in ALL_CAPS and cap not in caps:
            caps.append(cap)
    return caps


def _cap(name: str) -> str:
    name = str(name).upper()
    return name if name.startswith("CAP_") else f"CAP_{name}"


# --- resources -------------------------------------------------------------------------------

_QUANTITY_RE = re.compile(r"([0-9.]+)([a-zA-Z]*)")
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def quantity(value: Any) -> float:
    m = _QUANTITY_RE.fullmatch(str(value).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ContainerConfigError(f"quantities must match the regular expression: {value!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def limits(container: Obj) -> tuple[int | None, float | None, float | None]:
    """(memory limit bytes, cpu limit cores, cpu request cores)."""
    res = container.get("resources") or {}
    lim, req = res.get("limits") or {}, res.get("requests") or {}
    memory = int(quantity(lim["memory"])) if "memory" in lim else None
    cpu = quantity(lim["cpu"]) if "cpu" in lim else None
    cpu_req = quantity(req["cpu"]) if "cpu" in req else cpu
    return memory, cpu, cpu_req


# --- config.json --------------------------------------------------------------------------


@dataclass
class Mount:
    source: str
    destination: str
    read_only: bool


def build_process(
    argv: list[str], env: dict[str, str], cwd: str, user: User, container: Obj
) -> Obj:
    sc = container.get("securityContext") or {}
    caps = capabilities(container)
    if "PATH" not in env:
        env = {"PATH": DEFAULT_PATH, **env}
    return {
        # runc in the foreground makes the container's pty and copies it to its own stdio (the
        # kubelet's pty for the container: see PodWorker._start).
        "terminal": bool(container.get("tty")),
        "user": {
            "uid": user.uid,
            "gid": user.gid,
            "additionalGids": sorted({user.gid, *user.additional_gids}),
        },
        "args": argv,
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd or "/",
        "capabilities": {
            "bounding": caps,
            "effective": caps if user.uid == 0 else [],
            "permitted": caps,
            **({"ambient": []} if user.uid == 0 else {}),
        },
        "noNewPrivileges": sc.get("allowPrivilegeEscalation") is False,
        "oomScoreAdj": 1000 if not (container.get("resources") or {}).get("limits") else 900,
    }


def build_config(
    *,
    rootfs: str,
    process: Obj,
    container: Obj,
    hostname: str,
    netns_path: str,
    mounts: list[Mount],
    cgroups_path: str,
    cpu_limit: float | None,
    cpu_request: float | None,
) -> Obj:
    sc = container.get("securityContext") or {}
    privileged = bool(sc.get("privileged"))
    binds = [
        {
            "destination": m.destination,
            "type": "bind",
            "source": m.source,
            "options": ["rbind", "rprivate", "ro" if m.read_only else "rw"],
        }
        for m in sorted(mounts, key=lambda m: m.destination.rstrip("/").count("/"))
    ]
    resources: Obj = {"devices": [{"allow": privileged, "access": "rwm"}]}
    cpu: Obj = {}
    if cpu_limit is not None:
        cpu["period"] = 100000
        cpu["quota"] = max(1000, int(cpu_limit * 100000))
    if cpu_request is not None:
        cpu["shares"] = max(2, int(cpu_request * 1024))
    if cpu:
        resources["cpu"] = cpu
    linux: Obj = {
        "cgroupsPath": cgroups_path,
        "resources": resources,
        "namespaces": [
            {"type": "pid"},
            {"type": "network", "path": netns_path},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "mount"},
        ],
    }
    if not privileged:
        linux["maskedPaths"] = MASKED_PATHS
        linux["readonlyPaths"] = READONLY_PATHS
    sys_ro = [] if privileged else ["ro"]
    return {
        "ociVersion": "1.0.2-dev",
        "process": process,
        "root": {"path": rootfs, "readonly": bool(sc.get("readOnlyRootFilesystem"))},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", *sys_ro],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
            *binds,
        ],
        "linux": linux,
    }


# --- cgroups ---------------------------------------------------------------------------------


def _hierarchies() -> list[Path]:
    """Each cgroup hierarchy's directory of this process (v1 controllers and the v2 tree)."""
    mounts: dict[str, Path] = {}
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fields, fs = pre.split(), post.split()
            if len(fields) < 5 or len(fs) < 3:
                continue
            if fs[0] == "cgroup2":
                mounts[""] = Path(fields[4])
            elif fs[0] == "cgroup":
                for opt in fs[2].split(","):
                    if opt not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec"):
                        mounts.setdefault(opt, Path(fields[4]))
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out: list[Path] = []
    for line in own:
        _, controllers, path = line.split(":", 2)
        key = controllers.split(",")[0] if controllers else ""
        base = mounts.get(key)
        if base is not None:
            out.append(base / path.lstrip("/"))
    return out


def _memory_dir() -> Path | None:
    """This process's memory cgroup directory (cgroup v1)."""
    for h in _hierarchies():
        if (h / "memory.limit_in_bytes").exists():
            return h
    return None


def cgroup_group(cluster: str) -> str:
    return f"tele-sandbox-{cluster}"


def _remove_cgroup_tree(rel: str) -> None:
    for hierarchy in _hierarchies():
        top = hierarchy / rel
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError as exc:
                log.debug("cgroup %s stays: %s", dirpath, exc)


# --- mounts ----------------------------------------------------------------------------------


def _unmount(path: str) -> None:
    if _libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            log.warning("unmounting %s: %s", path, os.strerror(err))


def _mount_points_below(marker: str) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if marker in point:
            out.append(point)
    return sorted(out, key=len, reverse=True)


def mount_overlay(lower: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    options = f"lowerdir={':'.join(str(p) for p in lower)},upperdir={upper},workdir={work}"
    if len(options) > 4000:
        raise ContainerCreateError("too many image layers for one overlay mount")
    rc = _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise ContainerCreateError(f"mounting the root filesystem: {os.strerror(err)}")


# --- running ---------------------------------------------------------------------------------


def _runc(*args: str) -> list[str]:
    return ["runc", "--root", str(RUNC_ROOT), *args]


class Container:
    """One run of one container: bundle + overlay + cgroup, started by `start`, removed by
    `remove` (always call it, also when `start` failed)."""

    def __init__(self, cluster: str, cid: str, bundle: Path) -> None:
        self.cluster = cluster
        self.id = cid
        self.bundle = bundle
        self.proc: trio.Process | None = None
        self.memory_limit: int | None = None
        self.killed_by_kubelet = False
        self._cgroup_rel = f"{cgroup_group(cluster)}/{cid}"

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    def prepare(self, layers: Sequence[Path], config_for_rootfs: Any) -> None:
        """Mount the root filesystem and write config.json (`config_for_rootfs(rootfs)`)."""
        RUNC_ROOT.mkdir(parents=True, exist_ok=True)
        for sub in ("rootfs", "upper", "work"):
            (self.bundle / sub).mkdir(parents=True, exist_ok=True)
        mount_overlay(layers, self.bundle / "upper", self.bundle / "work", self.rootfs)
        config = config_for_rootfs(str(self.rootfs), f"{self._cgroup_rel}/c")
        if self.memory_limit is not None:
            self._set_memory_limit(self.memory_limit)
        (self.bundle / "config.json").write_text(json.dumps(config))

    def _set_memory_limit(self, limit: int) -> None:
        memory = _memory_dir()
        if memory is None:
            log.warning("no memory cgroup: the limit of %s is not enforced", self.id)
            return
        parent = memory / self._cgroup_rel
        parent.mkdir(parents=True, exist_ok=True)
        (parent / "memory.limit_in_bytes").write_text(str(limit))
        swap = parent / "memory.memsw.limit_in_bytes"
        if swap.exists():
            try:
                swap.write_text(str(limit))
            except OSError as exc:
                log.debug("memsw limit of %s: %s", self.id, exc)

    def oom_killed(self) -> bool:
        """Whether the memory limit was hit (failcnt counts it; with swap accounting the memsw
        counter fails first, and memory.max_usage_in_bytes reaches the limit)."""
        memory = _memory_dir()
        if memory is None or self.memory_limit is None:
            return False
        parent = memory / self._cgroup_rel
        try:
            for name in ("memory.failcnt", "memory.memsw.failcnt"):
                if (parent / name).exists() and int((parent / name).read_text()) > 0:
                    return True
            return int((parent / "memory.max_usage_in_bytes").read_text()) >= self.memory_limit
        except (OSError, ValueError):
            return False

    async def start(
        self,
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.STDOUT,
    ) -> trio.Process:
        """`runc run` in the foreground: its stdio (passed through) is the container's."""
        self.proc = await trio.lowlevel.open_process(
            _runc(
                "--log",
                str(self.bundle / "runc.log"),
                "--log-format",
                "json",
                "run",
                "--bundle",
                str(self.bundle),
                "--pid-file",
                str(self.bundle / "pid"),
                self.id,
            ),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        # Running is reported once runc has created the container (it writes the pid file,
        # then starts the process at once), not as soon as runc itself was spawned.
        # runc offers no notification of that short of a console socket: look every 2 ms, at
        # most 10 s (it takes ~50 ms).
        try:
            for _ in range(5000):
                if self.init_pid() is not None or self.proc.poll() is not None:
                    break
                await trio.sleep(0.002)
        except BaseException:
            # Cancelled while starting (the pod deleted): nobody else holds this process yet,
            # so end and reap it here, or runc lingers and its pipes are never closed.
            with trio.CancelScope(shield=True):
                self.signal(signal.SIGKILL)
                with trio.move_on_after(10):
                    await self.proc.wait()
                for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                    if pipe is not None:
                        await pipe.aclose()
            raise
        return self.proc

    def start_error(self) -> str | None:
        """Why runc could not start the container's process (a missing executable...), or
        None when it started."""
        try:
            lines = (self.bundle / "runc.log").read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in lines[-20:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            msg = str(entry.get("msg", "")) if isinstance(entry, dict) else ""
            if entry.get("level") == "error" and msg.startswith("runc run failed: "):
                return msg.removeprefix("runc run failed: ")[:1000]
        return None

    def init_pid(self) -> int | None:
        try:
            return int((self.bundle / "pid").read_text())
        except (OSError, ValueError):
            return None

    def signal(self, sig: int) -> None:
        """Signal the container's init (SIGKILL ends its PID namespace); synchronous."""
        if sig == signal.SIGKILL:
            self.killed_by_kubelet = True
        pid = self.init_pid()
        try:
            if pid is not None:
                os.kill(pid, sig)
            elif self.proc is not None and self.proc.returncode is None:
                self.proc.send_signal(sig)  # runc forwards signals to the container
        except (ProcessLookupError, PermissionError):
            pass

    async def exec(self, process: Obj, tag: str, *, interactive: bool) -> trio.Process:
        path = self.bundle / f"exec-{tag}.json"
        path.write_text(json.dumps(process))
        return await trio.lowlevel.open_process(
            _runc(
                "exec",
                "--process",
                str(path),
                "--pid-file",
                str(self.bundle / f"exec-{tag}.pid"),
                self.id,
            ),
            stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if interactive else subprocess.STDOUT,
            start_new_session=True,
        )

    def kill_exec(self, tag: str) -> None:
        try:
            pid = int((self.bundle / f"exec-{tag}.pid").read_text())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    async def remove(self) -> None:
        """Delete the runc container, unmount, remove the cgroups and the bundle."""
        await trio.to_thread.run_sync(self.remove_sync)

    def remove_sync(self) -> None:
        subprocess.run(_runc("delete", "--force", self.id), capture_output=True, check=False)
        _unmount(str(self.rootfs))
        _remove_cgroup_tree(self._cgroup_rel)
        shutil.rmtree(self.bundle, ignore_errors=True)


def cleanup_sync(cluster: str, bundles: Path | None = None) -> None:
    """Remove every runc container, rootfs mount and cgroup of sandbox `cluster` (after a crash
    as on a normal stop)."""
    prefix = f"{cluster}."
    if shutil.which("runc") and RUNC_ROOT.is_dir():
        listing = subprocess.run(
            _runc("list", "--format", "json"), capture_output=True, text=True, check=False
        )
        try:
            containers = json.loads(listing.stdout or "null") or []
        except ValueError:
            containers = []
        for c in containers:
            if str(c.get("id", "")).startswith(prefix):
                subprocess.run(
                    _runc("delete", "--force", c["id"]), capture_output=True, check=False
                )
    for point in _mount_points_below(f"/{prefix}"):
        if point.endswith("/rootfs"):
            _unmount(point)
    _remove_cgroup_tree(cgroup_group(cluster))
    if bundles is not None:
        shutil.rmtree(bundles, ignore_errors=True)
