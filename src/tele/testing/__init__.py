"""tele.testing."""
