"""tele: join a Kubernetes cluster's network and handle a workload's traffic locally."""

__version__ = "0.1.0"
