"""tele.k8s."""
