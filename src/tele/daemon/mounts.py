"""The engaged container's volumes on this machine: one sshfs mount per engagement.

```
Mounts.serve                                    one per cluster session (its nursery)
 '- per engagement with volumes: _serve_mount
     |- sshfs -f -o passive tele:/tel_app_mounts/<container> LOCAL_DIR   (SFTP on its stdio)
     '- relay: sshfs's stdio (a socketpair) <-> tunnel stream <-> agent pod IP : SFTP port
```
The agent serves SFTP without SSH (tele.agent.files); sshfs speaks SFTP on its stdin/stdout,
which the daemon relays through the session's tunnel. No port listens on this machine, so no
other local user can reach the agent's files. `attach` returns once a directory listing
through the mount answers (sshfs mounts before it connects), or says in `mount_error` why
there is no mount (no sshfs, no /dev/fuse, an agent without a file server...; the engagement
goes on without volumes). The mount ends when the engagement is left, the session ends or the
daemon quits: unmounted in `finally`, shielded and bounded. A daemon killed alone takes its
mounts along (sshfs exits, unmounting, when its stdio socket closes); when sshfs died too, the
dead mount stays in the mount journal and the next daemon start unmounts it (`recover`).

The mount lives in the daemon's mount namespace: a handler started in another one (e.g. under
`ip netns exec`, which makes its own) does not see it, and `tele intercept` says so when it runs
in such a one. The sandbox's laptop keeps one mount namespace for all its shells.

The handler process learns where the volumes are from TELEPRESENCE_ROOT (the local directory)
and TELEPRESENCE_MOUNTS (the shared mount paths, `:`-joined; each is at ROOT/PATH), as with
Telepresence; TELEPRESENCE_LOCAL_MOUNTS lists the paths whose policy is Local (not shared:
the app expects them, the user provides them).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from tele import paths
from tele.contracts.agentconfig import REMOTE_POLICIES
from tele.daemon.forward import Dialer
from tele.errors import TeleError, UserError, single_leaf
from tele.net.tunnel import Destination, Protocol
from tele.rpc.agent_api import EngagementInfo
from tele.rpc.tunnel import splice

log = logging.getLogger(__name__)

Relay = Callable[[str, int, trio.SocketStream], Awaitable[None]]
"""`relay(host, port, local)`: connect to the cluster address host:port and relay `local` to
it until either side ends; raises TeleError (or OSError) when it cannot connect."""

MOUNT_TIMEOUT = 20.0
UNMOUNT_TIMEOUT = 5.0
_STDERR_LIMIT = 4096


def _mounts_dir() -> str:
    value = os.environ.get(paths.MOUNTS_DIR_ENV, "")
    return value if os.path.isabs(value) else ""


def tunnel_relay(dial: Dialer) -> Relay:
    """The production relay: through the session's tunnel (via the traffic manager)."""

    async def relay(host: str, port: int, local: trio.SocketStream) -> None:
        tunnel = await dial(Destination(Protocol.TCP, ipaddress.ip_address(host), port))
        try:
            await splice(tunnel, local)
        finally:
            tunnel.close()

    return relay


class MountError(UserError):
    """A mount that cannot be made; the engagement goes on without it."""


@dataclass(frozen=True, slots=True)
class MountFlag:
    """`--mount`: true (a new temporary directory), false, or DIR, with `:ro` read-only."""

    enabled: bool = True
    directory: str = ""
    read_only: bool = False

    @classmethod
    def parse(cls, value: str) -> MountFlag:
        text = value.strip()
        read_only = text.endswith(":ro")
        if read_only:
            text = text[: -len(":ro")]
        if text.lower() in ("", "true", "yes"):
            return cls(read_only=read_only)
        if text.lower() in ("false", "no"):
            return cls(enabled=False)
        if not os.path.isabs(os.path.expanduser(text)):
            raise UserError(f"--mount {value!r}: give true, false or an absolute directory.")
        return cls(directory=os.path.expanduser(text), read_only=read_only)

    def read_only_if(self, condition: bool) -> MountFlag:
        return MountFlag(self.enabled, self.directory, self.read_only or condition)


