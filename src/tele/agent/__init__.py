"""tele.agent."""
