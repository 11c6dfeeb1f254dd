"""Whether a process may set up the network itself: its effective CAP_NET_ADMIN.

Read from /proc (no library, no privilege): the CLI asks it of the daemon to decide whether a
privileged helper is needed, the daemon of itself to decide how it sets the VIF up.
"""

from __future__ import annotations

from typing import Final

CAP_NET_ADMIN: Final = 12


def effective_capabilities(pid: int | str = "self") -> int:
    """The CapEff bit mask of `pid` (0 when it cannot be read: the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def has_net_admin(pid: int | str = "self") -> bool:
    return bool(effective_capabilities(pid) >> CAP_NET_ADMIN & 1)
