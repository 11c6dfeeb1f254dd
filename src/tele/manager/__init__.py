"""tele.manager."""
