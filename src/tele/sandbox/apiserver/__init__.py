"""The sandbox's Kubernetes-compatible API server: store, REST semantics, HTTPS serving."""
