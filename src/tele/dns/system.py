"""Point the system's resolver at tele's DNS server, and put it back.

With systemd-resolved running, the TUN link gets tele's server and routing domains
(`resolvectl dns/domain`: `~cluster.local`, `~<namespace>` for each mapped namespace, the
search domain `tel2-search`), which resolved drops by itself when the link disappears.
Otherwise resolv.conf is overridden: the original is copied aside first (and the copy recorded
in the undo journal), and restored byte for byte on the way out. Tests pass the resolv.conf of
their own network namespace (`/etc/netns/<name>/resolv.conf`); nothing here is ever pointed at
the host's file by a test.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

from tele.dns.errors import DnsError

SEARCH_DOMAIN = "tel2-search"
RESOLV_CONF = Path("/etc/resolv.conf")


def resolv_conf_for(netns: str | None) -> Path:
    """The resolv.conf that programs in `netns` read: `ip netns exec` bind-mounts
    /etc/netns/<name>/resolv.conf over /etc/resolv.conf (when that file exists)."""
    return RESOLV_CONF if netns is None else Path("/etc/netns") / netns / "resolv.conf"


def backup_for(path: Path) -> Path:
    """Where the original of an overridden resolv.conf is kept."""
    return path.with_name(path.name + ".tele-orig")


def resolved_running() -> bool:
    """systemd-resolved manages this machine's DNS (its stub resolv.conf is in place)."""
    return Path("/run/systemd/resolve/io.systemd.Resolve").exists() and bool(
        shutil.which("resolvectl")
    )


def nameservers(path: Path) -> list[str]:
    """The `nameserver` addresses of a resolv.conf (empty when it is missing)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            found.append(parts[1])
    return found


def override_resolv_conf(path: Path, backup: Path, server: str, search: list[str]) -> None:
    """Keep the original at `backup`, then make `server` the only nameserver in `path`.

    A regular file is rewritten in place, never replaced: /etc/resolv.conf is often a bind mount
    (`ip netns exec` puts /etc/netns/NAME/resolv.conf there, containers get one from their
    runtime), and renaming over a mount point fails or, worse, changes the file of whoever
    mounted it. Only a symlink (a resolver manager's file) is replaced by a file of ours.
    """
    # A leftover backup is the true original (a crashed session's): never overwrite it.
    if not os.path.lexists(backup):
        backup.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):
            shutil.copy2(path, backup, follow_symlinks=False)  # a symlink stays a symlink
        else:
            backup.write_text("")
            os.chmod(backup, 0o644)
    text = (
        f"# written by tele while connected; the original is kept in {backup}\n"
        f"nameserver {server}\n"
        f"search {' '.join(search)}\n"
        "options ndots:1 timeout:2 attempts:2\n"
    )
    if os.path.islink(path) or not os.path.lexists(path):
        tmp = path.with_name(path.name + ".tele-tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    else:
        path.write_text(text)


def restore_resolv_conf(path: Path, backup: Path) -> None:
    """Put the original back (a missing backup means there is nothing of ours to undo)."""
    if not os.path.lexists(backup):
        return
    if os.path.islink(backup) or os.path.islink(path) or not os.path.lexists(path):
        os.replace(backup, path)
        return
    path.write_bytes(backup.read_bytes())  # in place, as it was written (see above)
    backup.unlink()


def resolved_set_link(
    device: str, server: str, domains: list[str], *, netns: str | None = None
) -> None:
    """Per-link DNS and routing domains through systemd-resolved.

    With `netns`, resolvectl runs in that network namespace: it names the device by its
    index there, and resolved (on the system bus) is the one serving that namespace.
    """
    prefix = [] if netns is None else ["ip", "netns", "exec", netns]
    try:
        for args in (["dns", device, server], ["domain", device, *domains]):
            subprocess.run([*prefix, "resolvectl", *args], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise DnsError(
            f"systemd-resolved refused DNS settings for {device}: "
            f"{detail.decode(errors='replace').strip() or exc}"
        ) from exc
