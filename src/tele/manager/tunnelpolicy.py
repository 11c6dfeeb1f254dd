"""Where the traffic manager does not dial for a client (issue 15 item 5); the rules live in
`tele.net.dialpolicy` (the agents apply them too, for --proxy-via dials)."""

from __future__ import annotations

from tele.net.dialpolicy import LINK_LOCAL, LOOPBACK, METADATA, NEVER_DIALED, never_dialed

__all__ = ["LINK_LOCAL", "LOOPBACK", "METADATA", "NEVER_DIALED", "never_dialed"]
