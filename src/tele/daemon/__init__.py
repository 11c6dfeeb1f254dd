"""tele.daemon."""
