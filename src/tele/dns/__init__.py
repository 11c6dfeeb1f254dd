"""tele.dns."""
