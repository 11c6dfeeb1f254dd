"""A local Kubernetes stand-in: API server, controllers, kubelet in network namespaces."""
