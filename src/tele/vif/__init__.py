"""tele.vif."""
