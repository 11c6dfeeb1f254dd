"""Where tele keeps its files: config, logs, runtime sockets, sandbox state.

Every location honours the XDG variables so tests can point a whole tele at a temporary home.
"""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else default


def home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", home() / ".config") / "tele"


def config_file() -> Path:
    return config_dir() / "config.yml"


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", home() / ".cache") / "tele"


def logs_dir() -> Path:
    return cache_dir() / "logs"


def state_dir() -> Path:
    """Persistent state that is not cache: sandbox instances, helm release records."""
    return _xdg("XDG_STATE_HOME", home() / ".local" / "state") / "tele"


USE_ENV = "TELE_USE"
"""The named connection (`tele --use NAME`, `tele connect --docker --name NAME`) whose daemon
the commands talk to; unset or "default": the one daemon of the user."""


def connection_name() -> str:
    """The named connection chosen by USE_ENV, or "default" (also for a name that is not a
    plain file name: the CLI refuses those before setting it)."""
    name = os.environ.get(USE_ENV, "")
    plain = name and not name.startswith(".") and all(c.isalnum() or c in "_.-" for c in name)
    return name if plain else "default"


def runtime_dir() -> Path:
    """Sockets, pid and lock files: $XDG_RUNTIME_DIR/tele when usable, else under the cache;
    a named connection's under connections/NAME there."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.path.isdir(base) and os.access(base, os.W_OK):
        root = Path(base) / "tele"
    else:
        root = cache_dir() / "run"
    name = connection_name()
    return root if name == "default" else root / "connections" / name


def daemon_socket() -> Path:
    """The unix socket the daemon listens on (mode 0600, in a 0700 dir)."""
    return runtime_dir() / "daemon.sock"


def helper_socket() -> Path:
    """Where the privileged network helper connects to the daemon (SOCK_SEQPACKET, 0600)."""
    return runtime_dir() / "helper.sock"


def daemon_lock() -> Path:
    """flock()ed exclusively by the running daemon for its whole life: one daemon per user."""
    return runtime_dir() / "daemon.lock"


def daemon_pid() -> Path:
    """The running daemon's pid, for people and for tests that must kill it."""
    return runtime_dir() / "daemon.pid"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it accessible to the owner only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


MOUNTS_DIR_ENV = "TELE_MOUNTS_DIR"
"""Set in the daemon container of `tele connect --docker`: the directory its mount points go in,
bound from the engine's host with shared propagation so that --docker-run containers can bind
them. Mounts there let any user in (allow_other: the handler container runs as any user; the
host directory is inside the user's private runtime directory), and a `telfs-*` left there at
start is a dead daemon's (its container is gone, the journal with it): `recover` unmounts it."""