# --- the machine's side: can we mount, is it mounted, unmount --------------------------------


def mount_problem() -> str | None:
    """Why FUSE mounts with sshfs cannot work on this machine (one sentence), or None."""
    if shutil.which("sshfs") is None:
        return "sshfs is not installed (Debian/Ubuntu: apt install sshfs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (FUSE is not available here)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) and _fusermount() is None:
        return "/dev/fuse is not usable by this user and fusermount3 is not installed"
    return None


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mounted_at(directory: str | Path) -> str | None:
    """The file system type mounted at `directory` (e.g. "fuse.sshfs"), or None."""
    # Only the parent is resolved: resolving the mount point itself stats it, i.e. asks the
    # FUSE file system, whose SFTP relay may be this very thread (a deadlock).
    path = os.path.abspath(directory)
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split(" ")
        try:
            fstype = fields[fields.index("-") + 1]
        except (ValueError, IndexError):
            continue
        if len(fields) > 4 and _unescape(fields[4]) == target:
            found = fstype  # the last one listed is on top
    return found


def _wait_for_mount(directory: str, timeout: float) -> bool:
    """Block until something is mounted at `directory` (True) or `timeout` passes (False).
    The kernel flags /proc/self/mountinfo with POLLPRI whenever the mount table changes, so
    this sleeps until a change instead of re-reading the table on a timer."""
    deadline = time.monotonic() + timeout
    with open("/proc/self/mountinfo", "rb") as table:
        changes = select.poll()
        changes.register(table, select.POLLPRI)
        while mounted_at(directory) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            changes.poll(left * 1000)
    return True


def unmount(directory: str | Path) -> bool:
    """Unmount `directory` lazily (open files keep working until closed); True if it was a
    mount. Blocking: call it in a thread."""
    if mounted_at(directory) is None:
        return False
    tool = _fusermount()
    commands = [[tool, "-u", "-z", str(directory)]] if tool else []
    if os.geteuid() == 0:
        commands.append(["umount", "-l", str(directory)])
    for command in commands:
        try:
            done = subprocess.run(
                command, capture_output=True, timeout=UNMOUNT_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("%s: %s", command[0], exc)
            continue
        if done.returncode == 0 or mounted_at(directory) is None:
            return True
        log.warning("%s: %s", " ".join(command), done.stderr.decode(errors="replace").strip())
    return mounted_at(directory) is None


# --- the mount journal: what a killed daemon left ----------------------------------------------


class _Entry(msgspec.Struct, frozen=True):
    directory: str
    created: bool
    """The daemon made the directory (remove it after unmounting)."""


def journal_path() -> Path:
    return paths.state_dir() / "mounts-journal.json"


def _load() -> list[_Entry]:
    try:
        return msgspec.json.decode(journal_path().read_bytes(), type=list[_Entry])
    except (OSError, msgspec.DecodeError):
        return []


def _save(entries: list[_Entry]) -> None:
    path = journal_path()
    paths.ensure_private_dir(path.parent)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(entries))
    os.replace(tmp, path)


def _record(entry: _Entry) -> None:
    _save([e for e in _load() if e.directory != entry.directory] + [entry])


def _forget(directory: str) -> None:
    entries = _load()
    kept = [e for e in entries if e.directory != directory]
    if kept != entries:
        _save(kept)


def _left_in_mounts_dir() -> list[_Entry]:
    """The mount points in the paths.MOUNTS_DIR_ENV directory (only a dead daemon's at start)."""
    where = _mounts_dir()
    try:
        names = sorted(n for n in os.listdir(where) if n.startswith("telfs-")) if where else []
    except OSError:
        return []
    return [_Entry(os.path.join(where, n), True) for n in names]


def pending() -> list[str]:
    return [e.directory for e in _load() + _left_in_mounts_dir()]


def recover() -> list[str]:
    """Unmount what a dead daemon left mounted; what was done, in words (for the log)."""
    done = []
    journal = _load()
    known = {e.directory for e in journal}
    for entry in journal + [e for e in _left_in_mounts_dir() if e.directory not in known]:
        try:
            if unmount(entry.directory):
                done.append(f"unmounted {entry.directory}")
            if entry.created:
                os.rmdir(entry.directory)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not clean up the mount %s: %s", entry.directory, exc)
            if mounted_at(entry.directory) is not None:
                continue  # keep it for the next try
        _forget(entry.directory)
    return done


# --- mounts of one session --------------------------------------------------------------------


def environment(info: EngagementInfo) -> dict[str, str]:
    """The TELEPRESENCE_* variables a handler gets, as Telepresence's: which engagement and
    container it handles (TELEPRESENCE_INTERCEPT_ID, TELEPRESENCE_CONTAINER) and where the
    volumes are."""
    env = {"TELEPRESENCE_INTERCEPT_ID": info.id, "TELEPRESENCE_CONTAINER": info.container}
    remote = sorted(p for p, policy in info.mount_policies.items() if policy in REMOTE_POLICIES)
    local = sorted(p for p, policy in info.mount_policies.items() if policy == "Local")
    if info.local_mount:
        env["TELEPRESENCE_ROOT"] = info.local_mount
    if remote:
        env["TELEPRESENCE_MOUNTS"] = ":".join(remote)
    if local:
        env["TELEPRESENCE_LOCAL_MOUNTS"] = ":".join(local)
    return env


class Mounts:
    """The mounts of one cluster session, keyed by engagement id; run `serve` in its nursery."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self._dirs: dict[str, str] = {}
        self._wanted: dict[str, tuple[MountFlag, bool]] = {}
        """Per engagement id: the directory and mode of its mount, and whether tele made the
        directory, kept until `detach`: `remount` mounts at the same place, and the directory
        stays while the engagement lasts (also when sshfs ended with the pod it reached)."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def attach(self, info: EngagementInfo, wanted: MountFlag) -> EngagementInfo:
        """Mount `info`'s volumes as `wanted` (--mount) says; the info with `local_mount` or
        `mount_error` set and the TELEPRESENCE_* variables added to its environment."""
        local, error = "", ""
        remote = any(p in REMOTE_POLICIES for p in info.mount_policies.values())
        if wanted.enabled and remote and info.id not in self._scopes:
            try:
                local = await self._mount(info, wanted)
            except TeleError as exc:
                error = str(exc)
                log.warning("volumes of %s not mounted: %s", info.name, error)
        elif info.id in self._scopes:
            local = self._dirs.get(info.id, "")
        info = msgspec.structs.replace(info, local_mount=local, mount_error=error)
        return msgspec.structs.replace(info, environment={**info.environment, **environment(info)})

    async def remount(self, info: EngagementInfo) -> EngagementInfo:
        """Mount `info`'s volumes again at the directory they were mounted at, from the pod
        `info` names now (the pod that served them was replaced): the old mount ends first.
        `info` as `attach` returns it; unchanged when its volumes were never mounted."""
        found = self._wanted.get(info.id)
        if found is None:
            return info
        await self._unmount(info.id)
        local, error = "", ""
        try:
            local = await self._mount(info, found[0])
        except TeleError as exc:
            error = str(exc)
            log.warning("volumes of %s not mounted again: %s", info.name, error)
        info = msgspec.structs.replace(info, local_mount=local, mount_error=error)
        return msgspec.structs.replace(info, environment={**info.environment, **environment(info)})

    def mounted(self, engagement_id: str) -> bool:
        """The engagement's volumes were mounted (and not detached since)."""
        return engagement_id in self._wanted

    async def detach(self, engagement_id: str) -> None:
        """Unmount the engagement's volumes (if any); returns once they are gone, and the
        directory too if tele made it."""
        found = self._wanted.pop(engagement_id, None)
        await self._unmount(engagement_id)  # a live mount removes what it made, on its way out
        if found is not None and found[1] and engagement_id not in self._scopes:
            # Kept since sshfs ended by itself (or a remount failed): empty, unmounted.
            with trio.CancelScope(shield=True), trio.move_on_after(UNMOUNT_TIMEOUT + 1):
                await trio.to_thread.run_sync(_cleanup, found[0].directory, True)

    async def _unmount(self, engagement_id: str) -> None:
        found = self._scopes.get(engagement_id)
        if found is None:
            return
        scope, done = found
        scope.cancel()
        with trio.move_on_after(UNMOUNT_TIMEOUT + 1):
            await done.wait()

    async def _mount(self, info: EngagementInfo, wanted: MountFlag) -> str:
        problem = mount_problem()
        if problem is not None:
            raise MountError(problem)
        if not info.sftp_port or not info.pod_ips:
            # The manager says why when it withheld them (the user may not read them).
            raise MountError(
                info.mount_error or "the workload's traffic agent does not export volumes"
            )
        if self._nursery is None:
            raise MountError("the session is ending")
        try:
            local, created = await self._nursery.start(self._serve_mount, info, wanted)
        except BaseExceptionGroup as group:
            leaf = single_leaf(group)
            if isinstance(leaf, TeleError):
                raise MountError(str(leaf)) from None
            raise
        self._wanted[info.id] = (MountFlag(directory=local, read_only=wanted.read_only), created)
        return str(local)

    async def _relay_files(
        self, info: EngagementInfo, local: trio.SocketStream, failure: list[str]
    ) -> None:
        """sshfs's SFTP to the agent, until either side ends (sshfs exits when it does)."""
        async with local:
            try:
                await self._relay(info.pod_ips[0], info.sftp_port, local)
            except (TeleError, OSError, trio.BrokenResourceError) as exc:
                failure.append(str(exc) or type(exc).__name__)
                log.warning("the file server of %s: %s", info.name, failure[-1])
            except Exception as exc:  # the relay's end, however it came, ends only this mount
                failure.append(str(exc) or type(exc).__name__)
                log.exception("the file server of %s", info.name)

    async def _serve_mount(
        self,
        info: EngagementInfo,
        wanted: MountFlag,
        *,
        task_status: trio.TaskStatus[tuple[str, bool]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        scope, done = trio.CancelScope(), trio.Event()
        self._scopes[info.id] = (scope, done)
        directory, created = "", False
        process: trio.Process | None = None
        # Ended by sshfs's exit or by this mount's own scope (detach, remount), not by the
        # session's end or a failure: then a directory of a lasting engagement stays.
        ended_here = False
        try:
            with scope:
                directory, created = _prepare(wanted)
                before = self._wanted.get(info.id)  # mounted there before: who made it
                created = created or (before is not None and before[1])
                self._dirs[info.id] = directory
                await trio.to_thread.run_sync(_record, _Entry(directory, created))
                ours, theirs = socket.socketpair()
                failure: list[str] = []
                async with trio.open_nursery() as nursery:
                    with theirs:
                        local = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
                        nursery.start_soon(self._relay_files, info, local, failure)
                        process = await _start_sshfs(
                            nursery, info, wanted, directory, theirs.fileno(), failure
                        )
                    log.info("volumes of %s mounted at %s", info.name, directory)
                    task_status.started((directory, created))
                    await process.wait()
                    log.warning(
                        "the mount of %s at %s ended: sshfs exited with status %s",
                        info.name,
                        directory,
                        process.returncode,
                    )
                    nursery.cancel_scope.cancel()
            ended_here = True
        finally:
            self._scopes.pop(info.id, None)
            self._dirs.pop(info.id, None)
            # While the engagement lasts, its directory stays (for `remount`; `detach` ends it).
            keep = ended_here and info.id in self._wanted
            with trio.CancelScope(shield=True), trio.move_on_after(UNMOUNT_TIMEOUT + 1):
                if directory:
                    await trio.to_thread.run_sync(_cleanup, directory, created, keep)
                if process is not None:
                    # Unmounted, sshfs exits by itself; reap it (or end it if it hangs).
                    with trio.move_on_after(UNMOUNT_TIMEOUT / 2):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
            done.set()


def _prepare(wanted: MountFlag) -> tuple[str, bool]:
    """The local directory to mount on, and whether it was made here."""
    if not wanted.directory:
        return tempfile.mkdtemp(prefix="telfs-", dir=_mounts_dir() or None), True
    path = Path(wanted.directory)
    if mounted_at(path) is not None:
        raise MountError(f"{path} is already a mount point; choose another --mount directory")
    try:
        path.mkdir(parents=True)
        return str(path), True
    except FileExistsError:
        if not path.is_dir():
            raise MountError(f"--mount {path} is not a directory") from None
        if any(path.iterdir()):
            raise MountError(f"--mount {path} is not empty; give an empty directory") from None
        return str(path), False
    except OSError as exc:
        raise MountError(f"cannot create {path}: {exc.strerror or exc}") from None


def _cleanup(directory: str, created: bool, keep: bool = False) -> None:
    """Unmount `directory`; remove it if tele made it, unless `keep` (then its journal entry
    stays too, so that a dead daemon's successor removes it)."""
    if unmount(directory):
        log.info("unmounted %s", directory)
    if created and not keep and mounted_at(directory) is None:
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", directory, exc.strerror or exc)
    if mounted_at(directory) is None and not (created and keep):
        _forget(directory)


async def _start_sshfs(
    nursery: trio.Nursery,
    info: EngagementInfo,
    wanted: MountFlag,
    directory: str,
    stdio: int,
    failure: list[str],
) -> trio.Process:
    """Start sshfs in the foreground (a child this daemon supervises; its stderr is logged by a
    task in `nursery`) and wait until the mount is up; MountError with sshfs's own words when
    it exits first or takes too long (then it is not running any more)."""
    options = ["passive", f"fsname=tele-{info.name}"]
    if wanted.read_only:
        options.append("ro")
    if _mounts_dir():
        options.append("allow_other")
    command = ["sshfs", "-f", "-o", ",".join(options), f"tele:{info.mount_point}", directory]
    try:
        process = await trio.lowlevel.open_process(
            command, stdin=stdio, stdout=stdio, stderr=subprocess.PIPE
        )
    except OSError as exc:
        raise MountError(f"cannot run sshfs: {exc.strerror or exc}") from None
    stderr = bytearray()
    ended = trio.Event()

    async def read_stderr() -> None:
        assert process.stderr is not None
        async with process.stderr:
            async for chunk in process.stderr:
                if len(stderr) < _STDERR_LIMIT:
                    stderr.extend(chunk)
                for line in chunk.decode(errors="replace").splitlines():
                    log.info("sshfs (%s): %s", info.name, line)
        ended.set()

    nursery.start_soon(read_stderr)
    try:
        # sshfs -f says nothing once the mount is up: wait for the mount table to show it, or
        # for sshfs to exit, whichever comes first.
        async with trio.open_nursery() as race:

            async def until_mounted() -> None:
                await trio.to_thread.run_sync(
                    _wait_for_mount, directory, MOUNT_TIMEOUT, abandon_on_cancel=True
                )
                race.cancel_scope.cancel()

            async def until_exited() -> None:
                await process.wait()
                race.cancel_scope.cancel()

            race.start_soon(until_mounted)
            race.start_soon(until_exited)
        failed = ""
        if process.returncode is None and mounted_at(directory) is not None:
            # sshfs mounts first and connects after: only an answer through the mount proves
            # the connection (a directory listing: the kernel may answer a stat of the root).
            with trio.move_on_after(MOUNT_TIMEOUT):
                try:
                    await trio.to_thread.run_sync(os.listdir, directory, abandon_on_cancel=True)
                except OSError as exc:
                    failed = exc.strerror or str(exc)
                # Still mounted after the answer: it came through sshfs, not from the plain
                # directory that a failing sshfs has just unmounted.
                if not failed and process.returncode is None and mounted_at(directory):
                    return process
        if process.returncode is None:
            detail = failed or f"no working mount after {MOUNT_TIMEOUT:g}s"
        else:
            with trio.move_on_after(1):
                await ended.wait()  # its last words
            lines = stderr.decode(errors="replace").strip().splitlines()
            # The relay's reason (it could not reach the agent) says more than sshfs's EOF.
            detail = failure[-1] if failure else lines[-1] if lines else "sshfs exited"
        raise MountError(f"sshfs could not mount the volumes at {directory}: {detail}")
    except BaseException:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
